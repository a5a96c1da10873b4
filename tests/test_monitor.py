"""The per-container monitor, for real: silo and host containers from the busybox image,
spawned through the zygote, driven over monitor.sock, and checked for leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from isobox.compute.monitor_client import MonitorClient
from isobox.compute.plan import Plan, build_plan, write_plan
from isobox.compute.spawner import Spawner
from isobox.errors import Conflict, InvalidArgument, NotFound
from isobox.jobs.cgroup import CgroupV1, detect
from isobox.silo.image_root import is_mounted
from isobox.spec import stream as S
from isobox.spec.compute import parse_document
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    st = ImageStore(tmp_path_factory.mktemp("monitor-store"))
    bootstrap_busybox(st)
    yield st
    st.close()


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    sp = Spawner()
    yield sp
    sp.close()


@dataclass
class Box:
    id: str
    plan: Plan
    client: MonitorClient
    pid: int

    @property
    def dir(self) -> Path:
        return Path(self.plan.container_dir)

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def wait_status(self, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.plan.status_path.exists():
                data: dict[str, Any] = json.loads(self.plan.status_path.read_text())
                return data
            time.sleep(0.05)
        raise AssertionError("no status.json")

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.plan.log_path.read_text().splitlines()]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def assert_released(box: Box, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(box.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(box.pid), "the monitor is still running"
    rootfs = Path(box.plan.rootfs)
    assert not is_mounted(rootfs) and not rootfs.exists()
    assert not Path(box.plan.run_dir).exists()
    assert not any(os.path.exists(d) for d in detect(box.id).dirs()), "cgroup left"
    with pytest.raises(NotFound):
        box.client.status()


class Launcher:
    def __init__(self, store: ImageStore, spawner: Spawner, run: Path) -> None:
        self.store, self.spawner, self.run = store, spawner, run
        self.boxes: list[Box] = []

    def plan(self, process: dict[str, Any], isolation: str = "process",
             **doc: Any) -> Plan:
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        document = parse_document({"schemaVersion": "1.0", "image": "busybox",
                                   "isolation": isolation, "process": process, **doc})
        mounts = self.store.prepare_scratch(cid, "busybox")
        image = self.store.config(self.store.get("busybox"))
        plan = build_plan(document, image, mounts, container_id=cid, name=f"t-{cid[:6]}",
                          isolation=isolation,
                          container_dir=self.store.root / "containers" / cid,
                          run_dir=self.run / "containers" / cid)
        write_plan(plan, Path(plan.container_dir) / "plan.json")
        return plan

    def spawn(self, plan: Plan, spawner: Spawner | None = None) -> Box:
        pid = (spawner or self.spawner).spawn(Path(plan.container_dir) / "plan.json")
        box = Box(plan.id, plan, MonitorClient(plan.socket_path), pid)
        self.boxes.append(box)
        return box

    def __call__(self, process: dict[str, Any], isolation: str = "process",
                 **doc: Any) -> Box:
        return self.spawn(self.plan(process, isolation, **doc))

    def cleanup(self) -> None:
        for box in self.boxes:
            if not _gone(box.pid):
                with contextlib.suppress(Exception):  # ended meanwhile
                    box.client.signal(signal.SIGKILL, all=True)
        for box in self.boxes:
            assert_released(box)
            self.store.release_scratch(box.id)


@pytest.fixture
def launch(store: ImageStore, spawner: Spawner, isobox_env: Path) -> Iterator[Launcher]:
    lau = Launcher(store, spawner, Path(os.environ["ISOBOX_RUN"]))
    yield lau
    lau.cleanup()


def read_stream(sock: socket.socket, timeout: float = 15) -> tuple[bytes, bytes, dict[str, Any]]:
    """Output frames until the exit frame: (stdout, stderr, exit)."""
    sock.settimeout(timeout)
    out, err = b"", b""
    while True:
        frame = S.read_frame(sock)
        assert frame is not None, "stream ended without an exit frame"
        kind, payload = frame
        if kind == S.STDOUT:
            out += payload
        elif kind == S.STDERR:
            err += payload
        elif kind == S.CONTROL:
            msg = S.decode_control(payload)
            if "exit" in msg:
                return out, err, msg["exit"]


def read_until(sock: socket.socket, needle: bytes, timeout: float = 10, lines: int = 1
               ) -> bytes:
    """Output until ``needle`` has appeared ``lines`` times."""
    sock.settimeout(timeout)
    got = b""
    while got.count(needle) < lines:
        frame = S.read_frame(sock)
        assert frame is not None, f"stream ended before {needle!r}: {got!r}"
        if frame[0] in (S.STDOUT, S.STDERR):
            got += frame[1]
    return got


def cg_file(cid: str, ctrl: str, name: str) -> str:
    cg = detect(cid)
    assert isinstance(cg, CgroupV1)
    return Path(cg.paths[ctrl], name).read_text().strip()


def wait_for(cond: Any, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- process isolation -------------------------------------------------------------------


def test_run_logs_streams_and_exit_code(launch: Launcher) -> None:
    box = launch({"args": ["sh", "-c", "echo out; echo err >&2; printf partial; exit 3"]})
    assert box.status()["state"] == "created"
    # One attach on the request's own connection, one handed over (as the daemon does).
    direct, reply = box.client.open_stream("attach", stdout=True, stderr=True)
    assert reply == {"ok": True}
    mine, theirs = socket.socketpair()
    box.client.attach(theirs, stdout=True, stderr=False)
    theirs.close()
    pid = box.client.start()
    assert pid > 0
    out, err, ex = read_stream(direct)
    assert (out, err, ex) == (b"out\npartial", b"err\n", {"exitCode": 3, "signal": None})
    out2, err2, ex2 = read_stream(mine)
    assert (out2, err2, ex2["exitCode"]) == (b"out\npartial", b"", 3)
    status = box.wait_status()
    assert status["exitCode"] == 3 and status["signal"] is None and status["error"] is None
    assert status["startedAt"] and status["finishedAt"]
    lines = [(r["s"], r["l"]) for r in box.log()]
    assert ("stdout", "out\n") in lines and ("stderr", "err\n") in lines
    assert ("stdout", "partial") in lines
    assert_released(box)


def test_kill_is_137_and_subscribers_get_the_exit(launch: Launcher) -> None:
    box = launch({"args": ["sleep", "1000"]})
    box.client.start()
    events = box.client.subscribe()
    with pytest.raises(Conflict):
        box.client.start()
    box.client.signal(signal.SIGKILL)
    last = list(events)[-1]
    assert last["exit"]["exitCode"] == 137 and last["exit"]["signal"] == 9
    assert box.wait_status()["exitCode"] == 137
    assert_released(box)


def test_pause_resume_stats_top(launch: Launcher) -> None:
    box = launch({"args": ["sh", "-c", "while true; do echo tick; sleep 0.05; done"]})
    box.client.start()
    wait_for(lambda: len(box.log()) >= 2, what="ticks")
    box.client.pause()
    assert box.status()["state"] == "paused"
    time.sleep(0.3)
    n = len(box.log())
    time.sleep(0.4)
    assert len(box.log()) == n, "output while paused"
    box.client.resume()
    assert box.status()["state"] == "running"
    wait_for(lambda: len(box.log()) > n + 2, what="ticks after resume")
    stats = box.client.stats()
    assert stats["pids"] >= 1 and stats["cpuUsageNs"] > 0 and stats["memoryBytes"] > 0
    top = box.client.top()
    init = [p for p in top if p["containerPid"] == 1]
    assert init and init[0]["command"].startswith("sh -c while true")
    assert init[0]["pid"] == box.status()["pid"]


def test_exec_output_exit_code_and_limits(launch: Launcher) -> None:
    box = launch({"args": ["sleep", "1000"]}, resources={"memory": 64 << 20, "pidsLimit": 50})
    box.client.start()
    mine, theirs = socket.socketpair()
    pid = box.client.exec(theirs, {"args": ["sh", "-c", "echo in-exec; hostname; exit 5"],
                                   "env": ["X=1"]})
    theirs.close()
    assert pid > 0
    out, _, ex = read_stream(mine)
    assert out == f"in-exec\n{box.id[:12]}\n".encode() and ex["exitCode"] == 5
    stats = box.client.stats()
    assert stats["memoryLimit"] == 64 << 20 and stats["pidsLimit"] == 50
    assert int(cg_file(box.id, "memory", "memory.limit_in_bytes")) == 64 << 20
    assert cg_file(box.id, "pids", "pids.max") == "50"
    # The exec's output is not the container's log.
    assert all("in-exec" not in r["l"] for r in box.log())


def test_tty_attach_and_exec(launch: Launcher) -> None:
    box = launch({"args": ["sh", "-c", "tty; sleep 1000"], "tty": True})
    sock, _ = box.client.open_stream("attach", stdout=True)
    box.client.start()
    got = read_until(sock, b"\n")
    assert got.startswith(b"/dev/pts/"), got
    mine, theirs = socket.socketpair()
    box.client.exec(theirs, {"args": ["sh", "-c", "tty; stty size"], "tty": True})
    theirs.close()
    out, _, ex = read_stream(mine)
    assert out.startswith(b"/dev/pts/") and ex["exitCode"] == 0, out
    # A tty logs everything as stdout.
    assert all(r["s"] == "stdout" for r in box.log())


def test_stdin_forwarding_and_resize(launch: Launcher) -> None:
    box = launch({"args": ["cat"], "stdin": True})
    sock, _ = box.client.open_stream("attach", stdin=True, stdout=True, stderr=True)
    box.client.start()
    sock.sendall(S.encode(S.STDIN, b"hello\n"))
    assert read_until(sock, b"hello\n") == b"hello\n"
    S.send_control(sock, {"closeStdin": True})
    sock.shutdown(socket.SHUT_WR)  # done sending: the stream still brings the exit
    out, _, ex = read_stream(sock)
    assert out == b""  # nothing after the echo
    assert ex["exitCode"] == 0
    assert box.wait_status()["exitCode"] == 0


def test_tty_stdin_and_resize(launch: Launcher) -> None:
    box = launch({"args": ["sh"], "stdin": True, "tty": True})
    sock, _ = box.client.open_stream("attach", stdin=True, stdout=True)
    box.client.start()
    S.send_control(sock, {"resize": [33, 99]})
    sock.sendall(S.encode(S.STDIN, b"stty size; exit 7\n"))
    out, _, ex = read_stream(sock)
    assert b"33 99" in out and ex["exitCode"] == 7


def test_monitor_survives_its_spawner(launch: Launcher) -> None:
    sp = Spawner()
    plan = launch.plan({"args": ["sh", "-c", "while true; do echo tick; sleep 0.1; done"]})
    box = launch.spawn(plan, sp)
    box.client.start()
    ppid = int(Path(f"/proc/{box.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid() and ppid != sp.zygote_pid
    os.kill(sp.zygote_pid, signal.SIGKILL)
    wait_for(lambda: _gone(sp.zygote_pid), what="zygote death")
    n = len(box.log())
    wait_for(lambda: len(box.log()) > n + 3, what="more output")
    assert box.status()["state"] == "running"
    # The dead zygote is replaced on the next spawn.
    second = launch.spawn(launch.plan({"args": ["true"]}), sp)
    assert second.status()["state"] == "created"
    sp.close()
    assert box.status()["state"] == "running"


def test_failing_create_leaves_nothing(launch: Launcher) -> None:
    plan = launch.plan({"args": ["true"], "cwd": "/etc/passwd"})
    with pytest.raises(InvalidArgument, match="not a directory"):
        launch.spawner.spawn(Path(plan.container_dir) / "plan.json")
    assert not is_mounted(Path(plan.rootfs)) and not Path(plan.rootfs).exists()
    assert not Path(plan.run_dir).exists()
    assert not any(os.path.exists(d) for d in detect(plan.id).dirs())
    plan2 = launch.plan({"args": ["true"]})
    plan2.lower = [*plan2.lower, "/nonexistent-layer"]
    write_plan(plan2, Path(plan2.container_dir) / "plan.json")
    with pytest.raises(NotFound, match="nonexistent-layer"):
        launch.spawner.spawn(Path(plan2.container_dir) / "plan.json")
    assert not Path(plan2.run_dir).exists()
    for p in (plan, plan2):
        launch.store.release_scratch(p.id)
    # The zygote outlived the failing monitors.
    box = launch({"args": ["true"]})
    box.client.start()
    assert box.wait_status()["exitCode"] == 0


@pytest.mark.parametrize("isolation", ["process", "host"])
def test_processes_start_with_default_signals(launch: Launcher, isolation: str) -> None:
    """Python (monitor, zygote) ignores SIGPIPE; a container's process must not."""
    box = launch({"args": ["sh", "-c", "grep SigIgn /proc/self/status; yes | head -n1"]},
                 isolation=isolation)
    sock, _ = box.client.open_stream("attach")
    box.client.start()
    out, err, ex = read_stream(sock)
    head, _, rest = out.partition(b"\n")
    ignored = int(head.split(b"\t")[1], 16)
    # Signals 32 and 33 are glibc's own (thread cancellation, setxid): sigaction refuses
    # them, so an ignore inherited from whoever started the engine cannot be undone — and no
    # program may use them. Every other signal must be at its default.
    assert ignored & ~((1 << 31) | (1 << 32)) == 0, hex(ignored)
    assert (rest, err, ex["exitCode"]) == (b"y\n", b"", 0)


