"""log.jsonl: line records, partial lines, UTF-8 repair, reading with filters, following."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from isobox.compute.logfile import (
    MAX_PARTIAL,
    LogWriter,
    follow_log,
    normalize_time,
    read_log,
)
from isobox.errors import InvalidArgument


def records(path: Path) -> list[tuple[str, str]]:
    return [(r["s"], r["l"]) for r in map(json.loads, path.read_text().splitlines())]


def test_lines_partials_and_streams(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = LogWriter(log)
    w.write("stdout", b"one\ntw")
    w.write("stderr", b"err\n")
    assert records(log) == [("stdout", "one\n"), ("stderr", "err\n")]
    w.write("stdout", b"o\nthree")
    assert w.pending("stdout")
    w.flush_partial("stdout")  # the process paused writing
    w.write("stdout", b" more\n")
    w.close()
    assert records(log) == [("stdout", "one\n"), ("stderr", "err\n"), ("stdout", "two\n"),
                            ("stdout", "three"), ("stdout", " more\n")]
    ts = [json.loads(x)["t"] for x in log.read_text().splitlines()]
    assert ts == sorted(ts) and all(t.endswith("Z") and len(t) == 27 for t in ts)


def test_long_partial_is_split(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = LogWriter(log)
    w.write("stdout", b"x" * (MAX_PARTIAL * 2 + 5))
    assert [len(line) for _, line in records(log)] == [MAX_PARTIAL, MAX_PARTIAL]
    w.close()
    assert [len(line) for _, line in records(log)] == [MAX_PARTIAL, MAX_PARTIAL, 5]


def test_utf8_split_across_reads_and_invalid_bytes(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = LogWriter(log)
    snow = "☃".encode()
    w.write("stdout", b"a" + snow[:1])
    w.flush_partial("stdout")  # the half character waits for its other bytes
    w.write("stdout", snow[1:] + b"\xff\n")
    w.write("stderr", b"\xe2\x98")  # cut short for good
    w.close()
    assert records(log) == [("stdout", "a"), ("stdout", "☃\ufffd\n"), ("stderr", "\ufffd")]


def test_appends_across_runs(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    for run in ("first\n", "second\n"):
        w = LogWriter(log)
        w.write("stdout", run.encode())
        w.close()
    assert [e["line"] for e in read_log(log)] == ["first\n", "second\n"]
    assert log.stat().st_mode & 0o777 == 0o600


def _write(log: Path, entries: list[tuple[str, str, str]]) -> None:
    log.write_text("".join(json.dumps({"t": t, "s": s, "l": line}) + "\n"
                           for t, s, line in entries))


def test_read_filters(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    _write(log, [("2026-01-01T00:00:01.000000Z", "stdout", "a\n"),
                 ("2026-01-01T00:00:02.000000Z", "stderr", "b\n"),
                 ("2026-01-01T00:00:03.000000Z", "stdout", "c\n")])
    with log.open("a") as fh:
        fh.write("not json\n")  # a damaged line is skipped
        fh.write('{"t": "2026-01-01T00:00:04.000000Z", "s": "stdout", "l": "half')
    assert [e["line"] for e in read_log(log)] == ["a\n", "b\n", "c\n"]
    first = next(read_log(log))
    assert first == {"time": "2026-01-01T00:00:01.000000Z", "stream": "stdout", "line": "a\n"}
    assert [e["line"] for e in read_log(log, streams=["stdout"])] == ["a\n", "c\n"]
    assert [e["line"] for e in read_log(log, tail=2)] == ["b\n", "c\n"]
    assert list(read_log(log, tail=0)) == []
    assert [e["line"] for e in read_log(log, since="2026-01-01T00:00:02Z")] == ["b\n", "c\n"]
    assert [e["line"] for e in read_log(log, until="2026-01-01T00:00:02.5+00:00")] == [
        "a\n", "b\n"]
    assert [e["line"] for e in read_log(log, since=1767225602.0)] == ["b\n", "c\n"]
    assert list(read_log(tmp_path / "missing")) == []
    with pytest.raises(InvalidArgument):
        list(read_log(log, since="yesterday"))


def test_normalize_time() -> None:
    assert normalize_time("2026-01-01T01:00:00+01:00") == "2026-01-01T00:00:00.000000Z"
    assert normalize_time(0) == "1970-01-01T00:00:00.000000Z"
    assert normalize_time(None) is None


def test_follow_until_stopped(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    w = LogWriter(log)
    w.write("stdout", b"before\n")
    running = threading.Event()
    running.set()

    def writer() -> None:
        for i in range(3):
            time.sleep(0.1)
            w.write("stdout", f"live {i}\n".encode())
        w.close()
        running.clear()

    t = threading.Thread(target=writer)
    t.start()
    start = time.monotonic()
    got = [e["line"] for e in follow_log(log, running.is_set, tail=1, poll=5.0)]
    t.join()
    assert got == ["before\n", "live 0\n", "live 1\n", "live 2\n"]
    # Woken by inotify, not by the 5 s poll.
    assert time.monotonic() - start < 3


def test_follow_of_a_stopped_container_reads_and_ends(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    _write(log, [("2026-01-01T00:00:01.000000Z", "stdout", "a\n")])
    assert [e["line"] for e in follow_log(log, lambda: False)] == ["a\n"]
    assert list(follow_log(tmp_path / "none.jsonl", lambda: False)) == []
