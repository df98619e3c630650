import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmp.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CorpusFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CORPUS_FORMAT_UNSPECIFIED: _ClassVar[CorpusFormat]
    CORPUS_FORMAT_TEXT: _ClassVar[CorpusFormat]
    CORPUS_FORMAT_JSONL: _ClassVar[CorpusFormat]
    CORPUS_FORMAT_PAIRS: _ClassVar[CorpusFormat]
    CORPUS_FORMAT_CHAT: _ClassVar[CorpusFormat]

class DocumentMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOCUMENT_MODE_UNSPECIFIED: _ClassVar[DocumentMode]
    DOCUMENT_MODE_BLANK_LINE: _ClassVar[DocumentMode]
    DOCUMENT_MODE_LINE: _ClassVar[DocumentMode]

class TokenizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKENIZER_KIND_UNSPECIFIED: _ClassVar[TokenizerKind]
    TOKENIZER_KIND_BPE: _ClassVar[TokenizerKind]
    TOKENIZER_KIND_CHAR: _ClassVar[TokenizerKind]
    TOKENIZER_KIND_MODEL: _ClassVar[TokenizerKind]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_PENDING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
CORPUS_FORMAT_UNSPECIFIED: CorpusFormat
CORPUS_FORMAT_TEXT: CorpusFormat
CORPUS_FORMAT_JSONL: CorpusFormat
CORPUS_FORMAT_PAIRS: CorpusFormat
CORPUS_FORMAT_CHAT: CorpusFormat
DOCUMENT_MODE_UNSPECIFIED: DocumentMode
DOCUMENT_MODE_BLANK_LINE: DocumentMode
DOCUMENT_MODE_LINE: DocumentMode
TOKENIZER_KIND_UNSPECIFIED: TokenizerKind
TOKENIZER_KIND_BPE: TokenizerKind
TOKENIZER_KIND_CHAR: TokenizerKind
TOKENIZER_KIND_MODEL: TokenizerKind
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_PENDING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_FAILED: VersionState

class SplitFractions(_message.Message):
    __slots__ = ("train", "validation", "test", "calibration")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    train: float
    validation: float
    test: float
    calibration: float
    def __init__(self, train: _Optional[float] = ..., validation: _Optional[float] = ..., test: _Optional[float] = ..., calibration: _Optional[float] = ...) -> None: ...

class DatasetOptions(_message.Message):
    __slots__ = ("name", "format", "text_field", "document_mode", "tokenizer", "vocab_size", "split_seed", "fractions", "min_doc_chars", "max_doc_chars", "source_uri", "prompt_field", "completion_field", "wait", "near_dup_threshold", "tokenizer_model", "tokenizer_model_version", "purpose")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_MODE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SEED_FIELD_NUMBER: _ClassVar[int]
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DOC_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOC_CHARS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: CorpusFormat
    text_field: str
    document_mode: DocumentMode
    tokenizer: TokenizerKind
    vocab_size: int
    split_seed: int
    fractions: SplitFractions
    min_doc_chars: int
    max_doc_chars: int
    source_uri: str
    prompt_field: str
    completion_field: str
    wait: bool
    near_dup_threshold: float
    tokenizer_model: str
    tokenizer_model_version: int
    purpose: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[CorpusFormat, str]] = ..., text_field: _Optional[str] = ..., document_mode: _Optional[_Union[DocumentMode, str]] = ..., tokenizer: _Optional[_Union[TokenizerKind, str]] = ..., vocab_size: _Optional[int] = ..., split_seed: _Optional[int] = ..., fractions: _Optional[_Union[SplitFractions, _Mapping]] = ..., min_doc_chars: _Optional[int] = ..., max_doc_chars: _Optional[int] = ..., source_uri: _Optional[str] = ..., prompt_field: _Optional[str] = ..., completion_field: _Optional[str] = ..., wait: _Optional[bool] = ..., near_dup_threshold: _Optional[float] = ..., tokenizer_model: _Optional[str] = ..., tokenizer_model_version: _Optional[int] = ..., purpose: _Optional[str] = ...) -> None: ...

class CreateDatasetRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: DatasetOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[DatasetOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class CreateDatasetResponse(_message.Message):
    __slots__ = ("version", "created")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    version: DatasetVersion
    created: bool
    def __init__(self, version: _Optional[_Union[DatasetVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class SplitStats(_message.Message):
    __slots__ = ("name", "documents", "tokens", "bytes", "shards", "near_duplicates", "leaked_exact", "leaked_near", "loss_tokens", "loss_masks", "examples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    LEAKED_EXACT_FIELD_NUMBER: _ClassVar[int]
    LEAKED_NEAR_FIELD_NUMBER: _ClassVar[int]
    LOSS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASKS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    documents: int
    tokens: int
    bytes: int
    shards: _containers.RepeatedScalarFieldContainer[str]
    near_duplicates: int
    leaked_exact: int
    leaked_near: int
    loss_tokens: int
    loss_masks: _containers.RepeatedScalarFieldContainer[str]
    examples: str
    def __init__(self, name: _Optional[str] = ..., documents: _Optional[int] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., shards: _Optional[_Iterable[str]] = ..., near_duplicates: _Optional[int] = ..., leaked_exact: _Optional[int] = ..., leaked_near: _Optional[int] = ..., loss_tokens: _Optional[int] = ..., loss_masks: _Optional[_Iterable[str]] = ..., examples: _Optional[str] = ...) -> None: ...

class CleaningStats(_message.Message):
    __slots__ = ("documents_in", "documents_out", "too_short", "too_long", "exact_duplicates", "near_duplicates", "leaked_exact", "leaked_near")
    DOCUMENTS_IN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_OUT_FIELD_NUMBER: _ClassVar[int]
    TOO_SHORT_FIELD_NUMBER: _ClassVar[int]
    TOO_LONG_FIELD_NUMBER: _ClassVar[int]
    EXACT_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    LEAKED_EXACT_FIELD_NUMBER: _ClassVar[int]
    LEAKED_NEAR_FIELD_NUMBER: _ClassVar[int]
    documents_in: int
    documents_out: int
    too_short: int
    too_long: int
    exact_duplicates: int
    near_duplicates: int
    leaked_exact: int
    leaked_near: int
    def __init__(self, documents_in: _Optional[int] = ..., documents_out: _Optional[int] = ..., too_short: _Optional[int] = ..., too_long: _Optional[int] = ..., exact_duplicates: _Optional[int] = ..., near_duplicates: _Optional[int] = ..., leaked_exact: _Optional[int] = ..., leaked_near: _Optional[int] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("kind", "vocab_size", "eos_token_id", "pad_token_id", "prefix", "dtype", "sha256", "model_name", "model_version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    prefix: str
    dtype: str
    sha256: str
    model_name: str
    model_version: int
    def __init__(self, kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., prefix: _Optional[str] = ..., dtype: _Optional[str] = ..., sha256: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class DatasetVersion(_message.Message):
    __slots__ = ("name", "version", "state", "error", "digest", "options", "splits", "cleaning", "tokenizer", "objects", "manifest_key", "source_bytes", "created_at", "finished_at", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    CLEANING_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: VersionState
    error: str
    digest: str
    options: DatasetOptions
    splits: _containers.RepeatedCompositeFieldContainer[SplitStats]
    cleaning: CleaningStats
    tokenizer: TokenizerInfo
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.StoredObject]
    manifest_key: str
    source_bytes: int
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    tenant: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., error: _Optional[str] = ..., digest: _Optional[str] = ..., options: _Optional[_Union[DatasetOptions, _Mapping]] = ..., splits: _Optional[_Iterable[_Union[SplitStats, _Mapping]]] = ..., cleaning: _Optional[_Union[CleaningStats, _Mapping]] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., objects: _Optional[_Iterable[_Union[_common_pb2.StoredObject, _Mapping]]] = ..., manifest_key: _Optional[str] = ..., source_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class WatchIngestRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WatchIngestResponse(_message.Message):
    __slots__ = ("progress", "bytes_done", "documents_done", "state", "version")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_DONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    bytes_done: int
    documents_done: int
    state: VersionState
    version: DatasetVersion
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., bytes_done: _Optional[int] = ..., documents_done: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., version: _Optional[_Union[DatasetVersion, _Mapping]] = ...) -> None: ...

class GetDatasetVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetDatasetVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: DatasetVersion
    def __init__(self, version: _Optional[_Union[DatasetVersion, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page",)
    PAGE_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class DatasetSummary(_message.Message):
    __slots__ = ("name", "version_count", "latest", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version_count: int
    latest: DatasetVersion
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version_count: _Optional[int] = ..., latest: _Optional[_Union[DatasetVersion, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "page")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetSummary]
    page: _common_pb2.PageResponse
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetSummary, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class ListDatasetVersionsRequest(_message.Message):
    __slots__ = ("name", "page")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    page: _common_pb2.PageRequest
    def __init__(self, name: _Optional[str] = ..., page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListDatasetVersionsResponse(_message.Message):
    __slots__ = ("versions", "page")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[DatasetVersion]
    page: _common_pb2.PageResponse
    def __init__(self, versions: _Optional[_Iterable[_Union[DatasetVersion, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class DeleteDatasetVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteDatasetVersionResponse(_message.Message):
    __slots__ = ("objects_deleted",)
    OBJECTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    objects_deleted: int
    def __init__(self, objects_deleted: _Optional[int] = ...) -> None: ...
