"""The name rule and the limits the gateway and the services both enforce.

The gateway's JSON schemas and query checks read these values, and so do the services that enforce
them again behind it, so a request the gateway lets through is never refused for a different bound.
"""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, ValidationFailed


def ecma_regex(pattern: str) -> re.Pattern:
    """`pattern` (a JSON Schema pattern: ECMA-262, where a final `$` is the end of the input) for Python,
    whose `$` also matches before a final "\n": without this, "chat\n" passed the name rule."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


# Datasets, models, aliases and deployments: also a path segment in S3 keys and part of Triton names.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME = ecma_regex(NAME_PATTERN)
NAME_RULE = "1-63 characters of lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
# Tenants: a path segment of every key and a part of Triton names, never a '.' (so `..` cannot appear).
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_VERSION = 2**63 - 1  # versions are int64 on the wire

MIN_PRIORITY, MAX_PRIORITY = -1000, 1000  # training job priority (SubmitJobRequest.priority)
MAX_IDEMPOTENCY_KEY = 255  # characters of a training submit's Idempotency-Key
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000  # common.v1.PageRequest.page_size: 0 means the default
# Free text kept in PostgreSQL (a key's name, an alias move's reason, a dataset's field names): any characters but
# NUL, which PostgreSQL text and jsonb cannot hold.
TEXT_PATTERN = r"^[^\u0000]*$"
# common.v1.PageRequest.page_token: the `next_page_token` a service issued, always URL-safe base64 with its
# padding (its content is the service's own); "" asks for the first page.
PAGE_TOKEN_PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?$"
MIN_VOCAB_SIZE = 260  # a BPE vocabulary: 256 byte symbols + the special tokens
MAX_VOCAB_SIZE = 65536  # a BPE vocabulary's largest size (0 asks for the default)
MAX_PROMPT_CHARS = 1_000_000  # characters of one prompt whatever the model: longer is refused before tokenizing
MAX_TEMPERATURE = 2.0  # sampling temperature; 0 is greedy
MAX_STOP_SEQUENCES = 4  # stop sequences of one completion
MAX_STOP_LENGTH = 64  # characters of one stop sequence
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
MAX_CHOICES = 16  # `n`: choices generated from one prompt
MAX_TOP_LOGPROBS = 20  # alternatives reported per generated token

# The values an enumerated field accepts, as the API spells them.
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")
MODEL_FAMILIES = ("gpt2", "bert", "t5")  # built from sizes (trained from scratch)
# Architectures a job may fine-tune from a registry version (`model.init_from`): the above and the
# pretrained causal decoders people import (Llama with grouped-query attention, Qwen2, Mistral).
FINETUNE_FAMILIES = (*MODEL_FAMILIES, "llama", "qwen2", "mistral")
ADAPTER_TYPES = ("lora",)  # parameter-efficient fine-tuning methods (`model.adapter.type`)
DISTRIBUTED_MODES = ("ddp", "local-sgd", "async")
PRECISIONS = ("fp32", "bf16")


def validate_name(value: str, what: str) -> str:
    """`value` when it follows the name rule, else ValidationFailed naming `what`."""
    if not NAME.match(value or ""):
        raise ValidationFailed(f"{what} {value!r} must be {NAME_RULE}")
    return value


def validate_version(value: int, what: str = "version") -> int:
    if not 1 <= value <= MAX_VERSION:
        raise ValidationFailed(f"{what} must be an integer from 1 to {MAX_VERSION}, not {value}")
    return value


def validate_export_format(value: str) -> str:
    if value not in EXPORT_FORMATS:
        raise ValidationFailed(f"export format {value!r} must be one of {', '.join(EXPORT_FORMATS)}")
    return value


def page_size(requested: int) -> int:
    """The page size a list call uses: the default for 0, capped at MAX_PAGE_SIZE; negative is refused."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, not {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
