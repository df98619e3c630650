"""The training runtime's events: what `train.py` reports (rank 0 only) and the worker reads back.

One JSON object a line, on stdout or appended to the file `train.py --events` names. Every event has
`event` (its kind), `time` (Unix seconds) and `step` (optimizer steps done); each kind below adds its
own fields. The runtime writes them with `EventWriter`, the worker reads them with `EventTail`: both
sides build and parse the same classes, so a kind or a field exists once, here.

A run that exits 0 has emitted `Finished` or `Stopped` last; torchrun reports any other exit as 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

log = logging.getLogger(__name__)

# The Unix time the worker started torchrun (Started.startup); not LLMP_*: Settings refuses names it does not know
LAUNCHED_AT_ENV = "TRAINING_LAUNCHED_AT"


@dataclass(frozen=True, kw_only=True)
class Event:
    kind: ClassVar[str]
    step: int  # optimizer steps done
    time: float = 0.0  # Unix seconds; EventWriter stamps it


@dataclass(frozen=True, kw_only=True)
class Started(Event):
    """The run began, or resumed from a checkpoint."""

    kind: ClassVar[str] = "started"
    world_size: int
    mode: str  # distributed mode: ddp, local-sgd, async
    device: str
    precision: str
    parameters: int
    resumed_from: int | None  # the checkpoint's step, None for a fresh run
    max_steps: int
    tokens_per_step: int
    environment: dict[str, Any] = field(default_factory=dict)  # python, torch, transformers, cuda, hardware, …
    trainable_parameters: int | None = None  # those the optimizer updates (a LoRA adapter's); None: all
    optimizer_state_bytes: int | None = None  # AdamW's moments for them, once allocated
    # Unix times of the start-up's milestones, so a job's overhead can be told apart from its training:
    # launched (the worker started torchrun), process (this process began), imported (its imports done),
    # group (the process group formed), data (the dataset on local disk), model (model and optimizer built)
    startup: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Train(Event):
    """Every `log_interval` steps."""

    kind: ClassVar[str] = "train"
    loss: float  # mean over ranks and micro-batches
    learning_rate: float
    tokens_per_second: float  # all ranks, since the last train event
    tokens: int  # seen so far
    mfu: float | None = None  # model FLOPs utilisation, on a GPU whose peak is known


@dataclass(frozen=True, kw_only=True)
class Eval(Event):
    """Every `eval_interval` steps and at the end."""

    kind: ClassVar[str] = "eval"
    validation_loss: float
    perplexity: float
    best_validation_loss: float
    seconds: float = 0.0  # the evaluation took


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Event):
    """A complete checkpoint was committed under `prefix`."""

    kind: ClassVar[str] = "checkpoint"
    prefix: str
    seconds: float  # from its start until committed
    blocked: float | None = None  # of which training waited (the upload runs in the background)


@dataclass(frozen=True, kw_only=True)
class EarlyStop(Event):
    kind: ClassVar[str] = "early_stop"
    best_validation_loss: float
    evaluations_without_improvement: int


@dataclass(frozen=True, kw_only=True)
class Finished(Event):
    """Training is over; rank 0 saved the final model (a save_pretrained folder with the tokenizer
    beside it) at `final_dir`, on its node's local disk, for the worker to register."""

    kind: ClassVar[str] = "finished"
    final_dir: str | None  # None when the run had no store to checkpoint to (tests of the loop)
    # train_loss, validation_loss, validation_perplexity, test_loss, test_perplexity,
    # best_validation_loss, tokens, tokens_per_second, steps, stopped_early
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Stopped(Event):
    """Stopped on purpose after the checkpoint `checkpoint` (`--stop-after-step`: tests, preemption); the
    process exits 0 and a later launch resumes from that checkpoint."""

    kind: ClassVar[str] = "stopped"
    checkpoint: str


@dataclass(frozen=True, kw_only=True)
class Failed(Event):
    """The run failed (then the process exits non-zero)."""

    kind: ClassVar[str] = "failed"
    error: str


@dataclass(frozen=True, kw_only=True)
class Replayed(Event):
    """After `Started`, when resuming: one `Train` or `Eval` event logged before the checkpoint resumed
    from, as it was logged. A checkpoint carries every metric event logged up to it, because the worker
    may have been killed before it forwarded them; the worker records them again (idempotently), so a
    job's metric history has no hole whatever moment its node was killed at."""

    kind: ClassVar[str] = "replayed"
    of: Train | Eval


KINDS: dict[str, type[Event]] = {cls.kind: cls for cls in (
    Started, Train, Eval, Checkpoint, EarlyStop, Finished, Stopped, Failed, Replayed)}


def to_dict(event: Event) -> dict[str, Any]:
    """The event as its JSON object: `event`, `time`, `step`, then its own fields."""
    values = {"event": event.kind, "time": event.time, "step": event.step}
    for item in dataclasses.fields(event):
        if item.name not in values:
            value = getattr(event, item.name)
            values[item.name] = to_dict(value) if isinstance(value, Event) else value
    return values


def from_dict(raw: dict[str, Any]) -> Event:
    """The event a JSON object describes; ValueError naming what is wrong with it."""
    cls = KINDS.get(raw.get("event"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown event kind {raw.get('event')!r}")
    values = {item.name: raw[item.name] for item in dataclasses.fields(cls) if item.name in raw}
    if cls is Replayed:
        of = from_dict(values.get("of") or {})
        if not isinstance(of, Train | Eval):
            raise ValueError(f"a replayed event must be train or eval, not {of.kind}")
        values["of"] = of
    try:
        return cls(**values)
    except TypeError as error:  # a field missing
        raise ValueError(f"{cls.kind} event: {error}") from None


def encode(event: Event) -> str:
    return json.dumps(to_dict(event))


def decode(line: str | bytes) -> Event:
    return from_dict(json.loads(line))


class EventWriter:
    """The runtime's side: writes each event as one line (rank 0 writes, other ranks pass None)."""

    def __init__(self, sink: TextIO | None) -> None:
        self.sink = sink

    def emit(self, event: Event) -> None:
        if self.sink is None:
            return
        self.sink.write(encode(dataclasses.replace(event, time=round(time.time(), 3))) + "\n")
        self.sink.flush()


class EventTail:
    """The worker's side: the complete lines appended to the events file since the last read, as events."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[Event]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(decode(line))
                except ValueError as error:  # json.JSONDecodeError is one
                    log.warning("unreadable runtime event", extra={
                        "line": line[:200].decode(errors="replace"), "error": str(error)})
        return events
