"""Evaluation jobs: a registered model version measured on a split of a dataset version.

The figures, over every predicted token of the split (nothing sampled):

- `loss`: mean next-token cross-entropy (nats); `perplexity` = exp(loss);
- `token_accuracy`: share of tokens whose most probable prediction is the right one;
- `expected_calibration_error`: predictions put in `ECE_BINS` equal-width bins of confidence (the top
  probability); the bins' |accuracy - mean confidence|, weighted by their share of tokens;
- `tokens`: how many tokens were predicted.

A plain split is read as consecutive windows of the model's context (the last one shorter), each window's
first token never predicted. A `pairs`/`chat` split is read as whole examples packed in rows in the
split's order (supervised.Rows, as training's evaluation does): only answer tokens count.

An evaluation is a job of kind `evaluation` in the training coordinator (coordinator.py): the same
queue machinery, leases, events and cancel. Its worker (`EvaluationRunner`, the Celery task
`llmp.training.run_evaluation`) records the running sums as a checkpoint event every
`CHECKPOINT_SECONDS`; an attempt that follows a lost worker resumes from those sums instead of starting over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common import contracts
from services.common.config import Settings
from services.common.db import Database
from services.common.errors import LlmpError, ValidationFailed
from services.common.s3 import ObjectStore
from services.training import contamination, data, supervised
from services.training.coordinator import RENEWAL_SHARE, Assignment, Coordinator, JobKind, JobState, Update, kept_lease
from services.training.models import IGNORE_INDEX

log = logging.getLogger(__name__)

ECE_BINS = 15
DEFAULT_BATCH_SIZE = 8
CHECKPOINT_SECONDS = 5.0  # how often the running sums are recorded (what a resumed attempt starts from)
METRICS = ("loss", "perplexity", "token_accuracy", "expected_calibration_error", "tokens")


@dataclass
class Sums:
    """The running sums every figure derives from; `batches` says how far they go."""

    batches: int = 0
    tokens: int = 0
    loss: float = 0.0  # summed cross-entropy
    correct: int = 0
    bin_tokens: list[int] = field(default_factory=lambda: [0] * ECE_BINS)
    bin_confidence: list[float] = field(default_factory=lambda: [0.0] * ECE_BINS)
    bin_correct: list[int] = field(default_factory=lambda: [0] * ECE_BINS)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the predictions `logits` [n, vocab] of `targets` [n] (already without ignored positions).

        Everything is reduced on the logits' device and brought back in one transfer (one GPU sync a batch)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        top, predicted = log_probs.max(dim=-1)
        confidence, right = top.exp().double(), (predicted == targets).double()
        bins = (confidence * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        per_bin = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
        per_bin[0].index_add_(0, bins, torch.ones_like(confidence))
        per_bin[1].index_add_(0, bins, confidence)
        per_bin[2].index_add_(0, bins, right)
        loss = -log_probs.gather(1, targets[:, None]).double().sum()
        counts, confidences, hits = per_bin.tolist()
        self.loss += float(loss)
        self.tokens += int(targets.numel())
        self.correct += int(round(sum(hits)))
        for b in range(ECE_BINS):
            self.bin_tokens[b] += int(counts[b])
            self.bin_confidence[b] += confidences[b]
            self.bin_correct[b] += int(round(hits[b]))

    def metrics(self) -> dict[str, float]:
        if not self.tokens:
            raise ValidationFailed("the split has no token to predict")
        loss = self.loss / self.tokens
        ece = sum(abs(self.bin_correct[b] - self.bin_confidence[b]) for b in range(ECE_BINS)) / self.tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": self.correct / self.tokens,
                "expected_calibration_error": ece, "tokens": float(self.tokens)}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Sums:
        return cls(**raw)


# --- what is evaluated ----------------------------------------------------------------------------

def split_names(split: str) -> tuple[str, ...]:
    try:
        return contracts.evaluated_splits(split)
    except ValueError as error:
        raise ValidationFailed(f"split: {error}") from None


def batches(dataset: data.LocalDataset, split: str, block_size: int, batch_size: int,
            pad_id: int, flagged: set[int] | frozenset[int] = frozenset()) -> list[dict[str, torch.Tensor]]:
    """Every batch of the split(s), in order: {input_ids, labels[, position_ids][, clean]} with IGNORE_INDEX
    labels where nothing is predicted. `flagged`: ordinals of contaminated documents (contamination.spans);
    when some are, each batch has `clean`, True where the label belongs to none of them. Built up front:
    their count is the job's progress total."""
    out: list[dict[str, torch.Tensor]] = []
    names = split_names(split)
    for name in names:
        if not dataset.has_split(name):
            continue
        stream = dataset.stream(name)
        dirty = contamination.token_mask(dataset, name, set(flagged), names) if flagged else None
        if isinstance(stream, data.Examples):
            if not len(stream):
                continue
            rows = supervised.Rows(stream, block_size, seed=None)
            for start in range(0, rows.count, batch_size):
                chosen = list(range(start, min(start + batch_size, rows.count)))
                batch = rows.batch(chosen, pad_id)
                if dirty is not None:
                    batch["clean"] = torch.from_numpy(~np.stack([_row_examples(rows, row, dirty) for row in chosen]))
                out.append(batch)
        else:
            out += list(_window_batches(stream, block_size, batch_size, dirty))
    if not out:
        raise ValidationFailed(f"split {split!r} of this dataset version holds no tokens")
    return out


