"""What llmp's services and the gateway agree on, each defined once and read from here by all of them.

- `paths`: where every service's objects live in the bucket (datasets, stored corpora, jobs, models);
- `names`: the name rule and the limits the gateway and the services both enforce;
- `manifest`: a dataset version's `manifest.json` as a type, with one reading policy;
- `serving`: the served model's description (`DecoderSpec`) and its Triton model name;
- `chat`: how a conversation is rendered to text (datasets and chat serving render it alike).

docs/CONTRACTS.md explains them; this package is their definition. Everything public is re-exported
here, so callers write `contracts.dataset_manifest_key(...)`.
"""

from services.common.contracts.chat import (
    ANSWER_ROLE,
    CHAT_SPECIAL_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    END_OF_TURN,
    ROLES,
    TURN_START,
    pair_messages,
)
from services.common.contracts.manifest import (
    CORPUS_FORMATS,
    EVALUATION_SPLITS,
    EXAMPLE_INDEX_DTYPE,
    LOSS_MASK_DTYPE,
    SPLITS,
    SUPERVISED_FORMATS,
    TOKEN_DTYPES,
    TOKENIZER_KINDS,
    DatasetManifest,
    ManifestObject,
    SplitManifest,
    TokenizerManifest,
    evaluated_splits,
)
from services.common.contracts.names import (
    DEFAULT_PAGE_SIZE,
    DISTRIBUTED_MODES,
    EXPORT_FORMATS,
    MAX_CHOICES,
    MAX_IDEMPOTENCY_KEY,
    MAX_PAGE_SIZE,
    MAX_PENALTY,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MAX_VERSION,
    MAX_VOCAB_SIZE,
    MIN_PRIORITY,
    MIN_VOCAB_SIZE,
    MODEL_FAMILIES,
    NAME,
    NAME_PATTERN,
    NAME_RULE,
    PAGE_TOKEN_PATTERN,
    PRECISIONS,
    TENANT_PATTERN,
    TEXT_PATTERN,
    ecma_regex,
    page_size,
    validate_export_format,
    validate_name,
    validate_version,
)
from services.common.contracts.paths import (
    DATASET_MANIFEST,
    DATASET_TOKENIZER,
    DATASETS,
    EXPORTS,
    IMPORTS,
    JOBS,
    MODELS,
    SOURCES,
    JobLayout,
    dataset_corpus_key,
    dataset_examples_key,
    dataset_loss_mask_key,
    dataset_manifest_key,
    dataset_shard_key,
    dataset_tokenizer_prefix,
    dataset_version_prefix,
    export_dir,
    import_prefix,
    job_prefix,
    loss_mask_file_name,
    model_export_prefix,
    model_version_prefix,
    parse_model_version_key,
    registrable_prefixes,
    shard_file_name,
    within_dataset_version,
)
from services.common.contracts.serving import (
    DECODER_SPEC_FILE,
    ONNX_DATA_FILE,
    ONNX_GRAPH_FILE,
    DecoderSpec,
    onnx_files,
    triton_model_name,
)

__all__ = [
    "ANSWER_ROLE", "CHAT_SPECIAL_TOKENS", "DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "ROLES", "TURN_START",
    "pair_messages",
    "CORPUS_FORMATS", "EXAMPLE_INDEX_DTYPE", "LOSS_MASK_DTYPE", "SUPERVISED_FORMATS", "dataset_examples_key",
    "dataset_loss_mask_key", "loss_mask_file_name",
    "DATASETS", "DATASET_MANIFEST", "DATASET_TOKENIZER", "DECODER_SPEC_FILE", "DEFAULT_PAGE_SIZE",
    "DISTRIBUTED_MODES", "EXPORTS", "EXPORT_FORMATS", "IMPORTS", "JOBS", "MAX_IDEMPOTENCY_KEY", "MAX_PAGE_SIZE",
    "MAX_PRIORITY", "MAX_PROMPT_CHARS", "MAX_STOP_LENGTH", "MAX_STOP_SEQUENCES", "MAX_TEMPERATURE",
    "MAX_PENALTY", "MAX_CHOICES", "MAX_TOP_LOGPROBS", "MAX_VERSION",
    "MAX_VOCAB_SIZE",
    "MIN_PRIORITY", "MIN_VOCAB_SIZE", "MODELS", "MODEL_FAMILIES", "NAME", "NAME_PATTERN", "NAME_RULE", "ONNX_DATA_FILE",
    "ONNX_GRAPH_FILE", "PAGE_TOKEN_PATTERN", "PRECISIONS",
    "SOURCES", "SPLITS", "EVALUATION_SPLITS", "evaluated_splits", "TOKENIZER_KINDS", "TOKEN_DTYPES",
    "DatasetManifest", "DecoderSpec", "JobLayout",
    "ManifestObject", "SplitManifest", "TENANT_PATTERN", "TEXT_PATTERN", "TokenizerManifest", "dataset_corpus_key",
    "dataset_manifest_key",
    "dataset_shard_key", "dataset_tokenizer_prefix", "dataset_version_prefix", "export_dir", "import_prefix",
    "job_prefix", "model_export_prefix", "model_version_prefix", "ecma_regex", "onnx_files", "page_size",
    "parse_model_version_key", "registrable_prefixes",
    "shard_file_name", "triton_model_name", "validate_export_format", "validate_name", "validate_version",
    "within_dataset_version",
]