def test_spawner_made_with_threads_execs_its_zygote(launch: Launcher) -> None:
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        sp = Spawner()
    finally:
        stop.set()
        t.join()
    try:
        cmdline = Path(f"/proc/{sp.zygote_pid}/cmdline").read_bytes().split(b"\0")
        assert b"isobox.compute.spawner" in cmdline
        box = launch.spawn(launch.plan({"args": ["sh", "-c", "exit 6"]}), sp)
        box.client.start()
        assert box.wait_status()["exitCode"] == 6
    finally:
        sp.close()


def test_pids_limit_event(launch: Launcher) -> None:
    box = launch({"args": ["sh", "-c", "sleep 0.5; for i in 1 2 3 4 5 6; do sleep 9 & done; "
                           "wait"]}, resources={"pidsLimit": 4})
    events = box.client.subscribe()
    box.client.start()
    first = next(events)
    assert first["event"]["action"] == "limit"
    assert first["event"]["attributes"]["limit"] == "pids"
    # busybox sh gives up when it cannot fork.
    assert list(events)[-1]["exit"]["exitCode"] == 2
    assert "can't fork" in box.log()[-1]["l"]


# ---- host isolation ----------------------------------------------------------------------


def test_host_isolation(launch: Launcher) -> None:
    box = launch({"args": ["sh", "-c", "hostname; echo $ISOBOX_SANDBOX_MOUNT_POINT; "
                           "ls $ISOBOX_SANDBOX_MOUNT_POINT/bin/busybox; pwd; exec sleep 1000"]},
                 isolation="host", resources={"memory": 64 << 20, "pidsLimit": 20})
    sock, _ = box.client.open_stream("attach")
    box.client.start()
    got = read_until(sock, b"\n", lines=4)
    lines = got.decode().split("\n")
    assert lines[3] == box.plan.rootfs  # the image's WorkingDir (none: /) under the mount
    assert lines[0] == socket.gethostname()
    assert lines[1] == box.plan.rootfs
    assert lines[2] == box.plan.rootfs + "/bin/busybox"
    assert int(cg_file(box.id, "memory", "memory.limit_in_bytes")) == 64 << 20
    assert cg_file(box.id, "pids", "pids.max") == "20"
    stats = box.client.stats()
    assert stats["pidsLimit"] == 20 and stats["totalProcesses"] is not None
    top = box.client.top()
    assert any(p["command"] == "sleep 1000" for p in top)
    mine, theirs = socket.socketpair()
    box.client.exec(theirs, {"args": ["sh", "-c", "echo $ISOBOX_SANDBOX_MOUNT_POINT; exit 4"]})
    theirs.close()
    out, _, ex = read_stream(mine)
    assert out == box.plan.rootfs.encode() + b"\n" and ex["exitCode"] == 4
    box.client.signal(signal.SIGTERM)
    _, _, ex = read_stream(sock)
    assert ex == {"exitCode": 128 + signal.SIGTERM, "signal": signal.SIGTERM}
    assert_released(box)


