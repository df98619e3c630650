import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmp.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Evaluation(_message.Message):
    __slots__ = ("id", "state", "model", "dataset", "split", "progress", "metrics", "error", "attempt", "cancel_requested", "idempotency_key", "created_at", "started_at", "finished_at", "contamination", "exclude_contaminated")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTAMINATION_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CONTAMINATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    split: str
    progress: _common_pb2.Progress
    metrics: _containers.ScalarMap[str, float]
    error: str
    attempt: int
    cancel_requested: bool
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    contamination: Contamination
    exclude_contaminated: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., split: _Optional[str] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., attempt: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., contamination: _Optional[_Union[Contamination, _Mapping]] = ..., exclude_contaminated: _Optional[bool] = ...) -> None: ...

class Contamination(_message.Message):
    __slots__ = ("share", "documents", "contaminated", "datasets", "all_metrics", "clean_metrics")
    class AllMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CleanMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SHARE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CONTAMINATED_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    ALL_METRICS_FIELD_NUMBER: _ClassVar[int]
    CLEAN_METRICS_FIELD_NUMBER: _ClassVar[int]
    share: float
    documents: int
    contaminated: int
    datasets: _containers.RepeatedScalarFieldContainer[str]
    all_metrics: _containers.ScalarMap[str, float]
    clean_metrics: _containers.ScalarMap[str, float]
    def __init__(self, share: _Optional[float] = ..., documents: _Optional[int] = ..., contaminated: _Optional[int] = ..., datasets: _Optional[_Iterable[str]] = ..., all_metrics: _Optional[_Mapping[str, float]] = ..., clean_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitEvaluationRequest(_message.Message):
    __slots__ = ("model", "dataset", "split", "idempotency_key", "exclude_contaminated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CONTAMINATED_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    dataset: _common_pb2.DatasetRef
    split: str
    idempotency_key: str
    exclude_contaminated: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., split: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., exclude_contaminated: _Optional[bool] = ...) -> None: ...

class SubmitEvaluationResponse(_message.Message):
    __slots__ = ("evaluation", "created")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    evaluation: Evaluation
    created: bool
    def __init__(self, evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetEvaluationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetEvaluationResponse(_message.Message):
    __slots__ = ("evaluation",)
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    evaluation: Evaluation
    def __init__(self, evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class ListEvaluationsRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "page")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    page: _common_pb2.PageRequest
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListEvaluationsResponse(_message.Message):
    __slots__ = ("evaluations", "page")
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    page: _common_pb2.PageResponse
    def __init__(self, evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class CancelEvaluationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelEvaluationResponse(_message.Message):
    __slots__ = ("evaluation",)
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    evaluation: Evaluation
    def __init__(self, evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("family", "n_layer", "n_head", "n_embd", "block_size", "dropout", "init_from", "adapter")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    family: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float
    init_from: _common_pb2.ModelRef
    adapter: AdapterConfig
    def __init__(self, family: _Optional[str] = ..., n_layer: _Optional[int] = ..., n_head: _Optional[int] = ..., n_embd: _Optional[int] = ..., block_size: _Optional[int] = ..., dropout: _Optional[float] = ..., init_from: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., adapter: _Optional[_Union[AdapterConfig, _Mapping]] = ...) -> None: ...

class AdapterConfig(_message.Message):
    __slots__ = ("type", "r", "alpha", "dropout", "target_modules")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    type: str
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, type: _Optional[str] = ..., r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("batch_size", "max_steps", "learning_rate", "min_learning_rate", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "grad_accum", "eval_interval", "eval_batches", "early_stopping_patience", "checkpoint_interval", "log_interval", "precision", "seed", "mlm_probability")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    EVAL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LOG_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MLM_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    max_steps: int
    learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    grad_accum: int
    eval_interval: int
    eval_batches: int
    early_stopping_patience: int
    checkpoint_interval: int
    log_interval: int
    precision: str
    seed: int
    mlm_probability: float
    def __init__(self, batch_size: _Optional[int] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., min_learning_rate: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., grad_clip: _Optional[float] = ..., grad_accum: _Optional[int] = ..., eval_interval: _Optional[int] = ..., eval_batches: _Optional[int] = ..., early_stopping_patience: _Optional[int] = ..., checkpoint_interval: _Optional[int] = ..., log_interval: _Optional[int] = ..., precision: _Optional[str] = ..., seed: _Optional[int] = ..., mlm_probability: _Optional[float] = ...) -> None: ...

class Distributed(_message.Message):
    __slots__ = ("mode", "nproc_per_node", "nnodes", "sync_interval")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NPROC_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    NNODES_FIELD_NUMBER: _ClassVar[int]
    SYNC_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    mode: str
    nproc_per_node: int
    nnodes: int
    sync_interval: int
    def __init__(self, mode: _Optional[str] = ..., nproc_per_node: _Optional[int] = ..., nnodes: _Optional[int] = ..., sync_interval: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("dataset", "model", "hyperparameters", "distributed")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.DatasetRef
    model: ModelConfig
    hyperparameters: Hyperparameters
    distributed: Distributed
    def __init__(self, dataset: _Optional[_Union[_common_pb2.DatasetRef, _Mapping]] = ..., model: _Optional[_Union[ModelConfig, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., distributed: _Optional[_Union[Distributed, _Mapping]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("step", "value", "time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    value: float
    time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., value: _Optional[float] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MetricsSnapshot(_message.Message):
    __slots__ = ("step", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "spec", "priority", "idempotency_key", "model_name", "progress", "latest_metrics", "model_version", "error", "attempt", "cancel_requested", "environment", "created_at", "started_at", "finished_at", "updated_at", "output_prefix")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    spec: JobSpec
    priority: int
    idempotency_key: str
    model_name: str
    progress: _common_pb2.Progress
    latest_metrics: MetricsSnapshot
    model_version: _common_pb2.ModelRef
    error: str
    attempt: int
    cancel_requested: bool
    environment: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    output_prefix: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., model_name: _Optional[str] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., latest_metrics: _Optional[_Union[MetricsSnapshot, _Mapping]] = ..., model_version: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., error: _Optional[str] = ..., attempt: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., environment: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., output_prefix: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key", "priority", "model_name")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    idempotency_key: str
    priority: int
    model_name: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., priority: _Optional[int] = ..., model_name: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: Job
    created: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page", "states")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "page")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    page: _common_pb2.PageResponse
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobMetricsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobMetricsResponse(_message.Message):
    __slots__ = ("train_loss", "validation_loss", "learning_rate", "tokens_per_second", "validation_perplexity", "mfu", "final")
    class FinalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    train_loss: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    validation_loss: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    learning_rate: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    tokens_per_second: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    validation_perplexity: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    mfu: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    final: _containers.ScalarMap[str, float]
    def __init__(self, train_loss: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., validation_loss: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., learning_rate: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., tokens_per_second: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., validation_perplexity: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., mfu: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., final: _Optional[_Mapping[str, float]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_sequence: int
    def __init__(self, id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class StateChanged(_message.Message):
    __slots__ = ("state", "reason", "attempt")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    attempt: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class MetricsRecorded(_message.Message):
    __slots__ = ("step", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("step", "prefix")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    step: int
    prefix: str
    def __init__(self, step: _Optional[int] = ..., prefix: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("sequence", "time", "state_changed", "progress", "metrics", "checkpoint")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state_changed: StateChanged
    progress: _common_pb2.Progress
    metrics: MetricsRecorded
    checkpoint: CheckpointSaved
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_changed: _Optional[_Union[StateChanged, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., metrics: _Optional[_Union[MetricsRecorded, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSaved, _Mapping]] = ...) -> None: ...
