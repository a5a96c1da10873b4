"""A container's log: ``log.jsonl``, one JSON object per output line.

``{"t": "2026-11-21T20:50:14.123456Z", "s": "stdout"|"stderr", "l": "text\\n"}``. The monitor
writes it (:class:`LogWriter`); the service reads it (:func:`read_log`, :func:`follow_log`),
also while the monitor appends and after the monitor is gone: the file is the log, no
process has to run to read it (docker's json-file driver, same reasons).

Why each choice:

* one record per line, so ``tail`` and ``since`` work on lines as users think of them;
* a partial line is written as its own record (without newline) when the process pauses
  writing (:meth:`LogWriter.flush_partial`, called by the monitor when its read finds no
  more data) or when it passes 16 KiB, so a prompt without newline or a progress bar is
  visible at once and a process that never writes a newline cannot grow memory;
* bytes that are not UTF-8 are replaced (U+FFFD) — JSON carries text; an incremental
  decoder keeps a multi-byte character split across two reads whole;
* each record is handed to the kernel as it is made (one ``write``), never held in a user
  buffer: a reader that follows sees it at once, and a killed monitor loses nothing it had
  accepted. No fsync per record: that would cost a disk flush per line of output.
"""

from __future__ import annotations

import codecs
import collections
import json
import os
import select
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from isobox.errors import InvalidArgument

MAX_PARTIAL = 16 * 1024
STREAMS = ("stdout", "stderr")


def now_ts() -> str:
    """RFC 3339 UTC with microseconds and ``Z``: the one time format of the log."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalize_time(value: str | float | datetime | None) -> str | None:
    """A bound for ``since``/``until`` in the log's own format (which sorts as text):
    epoch seconds, a datetime, or an RFC 3339 string."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, int | float):
        dt = datetime.fromtimestamp(float(value), UTC)
    else:
        text = value.strip()
        try:
            dt = datetime.fromtimestamp(float(text), UTC)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidArgument(f"invalid time {value!r} (RFC 3339 or seconds since "
                                      "the epoch)") from exc
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LogWriter:
    """Appends records to ``path``; feed it output as it is read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._partial: dict[str, str] = {}
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}

    def _decoder(self, stream: str) -> codecs.IncrementalDecoder:
        dec = self._decoders.get(stream)
        if dec is None:
            dec = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        return dec

    def write(self, stream: str, data: bytes) -> None:
        """Record every complete line of ``data`` (with what was pending before it)."""
        text = self._partial.pop(stream, "") + self._decoder(stream).decode(data)
        start = 0
        while True:
            nl = text.find("\n", start)
            if nl < 0:
                break
            self._record(stream, text[start:nl + 1])
            start = nl + 1
        rest = text[start:]
        while len(rest) > MAX_PARTIAL:
            self._record(stream, rest[:MAX_PARTIAL])
            rest = rest[MAX_PARTIAL:]
        if rest:
            self._partial[stream] = rest

    def pending(self, stream: str) -> bool:
        return bool(self._partial.get(stream))

    def flush_partial(self, stream: str | None = None, *, final: bool = False) -> None:
        """Write a pending partial line as its own record (the process paused writing).
        ``final``: the stream ended; bytes of an unfinished character become U+FFFD."""
        for s in [stream] if stream else list({*self._partial, *self._decoders}):
            text = self._partial.pop(s, "")
            if final and s in self._decoders:
                text += self._decoders.pop(s).decode(b"", final=True)
            if text:
                self._record(s, text)

    def _record(self, stream: str, line: str) -> None:
        rec = json.dumps({"t": now_ts(), "s": stream, "l": line}, ensure_ascii=False,
                         separators=(",", ":"))
        data = (rec + "\n").encode()
        while data:  # one write for a record in practice; loop for a short write
            n = os.write(self._fd, data)
            data = data[n:]

    def close(self) -> None:
        if self._fd >= 0:
            self.flush_partial(final=True)
            os.close(self._fd)
            self._fd = -1


# ---- reading -------------------------------------------------------------------------------


def _entry(line: bytes) -> dict[str, Any] | None:
    """A ``LogEntry`` (``time``, ``stream``, ``line``) from one line of the file; None for a
    damaged line (a crash mid-write), which is skipped rather than failing the read."""
    try:
        rec = json.loads(line)
        return {"time": str(rec["t"]), "stream": str(rec["s"]), "line": str(rec["l"])}
    except (ValueError, KeyError, TypeError):
        return None


def _selected(entry: dict[str, Any], since: str | None, until: str | None,
              streams: Iterable[str]) -> bool:
    t = entry["time"]
    return (entry["stream"] in streams and (since is None or t >= since)
            and (until is None or t <= until))


def read_log(path: Path, *, since: str | float | datetime | None = None,
             until: str | float | datetime | None = None, tail: int | None = None,
             streams: Iterable[str] = STREAMS) -> Iterator[dict[str, Any]]:
    """The entries of ``path`` (oldest first) within ``since``..``until`` (inclusive) on
    ``streams``; with ``tail`` only the last ``tail`` of them. A missing file is empty."""
    want = set(streams)
    lo, hi = normalize_time(since), normalize_time(until)
    if tail is not None and tail < 0:
        raise InvalidArgument(f"tail must be at least 0, got {tail}")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, generator
    except FileNotFoundError:
        return
    with fh:
        if tail is not None:
            last: collections.deque[dict[str, Any]] = collections.deque(maxlen=tail)
            for raw in fh:
                e = _entry(raw)
                if e is not None and _selected(e, lo, hi, want):
                    last.append(e)
            yield from last
            return
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a record being written: not whole yet
            e = _entry(raw)
            if e is not None and _selected(e, lo, hi, want):
                yield e


def follow_log(path: Path, running: Callable[[], bool], *,
               since: str | float | datetime | None = None,
               until: str | float | datetime | None = None, tail: int | None = None,
               streams: Iterable[str] = STREAMS, poll: float = 0.25,
               stop: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Like :func:`read_log`, then every entry appended later, until ``running()`` says the
    container stopped and the file has no more data (or ``stop()`` says so, or an entry
    passes ``until``). Woken by inotify on the file, with ``poll`` as a fallback."""
    from isobox._sys.inotify import Inotify

    want = set(streams)
    lo, hi = normalize_time(since), normalize_time(until)
    ino = Inotify()
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not running() or not path.parent.is_dir():
                return
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        ino.add_watch(str(path))
        with os.fdopen(fd, "rb") as fh:
            pending = b""
            first = True
            while True:
                chunk = fh.read()
                if chunk:
                    pending += chunk
                    lines = pending.split(b"\n")
                    pending = lines.pop()
                    found = [e for e in map(_entry, lines)
                             if e is not None and _selected(e, lo, None, want)]
                    if first and tail is not None:
                        found = found[-tail:] if tail else []
                    for e in found:
                        if hi is not None and e["time"] > hi:
                            return
                        yield e
                first = False
                if stop is not None and stop():
                    return
                if not chunk:
                    if not running():
                        # Stopped: one more read picks up what was written before it ended.
                        rest = fh.read()
                        if not rest:
                            return
                        fh.seek(-len(rest), os.SEEK_CUR)
                        continue
                    select.select([ino.fd], [], [], poll)
                    ino.read()
                    time.sleep(0)  # let the writer finish a burst
    finally:
        ino.close()
