"""The worker's side of the event protocol, without a worker: runtime events become job updates, and the
events file is read only in complete lines. (The worker itself, on a real broker: tests/integration/training.)"""

from __future__ import annotations

from services.training.worker import EventTail, Outcome, translate_event


def test_translate_event_maps_runtime_events_to_updates():
    outcome = Outcome()
    train = translate_event({"event": "train", "step": 4, "loss": 3.2, "learning_rate": 1e-3,
                             "tokens_per_second": 900.0, "tokens": 1024}, outcome)
    assert train.step == 4 and train.metrics == {"train_loss": 3.2, "learning_rate": 1e-3,
                                                 "tokens_per_second": 900.0}
    evaluation = translate_event({"event": "eval", "step": 8, "validation_loss": 2.0, "perplexity": 7.39}, outcome)
    assert evaluation.metrics == {"validation_loss": 2.0, "validation_perplexity": 7.39}
    started = translate_event({"event": "started", "step": 0, "world_size": 2, "environment": {"torch": "2"}},
                              outcome)
    assert started.environment == {"torch": "2", "world_size": 2}
    finished = translate_event({"event": "finished", "step": 24, "final_prefix": "jobs/a/j/final/",
                                "metrics": {"test_loss": 1.5, "test_perplexity": 4.48, "stopped_early": False,
                                            "best_validation_loss": None}}, outcome)
    assert outcome.finished and outcome.final_prefix == "jobs/a/j/final/"
    assert finished.metrics == {"test_loss": 1.5, "test_perplexity": 4.48}
    assert translate_event({"event": "failed", "step": 0, "error": "boom"}, outcome) is None
    # A resumed run replays what its checkpoint logged: the same points again, at their own step, no progress.
    replayed = translate_event({"event": "replayed", "step": 4, "of": {"event": "train", "step": 4, "loss": 3.2,
                                                                       "learning_rate": 1e-3}}, Outcome())
    assert replayed.step is None and replayed.metrics_step == 4
    assert replayed.metrics == {"train_loss": 3.2, "learning_rate": 1e-3}
    assert translate_event({"event": "replayed", "step": 8, "of": {"event": "checkpoint", "step": 8}}, outcome) is None
    assert outcome.error == "boom"


def test_event_tail_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_text('{"event": "a"}\n{"event": "b"')
    assert tail.read() == [{"event": "a"}]
    with open(path, "a") as handle:
        handle.write('}\n')
    assert tail.read() == [{"event": "b"}]
    assert tail.read() == []
