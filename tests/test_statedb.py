"""The state database: ordered migrations, schema versions, refusal of a newer database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from isobox.errors import StoreError
from isobox.statedb import Schema, StateDB

V1 = Schema("demo", ["CREATE TABLE t (a INTEGER);"])
V2 = Schema("demo", [*V1.migrations, "ALTER TABLE t ADD COLUMN b TEXT DEFAULT 'x';"])


def test_migrations_apply_in_order_and_only_once(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.db", [V1])
    with db.transaction() as tx:
        tx.execute("INSERT INTO t(a) VALUES (1)")
    assert db.version("demo") == 1
    db.close()
    db = StateDB(tmp_path / "s.db", [V2])  # an old database is brought forward
    assert db.version("demo") == 2
    assert [tuple(r) for r in db.query("SELECT a, b FROM t")] == [(1, "x")]
    db.close()
    db = StateDB(tmp_path / "s.db", [V2])  # and opening again changes nothing
    assert db.version("demo") == 2
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    StateDB(tmp_path / "s.db", [V2]).close()
    with pytest.raises(StoreError, match="newer than this isobox"):
        StateDB(tmp_path / "s.db", [V1])


def test_a_failed_migration_leaves_the_old_version(tmp_path: Path) -> None:
    StateDB(tmp_path / "s.db", [V1]).close()
    broken = Schema("demo", [*V1.migrations, "ALTER TABLE nope ADD COLUMN c;"])
    with pytest.raises(sqlite3.OperationalError):
        StateDB(tmp_path / "s.db", [broken])
    assert StateDB(tmp_path / "s.db", [V1]).version("demo") == 1


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.db", [V1])
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO t(a) VALUES (7)")
        raise RuntimeError("boom")
    assert db.query("SELECT count(*) FROM t")[0][0] == 0
