"""The engine's event bus: every lifecycle step is published once, persisted, and fanned out.

Publishers call :meth:`EventBus.publish`; the event is written to the bounded ``events``
table (so ``events --since`` works across daemon restarts) and then put on the queue of
every live subscriber. :meth:`EventBus.stream` joins the two without a gap or a duplicate:
it subscribes *first*, reads the history up to the newest persisted sequence number, then
yields live events with a larger one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from isobox.compute.db import ComputeDB, EventRow
from isobox.errors import InvalidArgument
from isobox.spec.wire import Event

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CLOSED = None  # the sentinel a subscriber queue receives when the bus closes


def now_ns() -> int:
    """Now, truncated to the microsecond: what a formatted time can say, so a ``since``
    copied from an event matches that event exactly."""
    return time.time_ns() // 1000 * 1000


def format_time(ns: int) -> str:
    """RFC 3339 UTC with microseconds and a ``Z``, as every time on the wire."""
    dt = _EPOCH + timedelta(microseconds=ns // 1000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | float | int | None, what: str) -> int | None:
    """A ``since``/``until`` bound as nanoseconds: Unix seconds (``1732222222.5``) or
    RFC 3339 (``2026-11-21T20:50:14Z``)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return int(float(value) * 1e9)
    text = value.strip()
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(f"{what}: not a time: {value!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000  # exact, no float rounding


def _as_event(row: EventRow) -> Event:
    return Event(time=row.time, type=row.type, action=row.action,  # type: ignore[typeddict-item]
                 id=row.id, name=row.name, attributes=dict(row.attributes))


Filters = Mapping[str, str | Sequence[str]]
_FILTER_KEYS = ("type", "action", "event", "id", "container", "name", "label", "image")


def check_filters(filters: Filters | None) -> dict[str, list[str]]:
    """Normalise ``{key: value | [values]}``; values of one key are OR-ed, keys AND-ed.

    ``container`` matches an id (or id prefix) or a name; ``label`` is ``k`` or ``k=v``
    against the event's attributes; ``event`` is an alias of ``action``.
    """
    out: dict[str, list[str]] = {}
    for key, value in (filters or {}).items():
        if key not in _FILTER_KEYS:
            known = ", ".join(_FILTER_KEYS)
            raise InvalidArgument(f"unknown event filter {key!r} (known: {known})")
        values = [value] if isinstance(value, str) else list(value)
        out.setdefault("action" if key == "event" else key, []).extend(values)
    return out


def matches(ev: EventRow, filters: dict[str, list[str]]) -> bool:
    for key, values in filters.items():
        if key == "type":
            ok = ev.type in values
        elif key == "action":
            ok = ev.action in values
        elif key in ("id", "container"):
            ok = any(ev.id.startswith(v) or ev.name == v for v in values)
        elif key == "name":
            ok = ev.name in values
        elif key == "image":
            ok = ev.attributes.get("image") in values
        else:  # label
            ok = any(_label_ok(ev.attributes, v) for v in values)
        if not ok:
            return False
    return True


def _label_ok(attrs: Mapping[str, str], spec: str) -> bool:
    key, eq, value = spec.partition("=")
    return key in attrs and (not eq or attrs[key] == value)


class EventBus:
    """Persisted history plus in-process fan-out to subscribers."""

    def __init__(self, db: ComputeDB) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._subs: set[queue.SimpleQueue[EventRow | None]] = set()
        self._closed = False

    def publish(self, type_: str, action: str, id_: str, name: str,
                attributes: Mapping[str, str] | None = None) -> EventRow:
        ns = now_ns()
        row = EventRow(0, format_time(ns), ns, type_, action, id_, name, dict(attributes or {}))
        # Persist and fan out under one lock, so subscribers see events in sequence order.
        with self._lock:
            seq = self._db.add_event(row)
            row = EventRow(seq, row.time, row.time_ns, row.type, row.action, row.id, row.name,
                           row.attributes)
            for q in self._subs:
                q.put(row)
        return row

    def close(self) -> None:
        """End every live stream (the daemon is shutting down)."""
        with self._lock:
            self._closed = True
            for q in self._subs:
                q.put(_CLOSED)
            self._subs.clear()

    def stream(self, *, since: str | float | None = None, until: str | float | None = None,
               filters: Filters | None = None, follow: bool = True,
               poll: float = 1.0) -> Iterator[Event]:
        """History from ``since`` (none when ``since`` is not given and ``follow``), then,
        with ``follow``, live events until ``until`` passes or the bus closes.

        The subscription is made *now*, not at the first ``next()``: an event published
        between this call and the first read is not lost."""
        since_ns = parse_time(since, "since")
        until_ns = parse_time(until, "until")
        want = check_filters(filters)
        q: queue.SimpleQueue[EventRow | None] = queue.SimpleQueue()
        with self._lock:
            closed = self._closed
            if follow and not closed:
                self._subs.add(q)
            last = self._db.last_event_seq()
        history: list[EventRow] = []
        if since_ns is not None or not follow:
            history = self._db.events(since_ns=since_ns, until_ns=until_ns, upto_seq=last)
        return _Stream(self, q, [r for r in history if matches(r, want)],
                       live=follow and not closed, last=last, since_ns=since_ns,
                       until_ns=until_ns, want=want, poll=poll)

    def _unsubscribe(self, q: queue.SimpleQueue[EventRow | None]) -> None:
        with self._lock:
            self._subs.discard(q)


class _Stream:
    """An event stream: the history, then live events. Unsubscribes when it ends, is
    closed, or is garbage (a stream nobody reads must not keep a queue growing)."""

    def __init__(self, bus: EventBus, q: queue.SimpleQueue[EventRow | None],
                 history: list[EventRow], *, live: bool, last: int, since_ns: int | None,
                 until_ns: int | None, want: dict[str, list[str]], poll: float) -> None:
        self._bus, self._q = bus, q
        self._history = history
        self._live = live
        self._last, self._since, self._until = last, since_ns, until_ns
        self._want, self._poll = want, poll
        self._done = False

    def __iter__(self) -> _Stream:
        return self

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._bus._unsubscribe(self._q)

    def __del__(self) -> None:
        self.close()

    def __next__(self) -> Event:
        if self._history:
            return _as_event(self._history.pop(0))
        if not self._live or self._done:
            self.close()
            raise StopIteration
        until = self._until
        while True:
            if until is not None and now_ns() > until:
                break
            try:
                item = self._q.get(timeout=self._poll)
            except queue.Empty:
                continue
            if item is _CLOSED:
                break
            assert item is not None
            if item.seq <= self._last:
                continue
            if until is not None and item.time_ns > until:
                break
            if self._since is not None and item.time_ns < self._since:
                continue
            if matches(item, self._want):
                return _as_event(item)
        self.close()
        raise StopIteration
