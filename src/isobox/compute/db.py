"""The compute component's tables in the engine's state database.

``containers`` holds one row per container (its document as JSON, the state of the
lifecycle machine and the result of the last run); ``name`` is ``UNIQUE`` so that two
concurrent creates of one name cannot both win (the database decides, no check-then-insert).
``allocations`` is each container's *release list*: every resource is recorded (kind, JSON
data) **before** it is made, so removal and crash recovery can free, in reverse order,
whatever exists — release functions are idempotent, so a record whose resource was never
made costs nothing. ``events`` keeps a bounded history for ``events --since``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isobox.errors import Conflict, NotFound
from isobox.statedb import Schema, StateDB

COMPUTE_SCHEMA = Schema(
    "compute",
    [
        """
        CREATE TABLE containers (
            id           TEXT PRIMARY KEY,
            name         TEXT NOT NULL UNIQUE,
            image        TEXT NOT NULL,
            image_digest TEXT NOT NULL,
            image_id     TEXT NOT NULL,
            isolation    TEXT NOT NULL,
            state        TEXT NOT NULL,
            pid          INTEGER NOT NULL DEFAULT 0,
            exit_code    INTEGER,
            signal       INTEGER,
            error        TEXT,
            created_at   TEXT NOT NULL,
            started_at   TEXT,
            finished_at  TEXT,
            document     TEXT NOT NULL
        );
        CREATE TABLE allocations (
            seq       INTEGER PRIMARY KEY AUTOINCREMENT,
            container TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
            kind      TEXT NOT NULL,
            data      TEXT NOT NULL
        );
        CREATE INDEX allocations_container ON allocations(container, seq);
        CREATE TABLE events (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            time       TEXT NOT NULL,
            time_ns    INTEGER NOT NULL,
            type       TEXT NOT NULL,
            action     TEXT NOT NULL,
            id         TEXT NOT NULL,
            name       TEXT NOT NULL,
            attributes TEXT NOT NULL
        );
        CREATE INDEX events_time ON events(time_ns);
        """,
    ],
)

_COLUMNS = frozenset({
    "name", "image", "image_digest", "image_id", "isolation", "state", "pid", "exit_code",
    "signal", "error", "created_at", "started_at", "finished_at", "document",
})

#: How many events the history keeps (older ones are pruned as new ones arrive).
EVENTS_KEPT = 10_000


@dataclass(frozen=True)
class ContainerRow:
    id: str
    name: str
    image: str
    image_digest: str
    image_id: str
    isolation: str
    state: str
    pid: int
    exit_code: int | None
    signal: int | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    document: dict[str, Any]

    @staticmethod
    def of(r: sqlite3.Row) -> ContainerRow:
        return ContainerRow(
            id=str(r["id"]), name=str(r["name"]), image=str(r["image"]),
            image_digest=str(r["image_digest"]), image_id=str(r["image_id"]),
            isolation=str(r["isolation"]), state=str(r["state"]), pid=int(r["pid"]),
            exit_code=r["exit_code"], signal=r["signal"], error=r["error"],
            created_at=str(r["created_at"]), started_at=r["started_at"],
            finished_at=r["finished_at"], document=json.loads(r["document"]),
        )


@dataclass(frozen=True)
class Allocation:
    seq: int
    container: str
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class EventRow:
    seq: int
    time: str
    time_ns: int
    type: str
    action: str
    id: str
    name: str
    attributes: dict[str, str]


class ComputeDB:
    """Typed access to the compute tables; every write is one immediate transaction."""

    def __init__(self, path: Path) -> None:
        self.db = StateDB(path, [COMPUTE_SCHEMA])

    def close(self) -> None:
        self.db.close()

    # ---- containers --------------------------------------------------------------------

    def insert(self, row: ContainerRow) -> None:
        """Insert a new container; a taken name or id is :class:`Conflict` (race-free)."""
        try:
            with self.db.transaction() as tx:
                tx.execute(
                    "INSERT INTO containers(id, name, image, image_digest, image_id, isolation,"
                    " state, pid, exit_code, signal, error, created_at, started_at,"
                    " finished_at, document) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (row.id, row.name, row.image, row.image_digest, row.image_id,
                     row.isolation, row.state, row.pid, row.exit_code, row.signal, row.error,
                     row.created_at, row.started_at, row.finished_at,
                     json.dumps(row.document, separators=(",", ":"))),
                )
        except sqlite3.IntegrityError as exc:
            text = str(exc)
            if "containers.name" in text:
                raise Conflict(f"the container name {row.name!r} is already in use") from exc
            if "containers.id" in text:
                raise Conflict(f"a container with id {row.id} already exists") from exc
            raise

    def get(self, cid: str) -> ContainerRow | None:
        rows = self.db.query("SELECT * FROM containers WHERE id = ?", (cid,))
        return ContainerRow.of(rows[0]) if rows else None

    def all(self) -> list[ContainerRow]:
        return [ContainerRow.of(r) for r in self.db.query(
            "SELECT * FROM containers ORDER BY created_at DESC, id")]

    def resolve(self, ref: str) -> ContainerRow:
        """A full id, a name, or a unique id prefix → the row; :class:`NotFound` otherwise."""
        if not ref:
            raise NotFound("no such container: ''")
        rows = self.db.query("SELECT * FROM containers WHERE id = ? OR name = ?", (ref, ref))
        exact = [r for r in rows if r["id"] == ref] or rows
        if exact:
            return ContainerRow.of(exact[0])
        if all(c in "0123456789abcdef" for c in ref):
            rows = self.db.query(
                "SELECT * FROM containers WHERE id >= ? AND id < ? LIMIT 2",
                (ref, ref + "g"),
            )
            if len(rows) > 1:
                raise NotFound(f"container id prefix {ref!r} is ambiguous")
            if rows:
                return ContainerRow.of(rows[0])
        raise NotFound(f"no such container: {ref}")

    def update(self, cid: str, *, when: Sequence[str] | None = None, **fields: Any) -> bool:
        """Set ``fields`` of one row, only if its state is in ``when`` (when given).

        Returns whether a row changed: the conditional form is how a racing exit and a
        user's command agree on who moved the state, without holding a lock across both.
        """
        if "document" in fields:
            fields["document"] = json.dumps(fields["document"], separators=(",", ":"))
        unknown = set(fields) - _COLUMNS
        if unknown:
            raise ValueError(f"unknown container columns {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in fields)  # names checked against _COLUMNS
        sql = f"UPDATE containers SET {sets} WHERE id = ?"  # noqa: S608
        params: list[object] = [*fields.values(), cid]
        if when is not None:
            sql += f" AND state IN ({','.join('?' * len(when))})"
            params += list(when)
        with self.db.transaction() as tx:
            return tx.execute(sql, params).rowcount > 0

    def delete(self, cid: str) -> None:
        """Delete the row and (cascade) what is left of its release list."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM allocations WHERE container = ?", (cid,))
            tx.execute("DELETE FROM containers WHERE id = ?", (cid,))

    def counts(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self.db.query(
            "SELECT state, COUNT(*) FROM containers GROUP BY state")}

    # ---- the release list --------------------------------------------------------------

    def record(self, cid: str, kind: str, data: dict[str, Any]) -> int:
        """Record an allocation about to be made; returns its sequence number."""
        with self.db.transaction() as tx:
            cur = tx.execute(
                "INSERT INTO allocations(container, kind, data) VALUES (?, ?, ?)",
                (cid, kind, json.dumps(data, separators=(",", ":"))),
            )
            return int(cur.lastrowid or 0)

    def amend(self, seq: int, data: dict[str, Any]) -> None:
        """Complete an allocation's data once it is made (a pid, the mounts)."""
        with self.db.transaction() as tx:
            tx.execute("UPDATE allocations SET data = ? WHERE seq = ?",
                       (json.dumps(data, separators=(",", ":")), seq))

    def allocations(self, cid: str, kinds: Sequence[str] | None = None) -> list[Allocation]:
        """The release list of a container, newest first (the order to free it in)."""
        rows = self.db.query(
            "SELECT * FROM allocations WHERE container = ? ORDER BY seq DESC", (cid,))
        out = [Allocation(int(r["seq"]), str(r["container"]), str(r["kind"]),
                          json.loads(r["data"])) for r in rows]
        return [a for a in out if kinds is None or a.kind in kinds]

    def forget(self, seq: int) -> None:
        """Drop an allocation that has been released."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM allocations WHERE seq = ?", (seq,))

    # ---- events ------------------------------------------------------------------------

    def add_event(self, ev: EventRow) -> int:
        """Persist one event; returns its sequence number. Old events are pruned."""
        with self.db.transaction() as tx:
            cur = tx.execute(
                "INSERT INTO events(time, time_ns, type, action, id, name, attributes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ev.time, ev.time_ns, ev.type, ev.action, ev.id, ev.name,
                 json.dumps(ev.attributes, separators=(",", ":"))),
            )
            seq = int(cur.lastrowid or 0)
            if seq % 256 == 0:
                tx.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
            return seq

    def events(self, *, after_seq: int = 0, since_ns: int | None = None,
               until_ns: int | None = None, upto_seq: int | None = None) -> list[EventRow]:
        sql = "SELECT * FROM events WHERE seq > ?"
        params: list[object] = [after_seq]
        if since_ns is not None:
            sql += " AND time_ns >= ?"
            params.append(since_ns)
        if until_ns is not None:
            sql += " AND time_ns <= ?"
            params.append(until_ns)
        if upto_seq is not None:
            sql += " AND seq <= ?"
            params.append(upto_seq)
        sql += " ORDER BY seq"
        return [
            EventRow(int(r["seq"]), str(r["time"]), int(r["time_ns"]), str(r["type"]),
                     str(r["action"]), str(r["id"]), str(r["name"]),
                     json.loads(r["attributes"]))
            for r in self.db.query(sql, params)
        ]

    def last_event_seq(self) -> int:
        rows = self.db.query("SELECT MAX(seq) FROM events")
        return int(rows[0][0] or 0)
