"""The runtime's event protocol: what train.py writes is what the worker reads, and how the worker turns
it into the coordinator's updates."""

from __future__ import annotations

import io
import json

import pytest

from services.training import events
from services.training.processes import Outcome, translate_event

EXAMPLES = [
    events.Started(step=0, world_size=2, mode="ddp", device="cpu", precision="fp32", parameters=1000,
                   resumed_from=None, max_steps=24, tokens_per_step=512, environment={"torch": "2"}),
    events.Train(step=4, loss=3.2, learning_rate=1e-3, tokens_per_second=900.0, tokens=1024),
    events.Eval(step=8, validation_loss=2.0, perplexity=7.39, best_validation_loss=2.0),
    events.Checkpoint(step=8, prefix="jobs/a/j/checkpoints/step-8/", seconds=0.5),
    events.EarlyStop(step=8, best_validation_loss=2.0, evaluations_without_improvement=3),
    events.Finished(step=24, final_dir="/scratch/j/node-0/final", metrics={"test_loss": 1.5, "stopped_early": False}),
    events.Stopped(step=8, checkpoint="jobs/a/j/checkpoints/step-8/"),
    events.Failed(step=0, error="boom"),
    events.Replayed(step=4, of=events.Train(step=4, loss=3.2, learning_rate=1e-3, tokens_per_second=9.0, tokens=8)),
]


def test_every_kind_has_an_example_and_survives_the_wire():
    assert {event.kind for event in EXAMPLES} == set(events.KINDS)
    sink = io.StringIO()
    writer = events.EventWriter(sink)
    for event in EXAMPLES:
        writer.emit(event)
    lines = sink.getvalue().splitlines()
    read = [events.decode(line) for line in lines]
    assert all(event.time > 0 for event in read)  # stamped when written
    assert [event.__class__ for event in read] == [event.__class__ for event in EXAMPLES]
    assert [events.to_dict(event) | {"time": 0.0} for event in read] == [events.to_dict(e) for e in EXAMPLES]
    # The wire keeps its shape: `event`, `time`, `step`, then the kind's fields.
    assert list(json.loads(lines[1])) == ["event", "time", "step", "loss", "learning_rate", "tokens_per_second",
                                          "tokens", "mfu"]
    assert json.loads(lines[-1])["of"]["event"] == "train"


def test_decoding_refuses_what_is_not_an_event_naming_the_problem():
    with pytest.raises(ValueError, match="unknown event kind 'lunch'"):
        events.from_dict({"event": "lunch", "step": 1})
    with pytest.raises(ValueError, match="checkpoint event.*prefix"):
        events.from_dict({"event": "checkpoint", "step": 1, "seconds": 0.1})
    with pytest.raises(ValueError, match="replayed event must be train or eval"):
        events.from_dict({"event": "replayed", "step": 1, "of": {"event": "failed", "step": 1, "error": "x"}})
    # An older checkpoint's logged events carry no `time`: still readable.
    logged = events.from_dict({"event": "eval", "step": 8, "validation_loss": 2.0, "perplexity": 7.39,
                               "best_validation_loss": 2.0})
    assert isinstance(logged, events.Eval) and logged.time == 0.0


def test_translate_event_maps_runtime_events_to_updates():
    outcome = Outcome()
    started, train, evaluation, checkpoint, _, finished, *_ = EXAMPLES
    update = translate_event(train, outcome)
    assert update.step == 4 and update.metrics == {"train_loss": 3.2, "learning_rate": 1e-3,
                                                   "tokens_per_second": 900.0}
    assert translate_event(evaluation, outcome).metrics == {"validation_loss": 2.0, "validation_perplexity": 7.39}
    assert translate_event(started, outcome).environment == {"torch": "2", "world_size": 2, "mode": "ddp",
                                                             "device": "cpu", "precision": "fp32",
                                                             "parameters": 1000}
    assert translate_event(checkpoint, outcome).checkpoint == {"step": 8, "prefix": checkpoint.prefix}
    ended = translate_event(events.Finished(step=24, final_dir="/f", metrics={
        "test_loss": 1.5, "test_perplexity": 4.48, "stopped_early": False, "best_validation_loss": None}), outcome)
    assert outcome.finished is not None and outcome.finished.final_dir == "/f"
    assert ended.metrics == {"test_loss": 1.5, "test_perplexity": 4.48}
    assert finished.final_dir and translate_event(events.Failed(step=0, error="boom"), outcome) is None
    assert outcome.error == "boom"
    # A resumed run replays what its checkpoint logged: the same points again, at their own step, no progress.
    replayed = translate_event(EXAMPLES[-1], Outcome())
    assert replayed.step is None and replayed.metrics_step == 4
    assert replayed.metrics == {"train_loss": 3.2, "learning_rate": 1e-3, "tokens_per_second": 9.0}


def test_event_tail_returns_only_complete_new_lines_and_skips_unreadable_ones(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = events.EventTail(path)
    assert tail.read() == []
    first, second = (events.encode(event) for event in EXAMPLES[1:3])
    path.write_text(first + "\nnot json\n" + '{"event": "lunch", "step": 1}\n' + second[:10])
    assert tail.read() == [EXAMPLES[1]]
    with open(path, "a") as handle:
        handle.write(second[10:] + "\n")
    assert tail.read() == [EXAMPLES[2]]
    assert tail.read() == []
