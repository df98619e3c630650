"""`llmp dataset|train|jobs|models|deploy|complete|keys`: the REST API from the command line.

Tables for people, `--json` for scripts. Long work shows progress on stderr (cli/progress.py), so stdout
carries only the result: a dataset upload counts the bytes as they are sent, `--watch` follows an ingest
or a training job live from its Server-Sent Events (resumed with Last-Event-ID if the connection drops).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cli import model_archive
from cli.client import ApiError, Client
from cli.progress import Progress

FINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}
IMPORT_ANSWER_TIMEOUT = 900.0  # seconds to wait for an import's answer after the last byte was sent
DEPLOY_POLL_S = 1.0  # how often `deploy --wait` looks at the deployment


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.key)


def _print(args: argparse.Namespace, payload, columns: list[str] | None = None, rows_key: str | None = None) -> None:
    if args.json or columns is None:
        print(json.dumps(payload, indent=2))
        return
    rows = payload.get(rows_key, []) if rows_key else [payload]
    widths = {c: max([len(c)] + [len(str(_get(row, c))) for row in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(_get(row, c)).ljust(widths[c]) for c in columns))


def _get(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return value


def dataset_create(args) -> int:
    query = {"name": args.name, "tokenizer": args.tokenizer, "format": args.format, "vocab_size": args.vocab_size,
             "split_seed": args.split_seed, "tokenizer_model": args.tokenizer_model,
             "tokenizer_model_version": args.tokenizer_model_version, "purpose": args.purpose}
    data = Path(args.file)
    client = _client(args)
    bar = Progress(f"upload {data.name}", data.stat().st_size, "bytes")
    try:
        created = client.upload("/v1/datasets", data, query=query,
                                progress=lambda sent, total: bar.update(sent, total))
    finally:
        bar.close()
    if args.watch and created.get("state") == "PENDING":
        created = watch_ingest(client, created["name"], created["version"])
    _print(args, created, ["name", "version", "state"])
    return 1 if created.get("state") == "FAILED" else 0


def watch_ingest(client: Client, name: str, version: int) -> dict:
    """Follow a version's ingest (cleaning, tokenizing, packing) until READY or FAILED; the final version."""
    bar = Progress("ingest", 0, "")
    final: dict | None = None
    try:
        for event in client.follow(f"/v1/datasets/{name}/versions/{version}/events"):
            progress = event.data.get("progress") or {}
            bar.unit, bar.total = progress.get("unit") or "", int(progress.get("total") or 0)  # per phase
            bar.update(int(progress.get("done") or 0), label=f"ingest {progress.get('phase') or ''}".strip())
            if event.data.get("version"):
                final = event.data["version"]
                break
    finally:
        bar.close(note=(final or {}).get("state"))
    return final if final is not None else client.call("GET", f"/v1/datasets/{name}/versions/{version}")


def dataset_list(args) -> int:
    _print(args, _client(args).call("GET", "/v1/datasets"), ["name", "latest_version"], "datasets")
    return 0


def dataset_show(args) -> int:
    path = f"/v1/datasets/{args.name}" + (f"/versions/{args.version}" if args.version else "")
    _print(args, _client(args).call("GET", path))
    return 0


def job_spec(args) -> dict:
    """The POST /v1/training-jobs body `llmp train` sends: --spec as it is, else one built from the flags."""
    if args.spec:
        return json.loads(Path(args.spec).read_text())
    hyperparameters = {"max_steps": args.max_steps, "batch_size": args.batch_size,
                       "learning_rate": args.learning_rate}
    if args.warmup_steps is not None:
        hyperparameters["warmup_steps"] = args.warmup_steps
    spec = {
        "dataset": {"name": args.dataset, "version": args.dataset_version},
        "model": model_spec(args),
        "hyperparameters": hyperparameters,
        "distributed": {"mode": args.mode, "nproc_per_node": args.nproc_per_node, "nnodes": 1},
    }
    if args.model_name:
        spec["model_name"] = args.model_name
    return spec


