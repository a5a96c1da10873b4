"""The engine's one SQLite state database (``$ISOBOX_ROOT/state.db``).

Each component that keeps state (images now; containers and networks later) owns a named
*schema* with an ordered list of migrations. The table ``schema_versions`` records how far
each component's schema has been migrated; opening the database applies the missing steps in
order, each in its own transaction, so an old database is brought forward and a database
written by a newer isobox is refused rather than misread.

The database runs in WAL mode so that readers never block the single writer, with a busy
timeout so that concurrent CLI processes wait for each other instead of failing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from isobox.errors import StoreError


@dataclass(frozen=True)
class Schema:
    """A component's schema: ``migrations[i]`` takes it from version ``i`` to ``i + 1``."""

    component: str
    migrations: Sequence[str]

    @property
    def version(self) -> int:
        return len(self.migrations)


_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
);
"""


class StateDB:
    """A connection to the state database with the given schemas migrated to their newest."""

    def __init__(self, path: Path, schemas: Sequence[Schema]) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"open state database {path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_BOOTSTRAP)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"state database {path} is damaged or not a database: {exc}") from exc
        for schema in schemas:
            self._migrate(schema)

    def _migrate(self, schema: Schema) -> None:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT version FROM schema_versions WHERE component = ?", (schema.component,)
            ).fetchone()
            current = int(row["version"]) if row else 0
            if current > schema.version:
                raise StoreError(
                    f"state database {self.path}: schema {schema.component!r} is at version "
                    f"{current}, newer than this isobox understands ({schema.version})"
                )
            for step in range(current, schema.version):
                conn.executescript_in_tx(schema.migrations[step])
            conn.execute(
                "INSERT INTO schema_versions(component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (schema.component, schema.version),
            )

    def version(self, component: str) -> int:
        row = self._conn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
        return int(row["version"]) if row else 0

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        """An immediate (write-locked) transaction; commits on success, rolls back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self._conn.close()


class _Tx:
    """The connection as seen inside a transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, rows)

    def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        for statement in _split_sql(script):
            self._conn.execute(statement)


def _split_sql(script: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
