"""`make demo`: the main job end to end through the REST gateway of a running stack.

1. a corpus (a file you name, else Python standard-library docstrings found on this machine) → dataset;
2. a small GPT-style decoder trained by a Celery-dispatched torchrun job, progress shown;
3. the registered model version exported to ONNX and deployed to Triton under an alias;
4. a completion from `POST /v1/completions`, printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import time
from pathlib import Path

from cli.client import ApiError, Client

DEMO_NAME = "demo"


def stdlib_docstrings(limit_bytes: int = 1_500_000) -> bytes:
    """JSONL of docstrings from the standard library's sources (parsed, never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    size = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    line = json.dumps({"text": doc})
                    lines.append(line)
                    size += len(line) + 1
        if size >= limit_bytes:
            break
    return ("\n".join(lines) + "\n").encode()


def step(number: int, text: str) -> None:
    print(f"\n[{number}/4] {text}", flush=True)


def wait_for(client: Client, path: str, field: str, done: set[str], failed: set[str], timeout: float,
             show=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resource = client.call("GET", path)
        if show:
            show(resource)
        state = resource.get(field, "")
        if state in done:
            return resource
        if state in failed:
            raise SystemExit(f"{path} ended {state}: {resource.get('error') or resource.get('message') or resource}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} still {state} after {timeout:.0f}s")
        time.sleep(1)


def progress_bar(done: float, total: float, width: int = 30) -> str:
    fraction = 0.0 if not total else min(1.0, float(done) / float(total))
    filled = int(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:5.1f}%"


def run(client: Client, corpus: bytes, max_steps: int, prompt: str) -> str:
    step(1, f"dataset from a {len(corpus) / 1e6:.1f} MB corpus")
    created = client.upload("/v1/datasets", corpus,
                            query={"name": DEMO_NAME, "tokenizer": "char", "format": "jsonl"})
    version = created["version"]
    dataset = wait_for(client, f"/v1/datasets/{DEMO_NAME}/versions/{version}", "state", {"READY"}, {"FAILED"}, 600)
    splits = dataset.get("splits", {})
    print("  splits:", ", ".join(f"{name} {info.get('tokens', '?')} tokens" for name, info in splits.items()))

    step(2, f"training a small GPT-2 for {max_steps} steps (Celery → torchrun)")
    job = client.call("POST", "/v1/training-jobs", {
        "dataset": {"name": DEMO_NAME, "version": version},
        "model": {"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0},
        "hyperparameters": {"batch_size": 16, "max_steps": max_steps, "learning_rate": 3e-3,
                            "min_learning_rate": 3e-4, "warmup_steps": 20, "eval_interval": max(10, max_steps // 4),
                            "seed": 1337, "precision": "fp32"},
        "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    }, headers={"Idempotency-Key": f"demo-{version}-{max_steps}"})

    def show(resource: dict) -> None:
        progress = resource.get("progress") or {}
        loss = ((resource.get("latest_metrics") or {}).get("values") or {}).get("train_loss")
        print(f"\r  {resource.get('state', ''):10s} {progress_bar(progress.get('done', 0), progress.get('total', 0))}"
              + (f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""), end="", flush=True)

    finished = wait_for(client, f"/v1/training-jobs/{job['id']}", "state", {"SUCCEEDED"},
                        {"FAILED", "CANCELLED"}, 1800, show=show)
    print()
    model = finished["model_version"]
    print(f"  registered {model['name']} v{model['version']}")

    step(3, "export to ONNX and deploy to Triton")
    client.call("POST", f"/v1/models/{model['name']}/versions/{model['version']}/exports", {"format": "onnx"})
    wait_for(client, f"/v1/models/{model['name']}/versions/{model['version']}", "state", {"READY"}, {"FAILED"}, 60)
    deadline = time.monotonic() + 900
    while True:
        version_info = client.call("GET", f"/v1/models/{model['name']}/versions/{model['version']}")
        onnx = [e for e in version_info.get("exports", []) if e.get("format") == "onnx"]
        if onnx and onnx[0].get("state") == "READY":
            break
        if onnx and onnx[0].get("state") == "FAILED":
            raise SystemExit(f"ONNX export failed: {onnx[0]}")
        if time.monotonic() > deadline:
            raise SystemExit("ONNX export did not finish in time")
        time.sleep(2)
    client.put_conditionally(f"/v1/models/{model['name']}/aliases/production", {"version": model["version"]})
    deployment_path = f"/v1/deployments/{DEMO_NAME}"
    client.put_conditionally(deployment_path, {"model": model["name"], "stable": "production"})
    wait_for(client, deployment_path, "state", {"READY"}, {"FAILED"}, 600)
    print(f"  deployment {DEMO_NAME} → {model['name']}@production (v{model['version']}) READY")

    step(4, "completion through POST /v1/completions")
    answer = client.call("POST", "/v1/completions", {"model": DEMO_NAME, "prompt": prompt, "max_tokens": 80,
                                                     "temperature": 0.8, "top_p": 0.95, "seed": 7})
    text = answer["choices"][0]["text"]
    print(f"  prompt: {prompt!r}\n  completion: {text!r}\n  usage: {answer.get('usage')}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="a JSONL file with a `text` field (default: stdlib docstrings)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--prompt", default="Return the ")
    options = parser.parse_args(argv)
    corpus = options.corpus.read_bytes() if options.corpus else stdlib_docstrings()
    try:
        run(Client(), corpus, options.max_steps, options.prompt)
    except ApiError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
