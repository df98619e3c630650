import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("deployment", "inputs", "routing_key")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    routing_key: str
    def __init__(self, deployment: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., routing_key: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "tokens")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "model_version", "canary")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: str
    model_version: int
    canary: bool
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., canary: _Optional[bool] = ...) -> None: ...

class SamplingParameters(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    presence_penalty: float
    frequency_penalty: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("deployment", "prompt", "max_tokens", "sampling", "routing_key", "messages", "n", "logprobs", "top_logprobs", "prompt_logprobs")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    prompt: str
    max_tokens: int
    sampling: SamplingParameters
    routing_key: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    n: int
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: bool
    def __init__(self, deployment: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParameters, _Mapping]] = ..., routing_key: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., n: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "top_logprobs", "token_bytes")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    token_bytes: bytes
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., token_bytes: _Optional[bytes] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "model", "model_version", "canary", "index", "logprobs", "prompt_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    model_version: int
    canary: bool
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., canary: _Optional[bool] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completion", "choices")
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    completion: Completion
    choices: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, completion: _Optional[_Union[Completion, _Mapping]] = ..., choices: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "summary", "index", "logprobs", "prompt_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    summary: Completion
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., summary: _Optional[_Union[Completion, _Mapping]] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class Canary(_message.Message):
    __slots__ = ("version", "weight", "rollout")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    version: int
    weight: int
    rollout: CanaryRollout
    def __init__(self, version: _Optional[int] = ..., weight: _Optional[int] = ..., rollout: _Optional[_Union[CanaryRollout, _Mapping]] = ...) -> None: ...

class CanaryRollout(_message.Message):
    __slots__ = ("steps", "interval_s", "min_requests", "max_error_rate_delta", "max_latency_ratio", "latency_statistic")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    LATENCY_STATISTIC_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    interval_s: float
    min_requests: int
    max_error_rate_delta: float
    max_latency_ratio: float
    latency_statistic: str
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., interval_s: _Optional[float] = ..., min_requests: _Optional[int] = ..., max_error_rate_delta: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., latency_statistic: _Optional[str] = ...) -> None: ...

class CanaryEvent(_message.Message):
    __slots__ = ("kind", "at", "from_weight", "to_weight", "reason", "observed_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    FROM_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TO_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    at: _timestamp_pb2.Timestamp
    from_weight: int
    to_weight: int
    reason: str
    observed_json: str
    def __init__(self, kind: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., from_weight: _Optional[int] = ..., to_weight: _Optional[int] = ..., reason: _Optional[str] = ..., observed_json: _Optional[str] = ...) -> None: ...

class CanaryRolloutStatus(_message.Message):
    __slots__ = ("state", "step", "weight", "reason", "policy", "canary_version", "events")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    state: str
    step: int
    weight: int
    reason: str
    policy: CanaryRollout
    canary_version: int
    events: _containers.RepeatedCompositeFieldContainer[CanaryEvent]
    def __init__(self, state: _Optional[str] = ..., step: _Optional[int] = ..., weight: _Optional[int] = ..., reason: _Optional[str] = ..., policy: _Optional[_Union[CanaryRollout, _Mapping]] = ..., canary_version: _Optional[int] = ..., events: _Optional[_Iterable[_Union[CanaryEvent, _Mapping]]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "model", "stable_version", "canary", "state", "message", "etag", "created_at", "updated_at", "triton_models", "rollout")
    class TritonModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRITON_MODELS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    stable_version: int
    canary: Canary
    state: str
    message: str
    etag: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    triton_models: _containers.ScalarMap[str, str]
    rollout: CanaryRolloutStatus
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., stable_version: _Optional[int] = ..., canary: _Optional[_Union[Canary, _Mapping]] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., etag: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., triton_models: _Optional[_Mapping[str, str]] = ..., rollout: _Optional[_Union[CanaryRolloutStatus, _Mapping]] = ...) -> None: ...

class PutDeploymentRequest(_message.Message):
    __slots__ = ("name", "model", "stable_version", "stable_alias", "canary", "if_match", "if_none_match", "wait")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STABLE_ALIAS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    IF_MATCH_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    stable_version: int
    stable_alias: str
    canary: Canary
    if_match: str
    if_none_match: str
    wait: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., stable_version: _Optional[int] = ..., stable_alias: _Optional[str] = ..., canary: _Optional[_Union[Canary, _Mapping]] = ..., if_match: _Optional[str] = ..., if_none_match: _Optional[str] = ..., wait: _Optional[bool] = ...) -> None: ...

class PutDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "created")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    created: bool
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetDeploymentResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name", "if_match")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IF_MATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    if_match: str
    def __init__(self, name: _Optional[str] = ..., if_match: _Optional[str] = ...) -> None: ...

class DeleteDeploymentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDeploymentMetricsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ServedVersionStats(_message.Message):
    __slots__ = ("model", "version", "role", "serving", "weight", "requests", "errors", "error_rate", "latency_mean_s", "latency_p50_s", "latency_p99_s", "time_to_first_token_mean_s", "time_to_first_token_p99_s", "prompt_tokens", "completion_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_P99_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    role: str
    serving: bool
    weight: int
    requests: int
    errors: int
    error_rate: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float
    time_to_first_token_mean_s: float
    time_to_first_token_p99_s: float
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., role: _Optional[str] = ..., serving: _Optional[bool] = ..., weight: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., latency_mean_s: _Optional[float] = ..., latency_p50_s: _Optional[float] = ..., latency_p99_s: _Optional[float] = ..., time_to_first_token_mean_s: _Optional[float] = ..., time_to_first_token_p99_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GetDeploymentMetricsResponse(_message.Message):
    __slots__ = ("name", "model", "versions", "replica", "since")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[ServedVersionStats]
    replica: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ServedVersionStats, _Mapping]]] = ..., replica: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