def test_host_kill_before_start(launch: Launcher) -> None:
    box = launch({"args": ["true"]}, isolation="host")
    box.client.signal(signal.SIGKILL)
    assert box.wait_status()["exitCode"] == 137
    assert_released(box)


@pytest.mark.parametrize(("argv0", "code"), [("no-such-program-here", 127),
                                              ("/etc/passwd", 126)])
def test_host_program_that_cannot_run_exits_126_127(launch: Launcher, argv0: str,
                                                    code: int) -> None:
    """As process isolation (and docker): the run happens and ends with 127 (not found) or
    126 (not executable), in the exit frame and status.json, with why on stderr."""
    box = launch({"args": [argv0]}, isolation="host")
    sock, _ = box.client.open_stream("attach")
    box.client.start()
    out, err, ex = read_stream(sock)
    assert ex == {"exitCode": code, "signal": None}
    assert out == b"" and argv0.encode() in err
    assert box.wait_status()["exitCode"] == code
    assert_released(box)


def test_host_mounts_below_the_mount_point_and_read_only_root(launch: Launcher,
                                                              tmp_path: Path) -> None:
    """Mapped folders are bound below the sandbox mount point (read-only when asked), the
    root is read-only with readOnly, and every bind is gone after the run."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "f").write_text("ro\n")
    script = ('m=$ISOBOX_SANDBOX_MOUNT_POINT; cat $m/ro/f; echo hi > $m/rw/out; '
              'touch $m/ro/x 2>/dev/null || echo RO-BIND; touch $m/new 2>/dev/null '
              '|| echo RO-ROOT')
    box = launch({"args": ["sh", "-c", script]}, isolation="host", readOnly=True,
                 mounts=[{"source": str(rw), "destination": "/rw"},
                         {"source": str(ro), "destination": "/ro", "readOnly": True}])
    sock, _ = box.client.open_stream("attach")
    box.client.start()
    out, err, ex = read_stream(sock)
    assert (out, ex["exitCode"]) == (b"ro\nRO-BIND\nRO-ROOT\n", 0), err
    assert (rw / "out").read_text() == "hi\n" and not (ro / "x").exists()
    assert_released(box)
    with open("/proc/self/mountinfo") as fh:
        assert not [line for line in fh if box.plan.rootfs in line]