def _row_examples(rows: supervised.Rows, row: int, flagged: np.ndarray) -> np.ndarray:
    """[block_size] bools: True where row `row` holds a token of a flagged example (as Rows.fill lays them)."""
    out = np.zeros(rows.block_size, dtype=bool)
    used = 0
    for example in rows.order[rows.bounds[row]:rows.bounds[row + 1]]:
        length = min(int(rows.examples.lengths[example]), rows.block_size)
        out[used:used + length] = flagged[example]
        used += length
    return out


def _window_batches(stream: data.TokenStream, block_size: int, batch_size: int,
                    dirty: np.ndarray | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive windows of `block_size` tokens; the remainder (2 tokens or more) as a last, shorter batch.
    `dirty`: True on the tokens of contaminated documents (the batches get `clean`, its negation)."""
    full = stream.tokens // block_size
    for start in range(0, full, batch_size):
        end = min(start + batch_size, full)
        rows = np.stack([stream.read(w * block_size, block_size) for w in range(start, end)])
        ids = torch.from_numpy(rows)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if dirty is not None:
            batch["clean"] = torch.from_numpy(~dirty[start * block_size:end * block_size].reshape(end - start, -1))
        yield batch
    rest = stream.tokens - full * block_size
    if rest >= 2:
        ids = torch.from_numpy(stream.read(full * block_size, rest)[None, :])
        batch = {"input_ids": ids, "labels": ids.clone()}
        if dirty is not None:
            batch["clean"] = torch.from_numpy(~dirty[full * block_size:][None, :])
        yield batch


@torch.no_grad()
def evaluate_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], sums: Sums, device: torch.device,
                   clean: Sums | None = None) -> None:
    """Add one batch's predictions to `sums`: position t predicts label t + 1 (what the causal LM loss does).
    `clean`: also add those whose label is no contaminated document's (all of them when the batch has no `clean`)."""
    inputs = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()
              if name not in ("labels", "clean")}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"].to(device, non_blocking=True)[:, 1:]
    if "position_ids" not in batch:  # a window of the token stream: every position is predicted (no copy)
        keep = None
        sums.add(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    else:
        keep = labels != IGNORE_INDEX
        sums.add(logits[keep], labels[keep])
    if clean is None:
        return
    if "clean" in batch:
        mask = batch["clean"].to(device, non_blocking=True)[:, 1:]
    else:  # a split without contaminated documents, evaluated beside one with some
        mask = torch.ones_like(labels, dtype=torch.bool)
    if keep is not None:
        mask = mask & keep
    if bool(mask.any()):
        clean.add(logits[mask], labels[mask])


# --- the worker side ------------------------------------------------------------------------------

def fetch_model(store: ObjectStore, prefix: str, dest: Path) -> Path:
    """The version's save_pretrained files (top level: config, weights, tokenizer) under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for obj in store.list(prefix):
        name = obj.key[len(prefix):]
        if "/" not in name:
            store.download(obj.key, dest / name, expected_sha256=obj.sha256 or None)
    return dest


def load_model(folder: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if config.model_type in ("bert", "t5"):
        raise ValidationFailed(f"evaluation measures next-token prediction; a {config.model_type} model has none")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval()


def context_length(model: torch.nn.Module) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 1024


class EvaluationRunner:
    """Claims an evaluation job, computes it (resuming from recorded sums), and ends it."""

    def __init__(self, settings: Settings, worker: str, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.settings = settings
        self.worker = worker
        self.batch_size = batch_size

    async def run(self, job_hint: str = "") -> str:
        from services.training.processes import MIGRATIONS

        db = await Database.connect(self.settings.database_url, component="training", migrations_dir=MIGRATIONS,
                                    min_size=1, max_size=2)
        try:
            coordinator = Coordinator(db)
            assignment = await coordinator.claim(self.worker, socket.gethostname(), JobKind.EVALUATION)
            if assignment is None:
                log.info("no evaluation to run", extra={"job_hint": job_hint})
                return "idle"
            return await self.evaluate(coordinator, assignment)
        finally:
            await db.close()

    async def evaluate(self, coordinator: Coordinator, assignment: Assignment) -> str:
        job = assignment.job
        work = self.settings.state_dir / "evaluations" / job.id
        try:
            outcome = await self._compute(coordinator, assignment, work)
        except (LlmpError, OSError, ValueError, RuntimeError) as error:
            message = error.message if isinstance(error, LlmpError) else f"{type(error).__name__}: {error}"
            await coordinator.finish(assignment, JobState.FAILED, error=message)
            shutil.rmtree(work, ignore_errors=True)
            return "failed"
        if outcome == "lost":
            return "lost"
        shutil.rmtree(work, ignore_errors=True)
        if outcome == "cancelled":
            await coordinator.finish(assignment, JobState.CANCELLED)
            return "cancelled"
        await coordinator.finish(assignment, JobState.SUCCEEDED, model_version=job.model_version)
        return "succeeded"

    async def _compute(self, coordinator: Coordinator, assignment: Assignment, work: Path) -> str:
        job, spec = assignment.job, assignment.job.spec
        store = ObjectStore(self.settings.s3)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        prefix = contracts.model_version_prefix(job.tenant, spec["model"]["name"], int(spec["model"]["version"]))
        async with kept_lease(coordinator, assignment) as lease:
            dataset = await asyncio.to_thread(data.fetch_dataset, store, job.dataset_manifest_key, work / "dataset")
            folder = await asyncio.to_thread(fetch_model, store, prefix, work / "model")
            model = await asyncio.to_thread(load_model, folder, device)
            found = job.environment.get("contamination")
            if not found:  # measured once; a resumed attempt keeps it
                found = (await self._contamination(job, store, dataset, work)).as_dict()
                if not await coordinator.record(assignment, [Update(environment={"contamination": found})]):
                    return "lost"
            flagged = frozenset(found.get("flagged", ()))
            pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            plan = await asyncio.to_thread(batches, dataset, spec["split"], context_length(model), self.batch_size,
                                           pad_id, flagged)
        if lease.lost:
            return "lost"
        if lease.cancel_requested:
            return "cancelled"
        await coordinator.set_max_steps(assignment, len(plan))

        resumed = await coordinator.last_checkpoint(job.id)
        sums = Sums.from_dict(resumed["sums"]) if resumed and "sums" in resumed else Sums()
        # The figures without the contaminated documents; with none, they are the same sums.
        clean = (Sums.from_dict(resumed["clean"]) if resumed and "clean" in resumed else Sums()) if flagged else None
        if sums.batches:
            log.info("evaluation resumed", extra={"job_id": job.id, "batches": sums.batches})
        beat_every = job.lease_seconds * RENEWAL_SHARE
        last_beat = last_mark = time.monotonic()
        while sums.batches < len(plan):
            await asyncio.to_thread(evaluate_batch, model, plan[sums.batches], sums, device, clean)
            sums.batches += 1
            now = time.monotonic()
            if now - last_beat >= beat_every:
                beat = await coordinator.heartbeat(assignment)
                last_beat = now
                if not beat.held:
                    return "lost"
                if beat.cancel_requested:
                    return "cancelled"
            if now - last_mark >= CHECKPOINT_SECONDS and sums.batches < len(plan):
                last_mark = now
                mark = {"step": sums.batches, "sums": sums.as_dict()}
                if clean is not None:
                    mark["clean"] = clean.as_dict()
                if not await coordinator.record(assignment, [Update(step=sums.batches, checkpoint=mark)]):
                    return "lost"
        every = sums.metrics()
        without = every if clean is None else (clean.metrics() if clean.tokens else {})
        if spec.get("exclude_contaminated") and not without:
            raise ValidationFailed("every evaluated document is contaminated (found in the model's training "
                                   "data): nothing is left to measure without them")
        figures = without if spec.get("exclude_contaminated") else every
        found = {**found, "all_metrics": every, "clean_metrics": without}
        if not await coordinator.record(assignment, [Update(step=sums.batches, metrics=figures,
                                                            environment={**job.environment, "contamination": found})]):
            return "lost"
        log.info("evaluated", extra={"job_id": job.id, **figures})
        return "done"

    async def _contamination(self, job, store: ObjectStore, dataset: data.LocalDataset,
                             work: Path) -> contamination.Contamination:
        """Compare the evaluated documents with the train splits of the model's lineage (contamination.py)."""
        spec = job.spec
        lineage = await training_datasets(self.settings, job, spec["model"]["name"], int(spec["model"]["version"]))
        training = {}
        for name, version in lineage:
            key = contracts.dataset_manifest_key(job.tenant, name, version)
            training[f"{name}@{version}"] = await asyncio.to_thread(
                data.fetch_dataset, store, key, work / "lineage" / f"{name}-v{version}")
        threshold = float(dataset.info.options.get("near_dup_threshold") or contamination.DEFAULT_NEAR_DUP_THRESHOLD)
        splits = split_names(spec["split"])
        return await asyncio.to_thread(contamination.measure, lambda: contamination.documents(dataset, splits),
                                       training, work / "contamination", threshold)


async def training_datasets(settings: Settings, job, model: str, version: int) -> list[tuple[str, int]]:
    """(name, version) of the dataset of every version in the model's lineage, itself first; an imported
    version ends the chain (what it was trained on is unknown)."""
    from llmp.registry.v1 import registry_pb2

    from services.common import topology
    from services.common.grpc_client import ServiceClients
    from services.common.identity import Caller, acting_as, service_principal

    caller = Caller(tenant=job.tenant, key_id=job.created_by, role="developer")
    clients = ServiceClients(settings, principal=service_principal(topology.TRAINING.name))
    found: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    current: tuple[str, int] | None = (model, version)
    try:
        while current is not None and current not in seen:
            seen.add(current)
            with acting_as(caller):
                reply = await clients.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(
                    name=current[0], version=current[1]))
            lineage = reply.version.lineage
            if lineage.origin == "imported":
                break
            if lineage.dataset.name and (lineage.dataset.name, lineage.dataset.version) not in found:
                found.append((lineage.dataset.name, int(lineage.dataset.version)))
            current = (lineage.parent.name, int(lineage.parent.version)) if lineage.parent.name else None
    finally:
        await clients.close()
    return found
