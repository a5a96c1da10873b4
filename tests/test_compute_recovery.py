"""Crash recovery of the compute service: whatever a daemon left when it went away, the
next ``open`` finds from the state database and makes true again.

A daemon "crash" is a service that is closed without any clean-up (its rows stay as they
were: ``creating``, ``removing``, ``running``), then a new service opened on the same root.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_compute_service import (
    EMPTY,
    created_ids,
    doc,
    e2e,
    host_leftovers,
    leftovers,
    runtime_freed,
    sh,
    short_run,  # noqa: F401 - a fixture
)

from isobox.compute.db import ComputeDB
from isobox.compute.service import ComputeService
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore


@pytest.fixture
def image(isobox_env: Path) -> Path:
    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    return isobox_env


def opened(monitors: bool = True) -> ComputeService:
    s = ComputeService()
    s.open(monitors=monitors)
    return s


def test_crash_inside_create_is_rolled_back(image: Path) -> None:
    a = opened(monitors=False)
    row = a.create(doc(name="half"))
    cid = row["id"]
    # As if the daemon died after the scratch layer was made, before the plan was written:
    # the row is still `creating` and the plan's record exists without its file.
    a.db.update(cid, state="creating")
    os.unlink(a.container_dir(cid) / "plan.json")
    a.close()

    b = opened(monitors=False)
    try:
        assert leftovers(b) == EMPTY
        assert b.enumerate() == []
        b.create(doc(name="half"))  # the name is free again
    finally:
        b.close()


def test_crash_inside_remove_is_finished(image: Path) -> None:
    a = opened(monitors=False)
    cid = a.create(doc(name="doomed"))["id"]
    a.db.update(cid, state="removing")
    a.close()
    b = opened(monitors=False)
    try:
        assert leftovers(b) == EMPTY
        assert [e["action"] for e in b.events(follow=False)] == ["create", "destroy"]
    finally:
        b.close()


def test_invisible_creating_rows(image: Path) -> None:
    s = opened(monitors=False)
    try:
        cid = s.create(doc(name="c"))["id"]
        s.db.update(cid, state="creating")
        assert s.enumerate() == []
        with pytest.raises(Exception, match="no such container"):
            s.inspect(cid)
    finally:
        s.close()


# ---- with real monitors -------------------------------------------------------------


@pytest.fixture
def env(image: Path, short_run: Path) -> Iterator[Path]:  # noqa: F811
    yield image
    s = opened()
    ids = created_ids(s)
    for info in s.enumerate():
        s.remove(info["id"], force=True)
    s.close()
    assert host_leftovers(image, ids) == []
    assert os.listdir(image / "containers") == []
    assert os.listdir(short_run / "containers") == []


def monitor_pid(s: ComputeService, cid: str) -> int:
    return int(s.db.allocations(cid, ["monitor"])[0].data["pid"])


def gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return not os.path.exists(f"/proc/{pid}")


@e2e
def test_running_container_is_adopted(env: Path) -> None:
    a = opened()
    cid = a.create(sh("sleep 1000", name="keep"))["id"]
    a.start("keep")
    pid = a.inspect("keep")["pid"]
    a.close()  # the daemon goes away; the monitor and the container stay

    b = opened()
    try:
        info = b.inspect("keep")
        assert info["state"] == "running" and info["pid"] == pid
        assert any("sleep" in p["command"] for p in b.top("keep")["processes"])
        b.kill("keep")
        assert b.wait("keep", timeout=30)["exitCode"] == 137
        assert runtime_freed(b, cid)
        actions = [e["action"] for e in b.events(follow=False, filters={"container": cid})]
        assert actions == ["create", "start", "kill", "die"]
    finally:
        b.close()


@e2e
def test_exit_while_the_daemon_is_down_is_recorded(env: Path) -> None:
    a = opened()
    cid = a.create(sh("sleep 0.3; exit 7", name="quick", isolation="host"))["id"]
    tmp = a.create(sh("sleep 0.3; exit 3", name="tmp", autoRemove=True))["id"]
    a.start("quick")
    a.start("tmp")
    mons = [monitor_pid(a, cid), monitor_pid(a, tmp)]
    a.close()
    assert all(gone(p) for p in mons)

    b = opened()
    try:
        info = b.inspect("quick")
        assert info["state"] == "stopped" and info["exitCode"] == 7 and info["error"] is None
        assert {x.kind for x in b.db.allocations(cid)} == {"dir", "scratch", "plan"}
        assert [i["name"] for i in b.enumerate()] == ["quick"]  # tmp was auto-removed
        b.start("quick")  # and it runs again
        assert b.wait("quick", timeout=30)["exitCode"] == 7
    finally:
        b.close()


@e2e
@pytest.mark.parametrize("isolation", ["process", "host"])
def test_lost_monitor(env: Path, isolation: str) -> None:
    a = opened()
    cid = a.create(sh("sleep 1000", name="orphan", isolation=isolation))["id"]
    a.start("orphan")
    mon = monitor_pid(a, cid)
    a.close()
    os.kill(mon, signal.SIGKILL)  # the monitor dies without cleaning up anything
    assert gone(mon)
    left = host_leftovers(env, [cid])
    # Its root mount is left; so are its processes, except that a host job's own reaper
    # (isobox.jobs.reaper) may have killed them already when its owner died.
    assert any(cid in x for x in left), left
    assert isolation == "host" or any(x.startswith("pid ") for x in left), left

    b = opened()
    try:
        info = b.inspect("orphan")
        assert info["state"] == "stopped" and info["error"] == "monitor lost"
        # Its container's processes, cgroup and root mount went with the recovery.
        assert host_leftovers(env, [cid]) == []
        b.start("orphan")  # the container is usable again
        assert b.inspect("orphan")["state"] == "running"
        b.remove("orphan", force=True)
        assert host_leftovers(env, [cid]) == []
    finally:
        b.close()


@e2e
def test_exit_recorded_then_crash_before_release(env: Path) -> None:
    """The exit is recorded before the run's resources are released: a daemon that dies in
    between leaves a stopped row with runtime records, which the next open frees."""
    a = opened()
    cid = a.create(sh("sleep 1000", name="half-released"))["id"]
    a.start("half-released")
    mon = monitor_pid(a, cid)
    a.close()
    os.kill(mon, signal.SIGKILL)  # nothing of the run is released by its monitor
    assert gone(mon)
    db = ComputeDB(env / "state.db")  # as if the crashed daemon had recorded the exit only
    db.update(cid, state="stopped", pid=0, exit_code=137, signal=9)
    db.close()
    assert host_leftovers(env, [cid]) != []

    b = opened()
    try:
        assert host_leftovers(env, [cid]) == []
        assert {x.kind for x in b.db.allocations(cid)} == {"dir", "scratch", "plan"}
        info = b.inspect("half-released")
        assert info["state"] == "stopped" and info["exitCode"] == 137
        b.start("half-released")
        assert b.inspect("half-released")["state"] == "running"
    finally:
        b.close()