def train(args) -> int:
    spec = job_spec(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    job = _client(args).call("POST", "/v1/training-jobs", spec, headers=headers)
    if not args.watch:
        _print(args, job, ["id", "state"])
        return 0
    print(f"job {job['id']} submitted", file=sys.stderr)  # stdout gets only the finished job (one JSON document)
    return watch(args, job["id"])


def model_version(text: str) -> dict:
    """NAME:VERSION (`--init-from my-llama:1`) as a model reference; argparse reports the error."""
    name, _, version = text.rpartition(":")
    if not name or not version.isdigit() or int(version) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:VERSION (e.g. my-llama:1)")
    return {"name": name, "version": int(version)}


def model_spec(args) -> dict:
    """The job's `model`: a from-scratch shape, or with --init-from a registry version to fine-tune (its
    architecture and sizes are the version's own, so only the context is sent); with --lora or a --lora-*
    flag, a LoRA adapter whose unset fields the training service fills in (the architecture's targets…)."""
    if args.init_from:
        model: dict = {"init_from": args.init_from, "block_size": args.block_size}
        if args.family:
            model["family"] = args.family
    else:
        model = {"family": args.family or "gpt2", "n_layer": args.n_layer, "n_head": args.n_head,
                 "n_embd": args.n_embd, "block_size": args.block_size}
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "target_modules": args.lora_targets.split(",") if args.lora_targets else None}
    if args.lora or any(value is not None for value in lora.values()):
        # Sent without --init-from too: the gateway's 422 says an adapter needs one, rather than a silent
        # full training from scratch.
        model["adapter"] = {"type": "lora", **{key: value for key, value in lora.items() if value is not None}}
    return model


def watch(args, job_id: str | None = None) -> int:
    """Follow a job until it ends, live from its event stream (`GET /v1/training-jobs/{id}/events`), with a
    progress bar of its steps and its latest training loss."""
    client = _client(args)
    job_id = job_id or args.id
    job = client.call("GET", f"/v1/training-jobs/{job_id}")
    progress = job.get("progress") or {}
    bar = Progress(job["state"], int(progress.get("total") or 0), "steps")
    bar.update(int(progress.get("done") or 0))
    try:
        if job["state"] not in FINAL_JOB_STATES:
            for event in client.follow(f"/v1/training-jobs/{job_id}/events"):
                if follow_job_event(bar, event.event, event.data):
                    break
    finally:
        bar.close()
    job = client.call("GET", f"/v1/training-jobs/{job_id}")
    _print(args, job, ["id", "state", "model_version.name", "model_version.version", "error"])
    return 0 if job["state"] == "SUCCEEDED" else 1


def follow_job_event(bar: Progress, kind: str, data: dict) -> bool:
    """Show one training job event on `bar`; True when it put the job in a final state."""
    if kind == "progress":
        progress = data.get("progress") or {}
        bar.update(int(progress.get("done") or 0), int(progress.get("total") or 0))
    elif kind == "metrics":
        loss = ((data.get("metrics") or {}).get("values") or {}).get("train_loss")
        if loss is not None:
            bar.update(note=f"loss {loss:.4f}")
    elif kind == "state_changed":
        state = (data.get("state_changed") or {}).get("state", "")
        bar.update(label=state)
        return state in FINAL_JOB_STATES
    return False


def jobs_list(args) -> int:
    _print(args, _client(args).call("GET", "/v1/training-jobs"), ["id", "state", "progress.done", "progress.total"],
           "jobs")
    return 0


def jobs_cancel(args) -> int:
    _print(args, _client(args).call("DELETE", f"/v1/training-jobs/{args.id}"), ["id", "state"])
    return 0


EVAL_COLUMNS = ["id", "state", "model.name", "model.version", "dataset.name", "dataset.version", "split",
                "metrics.loss", "metrics.perplexity", "metrics.token_accuracy", "metrics.expected_calibration_error",
                "contamination.share", "contamination.clean_metrics.loss"]


