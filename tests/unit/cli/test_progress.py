"""Progress on stderr (redrawn on a terminal, plain lines otherwise) and the Server-Sent Events parser."""

from __future__ import annotations

import io

from cli.client import Event, parse_events
from cli.progress import Progress, human
from cli.resources import follow_job_event


def test_a_terminal_gets_one_line_redrawn_in_place():
    stream = io.StringIO()
    bar = Progress("RUNNING", 200, "steps", stream=stream, tty=True, min_interval=0)
    bar.update(50, note="loss 2.5000")
    bar.update(100)
    bar.close()
    out = stream.getvalue()
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1
    last = out.rsplit("\r", 1)[1]
    assert "[###############...............]  50%" in last and "100/200 steps" in last and "loss 2.5000" in last


def test_a_pipe_gets_plain_lines_one_per_tenth_and_per_state():
    stream = io.StringIO()
    bar = Progress("upload corpus.txt", 1_000_000, "bytes", stream=stream, tty=False)
    for sent in range(0, 1_000_001, 10_000):  # 101 updates
        bar.update(sent)
    bar.update(label="READY")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split("]")[1].split()[0] for line in lines[:11]] == [f"{10 * i}%" for i in range(11)]
    assert lines[10].endswith("1.0 MB/1.0 MB") and lines[-1].startswith("READY")
    assert len(lines) == 12


def test_unknown_total_shows_a_count_without_a_bar():
    bar = Progress("ingest pack", 0, "documents", stream=io.StringIO(), tty=False)
    bar.update(1234)
    assert bar.render() == "ingest pack  1234 documents"
    assert human(1_500_000, "bytes") == "1.5 MB" and human(999, "bytes") == "999 B"


def test_parse_events_reads_ids_types_multiline_data_and_done():
    body = [b": keep-alive\n", b"id: 7\n", b"event: progress\n", b'data: {"a":\n', b"data: 1}\n", b"\n",
            b"event: metrics\n", b'data: {"b": 2}\r\n', b"\r\n", b"data: [DONE]\n", b"\n"]
    assert list(parse_events(iter(body))) == [Event("7", "progress", {"a": 1}), Event("7", "metrics", {"b": 2}), None]


def test_job_events_drive_the_bar_and_say_when_the_job_ended():
    bar = Progress("QUEUED", 0, "steps", stream=io.StringIO(), tty=False)
    assert not follow_job_event(bar, "state_changed", {"state_changed": {"state": "RUNNING"}})
    assert not follow_job_event(bar, "progress", {"progress": {"done": 20, "total": 40, "unit": "steps"}})
    assert not follow_job_event(bar, "metrics", {"metrics": {"step": 20, "values": {"train_loss": 1.25}}})
    assert bar.render() == "RUNNING  [###############...............]  50%  20/40 steps  loss 1.2500"
    assert follow_job_event(bar, "state_changed", {"state_changed": {"state": "SUCCEEDED"}})
