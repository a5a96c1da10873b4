"""Review of issue 5: a daemon killed inside ``start`` leaves a monitor recovery never sees.

``ComputeService.start`` spawns the monitor (the container is created, its process waits),
then asks it to ``start``, then records ``running``. A daemon killed -9 between those steps
leaves a row in ``created`` with a live monitor: ``_recover`` only looks at rows that are
``creating``, ``removing``, ``running``/``paused`` or stopped auto-remove ones, so

* killed after the monitor's ``start``: the container runs, ``isobox ps`` says Created,
  ``wait`` blocks, ``logs`` shows its output;
* killed before it: the orphan monitor waits for ever; the next ``start`` spawns a second
  monitor on the same socket, rootfs and cgroup, and when the orphan's waiting process is
  killed by the new run's cgroup set-up the orphan tears down *the new run's* socket and
  mount: the running container can no longer be stopped (``no monitor listens``; ``stop``
  fails after 30 s) and its process is left on the host.

The crash is made exact by running the service in a subprocess whose
``MonitorClient.start`` kills its own process (as ``kill -9`` at that instruction would);
then the real ``isoboxd`` is started on the same folders.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit import Daemon, assert_nothing_left, leftovers, short_run_dir

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1]

_CRASH = r"""
import os, signal, sys
from pathlib import Path
from isobox.compute import monitor_client
from isobox.compute.service import ComputeService
from isobox.spec.compute import parse_document

root, run, mode, name, script = sys.argv[1:6]
real = monitor_client.MonitorClient.start

def crashing_start(self):
    if mode == "after":
        real(self)
    os.kill(os.getpid(), signal.SIGKILL)  # isoboxd killed -9 right here

monitor_client.MonitorClient.start = crashing_start
svc = ComputeService(Path(root), Path(run))
svc.open()
r = svc.create(parse_document({"schemaVersion": "1.0", "image": "busybox:latest",
                               "name": name, "process": {"args": ["sh", "-c", script]}}))
print(r["id"], flush=True)
svc.start(r["id"])
"""


class Env:
    def __init__(self, root: Path, run: Path) -> None:
        self.root, self.run = root, run
        self.sleep = str(90000 + secrets.randbelow(10000))  # marks this test's processes
        self.ids: list[str] = []

    def crash_in_start(self, mode: str, name: str) -> str:
        env = dict(os.environ, ISOBOX_ROOT=str(self.root), ISOBOX_RUN=str(self.run))
        proc = subprocess.run(
            [sys.executable, "-c", _CRASH, str(self.root), str(self.run), mode, name,
             f"echo started; exec sleep {self.sleep}"],
            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        cid = proc.stdout.strip()
        assert len(cid) == 64, (proc.stdout, proc.stderr)
        self.ids.append(cid)
        return cid

    def kill_strays(self) -> None:
        """Whatever a failing run left: the container's ``sleep`` and orphan monitors."""
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (p / "cmdline").read_bytes() == f"sleep\0{self.sleep}\0".encode():
                    os.kill(int(p.name), signal.SIGKILL)
        for item in leftovers(self.root, self.run, self.ids):
            if item.startswith("pid "):
                with contextlib.suppress(OSError):
                    os.kill(int(item.split()[1].rstrip(":")), signal.SIGKILL)


@pytest.fixture
def env(isobox_env: Path) -> Iterator[Env]:
    with short_run_dir() as run:
        d = Daemon.start(isobox_env, run)
        try:
            r = d.request("POST", "/v1/images/bootstrap", json={"kind": "busybox"})
            assert r.status == 201, r.text
        finally:
            assert d.stop() == 0, d.log()
        e = Env(isobox_env, run)
        try:
            yield e
        finally:
            time.sleep(0.5)
            e.kill_strays()
            d = Daemon.start(isobox_env, run)
            try:
                for cid in e.ids:
                    d.request("DELETE", f"/v1/compute-systems/{cid}", query={"force": 1})
            finally:
                d.stop()
            e.kill_strays()
            assert_nothing_left(isobox_env, run, e.ids)


def test_review_crash_after_the_monitor_started_is_adopted_as_running(env: Env) -> None:
    cid = env.crash_in_start("after", "crash-after")
    with Daemon.start(env.root, env.run) as d:
        info = d.request("GET", f"/v1/compute-systems/{cid}").json()
        with d.client.lines(f"/v1/compute-systems/{cid}/logs") as entries:
            lines = [e["line"] for e in entries]
        assert lines == ["started\n"]  # the process runs ...
        assert info["state"] == "running", (
            f"the container runs, but a restarted isoboxd reports it {info['state']!r}")
        r = d.request("POST", f"/v1/compute-systems/{cid}/stop", json={"timeout": 1})
        assert r.status == 204, r.text
        r = d.request("POST", f"/v1/compute-systems/{cid}/wait", query={"timeout": 10})
        assert r.status == 200 and r.json()["exitCode"] == 137, r.text


def test_review_crash_before_the_monitor_started_leaves_no_orphan(env: Env) -> None:
    cid = env.crash_in_start("before", "crash-before")
    with Daemon.start(env.root, env.run) as d:
        info = d.request("GET", f"/v1/compute-systems/{cid}").json()
        assert info["state"] == "created"
        assert d.request("POST", f"/v1/compute-systems/{cid}/start").status == 204
        time.sleep(3)  # the orphan monitor of the crashed start ends meanwhile
        top = d.request("GET", f"/v1/compute-systems/{cid}/top")
        assert top.status == 200, f"the running container lost its monitor: {top.text}"
        t0 = time.monotonic()
        r = d.request("POST", f"/v1/compute-systems/{cid}/stop", json={"timeout": 1})
        assert r.status == 204 and time.monotonic() - t0 < 10, r.text
        with d.client.lines(f"/v1/compute-systems/{cid}/logs") as entries:
            assert [e["line"] for e in entries] == ["started\n"]