def eval_create(args) -> int:
    client = _client(args)
    body = {"model": {"name": args.model, "version": args.version},
            "dataset": {"name": args.dataset, "version": args.dataset_version}, "split": args.split}
    if args.exclude_contaminated:
        body["exclude_contaminated"] = True
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    evaluation = client.call("POST", "/v1/evaluations", body, headers=headers)
    if args.wait:
        evaluation = client.wait_until(f"/v1/evaluations/{evaluation['id']}",
                                       lambda e: e["state"] in FINAL_JOB_STATES, args.timeout)
    _print(args, evaluation, EVAL_COLUMNS)
    return 0 if evaluation["state"] != "FAILED" else 1


def eval_list(args) -> int:
    query = {"model": args.model, "version": args.version}
    _print(args, _client(args).call("GET", "/v1/evaluations", query={k: v for k, v in query.items() if v}),
           EVAL_COLUMNS, "evaluations")
    return 0


def eval_show(args) -> int:
    _print(args, _client(args).call("GET", f"/v1/evaluations/{args.id}"))
    return 0


def models_list(args) -> int:
    _print(args, _client(args).call("GET", "/v1/models"), ["name", "latest_version", "version_count"], "models")
    return 0


def models_show(args) -> int:
    path = f"/v1/models/{args.name}" + (f"/versions/{args.version}" if args.version else "")
    _print(args, _client(args).call("GET", path))
    return 0


def models_alias(args) -> int:
    client = _client(args)
    path = f"/v1/models/{args.name}/aliases/{args.alias}"
    _print(args, client.put_conditionally(path, {"version": args.version, "reason": args.reason}))
    return 0


def models_export(args) -> int:
    _print(args, _client(args).call("POST", f"/v1/models/{args.name}/versions/{args.version}/exports",
                                    {"format": args.format}), ["format", "state"])
    return 0


