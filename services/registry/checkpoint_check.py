"""Verify an unpacked Hugging Face model directory before the registry takes it: run as a subprocess.

`python -m services.registry.checkpoint_check DIR [FULL_LOAD_MAX_BYTES]` prints one JSON line:
`{"ok": true, "architecture", "model_type", "parameters", "weights_bytes", "loaded"}` or
`{"ok": false, "reason"}`. It runs in its own process so that importing torch and transformers, and
whatever a hostile checkpoint makes them do, never touches the registry's event loop or memory.

What it checks, never running remote code (`trust_remote_code=False`, no `auto_map`, no `.py` files):
- `config.json` loads with `AutoConfig` and names a supported architecture;
- the weights are safetensors (pickles can run code), one file or shards listed by
  `model.safetensors.index.json`, and every tensor's name and shape matches the model the config
  describes. The model is built on the meta device and the shapes read from the safetensors headers,
  so this costs no memory whatever the model's size;
- the tokenizer (`tokenizer.json` required: it is the tokenizer's identity) loads with `AutoTokenizer`
  and fits in the embedding;
- models whose weights are at most FULL_LOAD_MAX_BYTES are also loaded for real with `from_pretrained`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# model_type → what llmp can train, export and serve from it.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FULL_LOAD_MAX_BYTES = 2 * 1024**3  # default: larger models are checked by shape only


class Rejected(Exception):
    """The directory is not an importable checkpoint; the message says why."""


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Rejected(f"{path.name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise Rejected(f"{path.name} must hold a JSON object")
    return value


def check_files(folder: Path) -> None:
    """Refuse what could run code or cannot be read without pickle, before anything is loaded."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.suffix == ".py":
            raise Rejected(f"{relative}: Python files (remote code) are not accepted")
        if path.name.endswith(PICKLED):
            raise Rejected(f"{relative}: pickled weights can run code; only safetensors are accepted "
                           "(save_pretrained(..., safe_serialization=True))")
    if not (folder / "config.json").is_file():
        raise Rejected("config.json is missing at the top of the archive")
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file() and "auto_map" in _json(folder / name):
            raise Rejected(f"{name} has auto_map: it asks for remote code, which llmp never runs")


def load_config(folder: Path):
    from transformers import AutoConfig

    model_type = _json(folder / "config.json").get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Rejected(f"config.json model_type {model_type!r} is not supported: "
                       f"one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds for a config it cannot read
        raise Rejected(f"config.json does not load: {error}") from None


def model_class(config):
    """The class the config's `architectures` names, when transformers has it and it fits the model type."""
    import transformers

    names = config.architectures or []
    if len(names) != 1:
        raise Rejected(f"config.json architectures must name one class, not {names!r}")
    cls = getattr(transformers, names[0], None)
    if cls is None or not isinstance(cls, type) or getattr(cls, "config_class", None) is not type(config):
        raise Rejected(f"config.json architecture {names[0]!r} is not a transformers class for "
                       f"model_type {config.model_type!r}")
    return cls


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no tensor data read); shards per the index."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        weight_map = _json(folder / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Rejected(f"{INDEX} has no weight_map")
        shards = sorted(set(weight_map.values()))
        present = sorted(p.name for p in folder.glob("*.safetensors"))
        if missing := [shard for shard in shards if shard not in present]:
            raise Rejected(f"{INDEX} lists shards that are not in the archive: {missing}")
        if unlisted := [name for name in present if name not in shards]:
            raise Rejected(f"safetensors files not in {INDEX}: {unlisted}")
    elif (folder / SINGLE).is_file():
        weight_map, shards = None, [SINGLE]
    else:
        raise Rejected(f"no weights: the archive needs {SINGLE}, or shards with {INDEX}")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in shapes:
                        raise Rejected(f"tensor {key} is stored twice (again in {shard})")
                    if weight_map is not None and weight_map.get(key) != shard:
                        raise Rejected(f"tensor {key} is in {shard} but {INDEX} puts it in {weight_map.get(key)!r}")
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Rejected:
            raise
        except Exception as error:  # a truncated or corrupt header
            raise Rejected(f"{shard} is not a readable safetensors file: {error}") from None
    if weight_map is not None and (unstored := sorted(set(weight_map) - set(shapes))):
        raise Rejected(f"{INDEX} maps tensors that no shard holds: {unstored[:5]}")
    return shapes


def check_weights(config, cls, stored: dict[str, tuple[int, ...]]) -> int:
    """Match the stored tensors against the model the config describes (built on the meta device);
    returns its number of parameters."""
    import torch

    with torch.device("meta"):
        model = cls._from_config(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    prefix = model.base_model_prefix + "." if model.base_model_prefix else ""
    ignored = [re.compile(pattern) for pattern in (cls._keys_to_ignore_on_load_unexpected or [])]
    found: set[str] = set()
    for key, shape in sorted(stored.items()):
        # A checkpoint of the bare model (BertModel) stores keys without the head's prefix, and vice versa.
        name = next((c for c in (key, prefix + key, key.removeprefix(prefix)) if c in expected), None)
        if name is None:
            if any(pattern.search(key) for pattern in ignored):
                continue
            raise Rejected(f"weights do not match config.json: tensor {key} {list(shape)} has no place in a "
                           f"{cls.__name__} with this config")
        if expected[name] != shape:
            raise Rejected(f"weights do not match config.json: tensor {key} has shape {list(shape)}, "
                           f"the config gives {list(expected[name])}")
        found.add(name)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | set(cls._tied_weights_keys or {})
    tying = getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = sorted(name for name in set(expected) - found if not (tying and name in tied))
    if missing:
        raise Rejected(f"weights do not match config.json: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    return sum(value.numel() for value in model.parameters())


def check_tokenizer(folder: Path, config) -> None:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise Rejected("tokenizer.json is missing: llmp identifies a model's tokenizer by it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:
        raise Rejected(f"the tokenizer does not load: {error}") from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise Rejected(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {vocab} rows "
                       "(config.json vocab_size)")


def verify(folder: Path, full_load_max_bytes: int = FULL_LOAD_MAX_BYTES) -> dict:
    check_files(folder)
    config = load_config(folder)
    cls = model_class(config)
    parameters = check_weights(config, cls, weight_shapes(folder))
    check_tokenizer(folder, config)
    weights_bytes = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    loaded = weights_bytes <= full_load_max_bytes
    if loaded:
        try:
            cls.from_pretrained(folder, trust_remote_code=False)
        except Exception as error:
            raise Rejected(f"the weights do not load with {cls.__name__}.from_pretrained: {error}") from None
    return {"ok": True, "architecture": cls.__name__, "model_type": config.model_type, "parameters": parameters,
            "weights_bytes": weights_bytes, "loaded": loaded}


def main(argv: list[str]) -> int:
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub
    logging.disable(logging.WARNING)
    folder = Path(argv[0])
    limit = int(argv[1]) if len(argv) > 1 else FULL_LOAD_MAX_BYTES
    try:
        result = verify(folder, limit)
    except Rejected as error:
        result = {"ok": False, "reason": str(error)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