def models_import(args) -> int:
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        print(f"error: {folder} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 1
    chunks, total = model_archive.archive(folder)
    # The answer comes once the registry has verified the upload (a subprocess loading it): minutes for a
    # large model, longer than the default read timeout.
    client = Client(args.url, args.key, timeout=IMPORT_ANSWER_TIMEOUT)
    bar = Progress(f"upload {folder.name}", total, "bytes")
    try:
        created = client.upload(f"/v1/models/{args.name}/imports", (chunks, total),
                                query={"description": args.description or None}, content_type="application/x-tar",
                                progress=lambda sent, size: bar.update(sent, size))
    finally:
        bar.close()
    if created.get("state") == "PENDING" and not args.no_wait:
        path = f"/v1/models/{created['name']}/imports/{created['version']}"
        waiting = Progress(f"store {created['name']} v{created['version']}", 0, "")
        try:
            created = client.wait_until(path, lambda status: status["state"] != "PENDING", args.timeout)
        finally:
            waiting.close(created.get("state", ""))
    _print(args, created, ["name", "version", "state", "architecture", "error"])
    return 1 if created.get("state") == "FAILED" else 0


def models_download(args) -> int:
    destination = Path(args.dir)
    if destination.exists() and any(destination.iterdir()):
        print(f"error: {destination} is not empty", file=sys.stderr)
        return 1
    bar = Progress(f"download {args.name} v{args.version}", 0, "bytes")
    try:
        chunks = _client(args).download(f"/v1/models/{args.name}/versions/{args.version}/download",
                                        progress=lambda received, total: bar.update(received, total))
        files = model_archive.extract(chunks, destination)
    finally:
        bar.close()
    _print(args, {"name": args.name, "version": args.version, "directory": str(destination), "files": files},
           ["name", "version", "directory"])
    return 0


def deploy(args) -> int:
    client = _client(args)
    path = f"/v1/deployments/{args.name}"
    stable = int(args.stable) if args.stable.isdigit() else args.stable  # a version number or an alias
    body: dict = {"model": args.model, "stable": stable}
    if args.canary:
        body["canary"] = {"version": args.canary, "weight": args.canary_weight}
    deployment = client.put_conditionally(path, body)
    if not args.wait:
        _print(args, deployment, ["name", "state"])
        return 0
    # The phases on stderr as they come (EXPORTING when the version had no ONNX export yet, LOADING), then
    # the settled deployment on stdout.
    bar = Progress(f"deploy {deployment['state']}")
    deadline = time.monotonic() + args.timeout
    try:
        while deployment["state"] not in ("READY", "FAILED") and time.monotonic() < deadline:
            time.sleep(DEPLOY_POLL_S)
            deployment = client.call("GET", path)
            bar.update(label=f"deploy {deployment['state']}")
    finally:
        bar.close()
    _print(args, deployment, ["name", "state", "message"])
    return 0 if deployment["state"] == "READY" else 1


def complete(args) -> int:
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens,
            "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    answer = _client(args).call("POST", "/v1/completions", body)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(args.prompt + answer["choices"][0]["text"])
    return 0


def keys_create(args) -> int:
    body = {"tenant": args.tenant, "role": args.role, "name": args.name or ""}
    _print(args, _client(args).call("POST", "/v1/api-keys", body), ["id", "tenant", "role", "key"])
    return 0


def _run(handler):
    def wrapped(args) -> int:
        try:
            return handler(args)
        except ApiError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return wrapped


def register(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="gateway URL (default LLMP_URL or http://127.0.0.1:8080)")
    common.add_argument("--key", help="API key (default LLMP_API_KEY, LLMP_ADMIN_KEY or .llmp/admin.key)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def group(name: str, help_text: str) -> argparse._SubParsersAction:
        return commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)

    def command(parent, name: str, handler, help_text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, parents=[common])
        parser.set_defaults(func=_run(handler))
        return parser

    datasets = group("dataset", "create and inspect datasets")
    create = command(datasets, "create", dataset_create, "create a dataset version from a file")
    create.add_argument("file")
    create.add_argument("--name", required=True)
    create.add_argument("--tokenizer", choices=["char", "bpe", "model"], default="bpe",
                        help="model: the tokenizer of a registered model version (--tokenizer-model, "
                             "--tokenizer-model-version)")
    create.add_argument("--tokenizer-model", help="with --tokenizer model: the model's name")
    create.add_argument("--tokenizer-model-version", type=int, help="with --tokenizer model: its version")
    create.add_argument("--vocab-size", type=int)
    create.add_argument("--format", choices=["text", "jsonl", "pairs", "chat"], default="text",
                        help="pairs ({prompt, completion} lines) and chat ({messages} lines) are supervised: "
                             "the loss is on the answers only")
    create.add_argument("--split-seed", type=int)
    create.add_argument("--purpose", choices=["training", "evaluation"],
                        help="evaluation: an external test set, every document in test")
    create.add_argument("--watch", action="store_true", help="follow the ingest with a progress bar until READY")
    command(datasets, "list", dataset_list, "list datasets")
    show = command(datasets, "show", dataset_show, "show a dataset or one version")
    show.add_argument("name")
    show.add_argument("version", nargs="?")

    trainer = command(commands, "train", train, "submit a training job")
    trainer.add_argument("--spec", help="a JSON job spec (the POST /v1/training-jobs body); overrides the flags below")
    trainer.add_argument("--dataset")
    trainer.add_argument("--dataset-version", type=int, default=1)
    trainer.add_argument("--family", choices=["gpt2", "bert", "t5"],
                         help="from scratch (default gpt2); with --init-from the version's own architecture")
    trainer.add_argument("--init-from", metavar="NAME:VERSION", type=model_version,
                         help="fine-tune this registry version (trained or imported) instead of training from "
                              "scratch; every weight unless a --lora-* flag asks for a LoRA adapter")
    trainer.add_argument("--lora", action="store_true",
                         help="with --init-from: train a LoRA adapter (the --lora-* flags left out get defaults)")
    trainer.add_argument("--lora-r", type=int, help="LoRA rank (implies --lora)")
    trainer.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (alpha / r)")
    trainer.add_argument("--lora-dropout", type=float)
    trainer.add_argument("--lora-targets", metavar="a,b",
                         help="module names to adapt (default: the architecture's attention projections)")
    for flag, default in (("--n-layer", 2), ("--n-head", 4), ("--n-embd", 128), ("--block-size", 128),
                          ("--max-steps", 200), ("--batch-size", 16), ("--nproc-per-node", 1)):
        trainer.add_argument(flag, type=int, default=default)
    trainer.add_argument("--learning-rate", type=float, default=1e-3)
    trainer.add_argument("--warmup-steps", type=int, help="linear warmup steps (the service's default otherwise)")
    trainer.add_argument("--model-name", help="the registry model the trained version is added to")
    trainer.add_argument("--mode", choices=["ddp", "local-sgd", "async"], default="ddp")
    trainer.add_argument("--idempotency-key")
    trainer.add_argument("--watch", action="store_true", help="follow the job with a progress bar")

    jobs = group("jobs", "follow and cancel training jobs")
    command(jobs, "list", jobs_list, "list jobs")
    command(jobs, "watch", watch, "follow a job until it ends").add_argument("id")
    command(jobs, "cancel", jobs_cancel, "cancel a job").add_argument("id")

    evals = group("eval", "evaluate model versions on datasets and compare them")
    creator = command(evals, "create", eval_create, "evaluate a model version on a dataset split")
    creator.add_argument("model")
    creator.add_argument("version", type=int)
    creator.add_argument("--dataset", required=True)
    creator.add_argument("--dataset-version", type=int, default=1)
    creator.add_argument("--split", choices=["test", "validation", "calibration", "all"], default="test")
    creator.add_argument("--idempotency-key")
    creator.add_argument("--exclude-contaminated", action="store_true",
                         help="figures without the documents found in the model's training data")
    creator.add_argument("--wait", action="store_true", help="wait until it has its figures")
    creator.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    lister = command(evals, "list", eval_list, "list evaluations; of one model (and version) side by side")
    lister.add_argument("model", nargs="?")
    lister.add_argument("version", nargs="?", type=int)
    command(evals, "show", eval_show, "show one evaluation").add_argument("id")

    models = group("models", "the model registry")
    command(models, "list", models_list, "list models")
    show = command(models, "show", models_show, "show a model or one version")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    alias = command(models, "alias", models_alias, "point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    alias.add_argument("--reason", default="")
    export = command(models, "export", models_export, "export a version")
    export.add_argument("name")
    export.add_argument("version", type=int)
    export.add_argument("--format", choices=["onnx", "onnx-int8", "torchscript"], default="onnx")
    importer = command(models, "import", models_import,
                       "import a Hugging Face model directory (config.json, safetensors, tokenizer) as a new version")
    importer.add_argument("dir")
    importer.add_argument("--name", required=True, help="the model to add the version to")
    importer.add_argument("--description", default="")
    importer.add_argument("--no-wait", action="store_true", help="return once verified, while it is still PENDING")
    importer.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for READY")
    downloader = command(models, "download", models_download,
                         "download a version as a Hugging Face directory (loads with from_pretrained)")
    downloader.add_argument("name")
    downloader.add_argument("version", type=int)
    downloader.add_argument("dir", help="destination directory (created; must be empty)")

    deployer = command(commands, "deploy", deploy, "deploy a model to Triton (with an optional canary)")
    deployer.add_argument("name")
    deployer.add_argument("--model", required=True)
    deployer.add_argument("--stable", required=True, help="version number or alias")
    deployer.add_argument("--canary", type=int, help="canary version number")
    deployer.add_argument("--canary-weight", type=int, default=10)
    deployer.add_argument("--wait", action="store_true",
                          help="follow the phases (EXPORTING, LOADING) until READY or FAILED")
    deployer.add_argument("--timeout", type=float, default=1800, help="seconds --wait waits at most")

    completer = command(commands, "complete", complete, "generate a completion")
    completer.add_argument("model", help="deployment name")
    completer.add_argument("prompt")
    completer.add_argument("--max-tokens", type=int, default=64)
    completer.add_argument("--temperature", type=float, default=0.0)
    completer.add_argument("--seed", type=int)

    keys = group("keys", "API keys (admin)")
    creator = command(keys, "create", keys_create, "create an API key")
    creator.add_argument("--tenant", required=True)
    creator.add_argument("--role", choices=["admin", "developer", "inference"], required=True)
    creator.add_argument("--name")
