"""The compute service: state, names, lookups, validation and the release list (these run
without monitors), then real containers end to end (further below)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from isobox.compute.service import ComputeService, parse_signal
from isobox.errors import (
    Conflict,
    ImageNotFound,
    InvalidArgument,
    InvalidDocument,
    NotFound,
    UnsafeLayer,
    WaitTimeout,
)
from isobox.spec import stream as S
from isobox.spec.compute import ComputeSystem, ExecSpec, parse_document
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore

F = TypeVar("F", bound=Callable[..., Any])


def doc(**kw: object) -> ComputeSystem:
    base: dict[str, object] = {"schemaVersion": "1.0", "image": "busybox:latest"}
    base.update(kw)
    return parse_document(base)


@pytest.fixture
def svc(isobox_env: Path) -> Iterator[ComputeService]:
    """A service on the test's own root with the busybox image, opened without monitors."""
    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    s = ComputeService()
    s.open(monitors=False)
    yield s
    s.close()


def leftovers(s: ComputeService) -> dict[str, object]:
    """Everything a container could leave behind in the state and on disk."""
    return {
        "rows": [r.id for r in s.db.all()],
        "allocations": s.db.db.query("SELECT * FROM allocations"),
        "leases": s.store.db.query("SELECT * FROM leases"),
        "containers": sorted(os.listdir(s.root / "containers")),
        "run": sorted(os.listdir(s.run / "containers")),
    }


EMPTY = {"rows": [], "allocations": [], "leases": [], "containers": [], "run": []}


# ---- create, lookups, names ---------------------------------------------------------


def test_create_makes_row_folder_scratch_and_plan(svc: ComputeService) -> None:
    res = svc.create(doc(name="web", labels={"tier": "front"}))
    assert res["name"] == "web" and len(res["id"]) == 64 and res["warnings"] == []
    info = svc.inspect("web")
    assert info["state"] == "created" and info["id"] == res["id"]
    assert info["imageId"].startswith("sha256:") and info["image"] == "busybox:latest"
    assert info["pid"] == 0 and info["exitCode"] is None and info["startedAt"] is None
    assert info["labels"] == {"tier": "front"}
    assert info["document"]["id"] == res["id"] and info["document"]["name"] == "web"
    cdir = svc.container_dir(res["id"])
    assert (cdir / "plan.json").is_file() and (cdir / "scratch" / "upper").is_dir()
    assert info["scratch"] == str(cdir / "scratch")
    kinds = [a.kind for a in svc.db.allocations(res["id"])]
    assert kinds == ["plan", "scratch", "dir"]  # newest first: the order they are freed in
    assert svc.store.leases(f"container:{res['id']}")


def test_refs_by_id_prefix_and_name(svc: ComputeService) -> None:
    a = svc.create(doc(id="ab" + "0" * 62, name="one"))
    b = svc.create(doc(id="ac" + "0" * 62, name="two"))
    assert svc.inspect("ab")["id"] == a["id"]
    assert svc.inspect("two")["id"] == b["id"]
    assert svc.inspect(a["id"])["name"] == "one"
    with pytest.raises(NotFound, match="ambiguous"):
        svc.inspect("a")
    for call in (lambda: svc.inspect("nope"), lambda: svc.remove("nope"),
                 lambda: svc.start("nope"), lambda: svc.kill("nope"),
                 lambda: svc.pause("nope"), lambda: svc.wait("nope", timeout=0.1),
                 lambda: list(svc.logs("nope"))):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.http_status == 404


def test_name_is_unique_even_under_a_race(svc: ComputeService) -> None:
    svc.create(doc(name="dup"))
    with pytest.raises(Conflict, match="already in use") as info:
        svc.create(doc(name="dup"))
    assert info.value.http_status == 409
    wins: list[str] = []
    losses: list[Exception] = []

    def one() -> None:
        try:
            wins.append(svc.create(doc(name="race"))["id"])
        except Conflict as exc:
            losses.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    # The losers left nothing: one folder per container that exists.
    assert sorted(os.listdir(svc.root / "containers")) == sorted(r.id for r in svc.db.all())


def test_same_id_twice_is_a_conflict(svc: ComputeService) -> None:
    cid = "f" * 64
    svc.create(doc(id=cid, name="x1"))
    with pytest.raises(Conflict):
        svc.create(doc(id=cid, name="x2"))
    assert svc.inspect(cid)["name"] == "x1"


def test_generated_names_are_distinct(svc: ComputeService) -> None:
    names = {svc.create(doc())["name"] for _ in range(20)}
    assert len(names) == 20
    assert all("_" in n for n in names)


def test_validation_errors(svc: ComputeService, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # No utility-VM assets here (an empty asset folder): vm is refused, naming why. (Where
    # they exist, vm runs: tests/test_vm_isolation.py.)
    monkeypatch.setenv("ISOBOX_UVM_DIR", str(tmp_path / "no-uvm-assets"))
    with pytest.raises(ImageNotFound):
        svc.create(doc(image="nosuch:1"))
    with pytest.raises(InvalidArgument, match=r"vm isolation.*isobox uvm build"):
        svc.create(doc(isolation="vm"))
    with pytest.raises(InvalidDocument):
        doc(name="bad name")
    res = svc.create(doc(name="v"))
    with pytest.raises(InvalidArgument, match="vm isolation"):
        svc.start(res["id"], isolation="vm")
    with pytest.raises(InvalidArgument, match="signal"):
        parse_signal("SIGNOPE")
    assert parse_signal("term") == 15 and parse_signal("SIGKILL") == 9 and parse_signal(9) == 9
    with pytest.raises(InvalidArgument):
        svc.wait("v", condition="whenever")
    with pytest.raises(InvalidArgument):
        list(svc.events(filters={"colour": "red"}, follow=False))
    assert leftovers(svc)["rows"] == [res["id"]]


def test_actions_in_the_wrong_state_are_conflicts(svc: ComputeService) -> None:
    svc.create(doc(name="idle"))
    for call in (lambda: svc.pause("idle"), lambda: svc.resume("idle"),
                 lambda: svc.kill("idle"), lambda: svc.top("idle")):
        with pytest.raises(Conflict, match="it is created"):
            call()
    svc.stop("idle")  # a container that does not run is left as it is


def test_enumerate_filters(svc: ComputeService) -> None:
    svc.create(doc(name="a1", labels={"app": "x", "tier": "db"}))
    svc.create(doc(name="a2", labels={"app": "y"}, isolation="host"))
    svc.create(doc(name="b3"))
    names = lambda **kw: sorted(i["name"] for i in svc.enumerate(**kw))  # noqa: E731
    assert names() == ["a1", "a2", "b3"]
    assert names(name="a") == ["a1", "a2"]
    assert names(isolation="host") == ["a2"]
    assert names(labels={"app": None}) == ["a1", "a2"]
    assert names(labels={"app": "x"}) == ["a1"]
    assert names(labels={"app": "x", "tier": "web"}) == []
    assert names(states=["created"]) == ["a1", "a2", "b3"]
    assert names(states=["running"]) == []
    assert svc.info()["containers"] == {"created": 3}


# ---- failures roll back; removal frees everything ------------------------------------


def test_create_failure_leaves_nothing(svc: ComputeService) -> None:
    # No command at all: the plan step (after the folder and the scratch layer) fails.
    with pytest.raises(InvalidArgument, match="no command"):
        svc.create(doc(name="nocmd", process={"entrypoint": []}))
    assert leftovers(svc) == EMPTY
    svc.create(doc(name="nocmd"))  # and the name is free again


def test_create_failure_when_the_folder_cannot_be_made(svc: ComputeService) -> None:
    cid = "e" * 64
    (svc.root / "containers" / cid).write_text("in the way")
    with pytest.raises(Exception, match="create container folder"):
        svc.create(doc(id=cid, name="blocked"))
    # The folder was never ours: release removes what its record names, a file it could
    # not have made is left... but the row and the lease are gone.
    assert svc.db.all() == [] and svc.db.db.query("SELECT * FROM allocations") == []
    assert svc.store.db.query("SELECT * FROM leases") == []


def test_remove_frees_in_reverse_order(svc: ComputeService,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    res = svc.create(doc(name="gone"))
    order: list[str] = []
    real = svc._release_one

    def spy(cid: str, a: object) -> None:
        order.append(a.kind)  # type: ignore[attr-defined]
        real(cid, a)  # type: ignore[arg-type]

    monkeypatch.setattr(svc, "_release_one", spy)
    svc.remove("gone")
    assert order == ["plan", "scratch", "dir"]
    assert leftovers(svc) == EMPTY
    with pytest.raises(NotFound):
        svc.inspect(res["id"])


def test_events_history_and_filters(svc: ComputeService) -> None:
    a = svc.create(doc(name="e1", labels={"k": "v"}))
    svc.create(doc(name="e2"))
    svc.remove("e1")
    evs = list(svc.events(follow=False))
    assert [(e["action"], e["name"]) for e in evs] == [
        ("create", "e1"), ("create", "e2"), ("destroy", "e1")]
    assert evs[0]["id"] == a["id"] and evs[0]["type"] == "container"
    assert evs[0]["attributes"]["image"] == "busybox:latest"
    only = list(svc.events(follow=False, filters={"container": "e1"}))
    assert [e["action"] for e in only] == ["create", "destroy"]
    assert [e["name"] for e in svc.events(follow=False, filters={"event": "destroy"})] == ["e1"]
    assert [e["name"] for e in svc.events(follow=False, filters={"label": "k=v"})] == [
        "e1", "e1"]
    assert list(svc.events(follow=False, since=evs[-1]["time"])) == [evs[-1]]
    assert list(svc.events(follow=False, until="2000-01-01T00:00:00Z")) == []


def test_events_follow_sees_new_events(svc: ComputeService) -> None:
    got: list[str] = []
    stream = svc.events(follow=True)

    def reader() -> None:
        for e in stream:
            got.append(e["action"])
            if len(got) == 2:
                return

    t = threading.Thread(target=reader)
    t.start()
    import time

    time.sleep(0.2)
    svc.create(doc(name="f1"))
    svc.remove("f1")
    t.join(10)
    assert got == ["create", "destroy"]



# ---- end to end: real monitors, real containers -------------------------------------


def e2e(f: F) -> F:
    """Real containers: root, overlay mounts and cgroup v1 (this host's)."""
    return pytest.mark.root(pytest.mark.overlay(pytest.mark.cgroup1(f)))


@pytest.fixture
def short_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short ISOBOX_RUN: a monitor socket path must fit in sun_path (108 bytes), which
    ``$ISOBOX_RUN/containers/<64 hex>/monitor.sock`` under pytest's tmp_path does not."""
    run = Path(tempfile.mkdtemp(prefix="ib", dir="/tmp"))
    monkeypatch.setenv("ISOBOX_RUN", str(run))
    yield run
    shutil.rmtree(run, ignore_errors=True)


def host_leftovers(root: Path, ids: list[str]) -> list[str]:
    """Mounts under the root, and cgroups and processes of the given containers."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        found += [ln.split()[4] for ln in fh if str(root) in ln.split()[4]]
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(dirpath, d) for d in dirnames if d in ids]
        if dirpath.count("/") > 7:
            dirnames.clear()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cgroup") as fh:
                    text = fh.read()
            except OSError:
                continue
            found += [f"pid {pid} in {cid}" for cid in ids if cid in text]
    return found


def created_ids(s: ComputeService) -> list[str]:
    return [e["id"] for e in s.events(follow=False, filters={"event": "create"})]


@pytest.fixture
def live(isobox_env: Path, short_run: Path) -> Iterator[ComputeService]:
    """A service with monitors; at the end every container is removed and the host is
    checked for anything left behind."""
    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    s = ComputeService()
    s.open()
    try:
        yield s
    finally:
        ids = created_ids(s)
        for info in s.enumerate():
            s.remove(info["id"], force=True)
        s.close()
        assert host_leftovers(isobox_env, ids) == []
        assert os.listdir(isobox_env / "containers") == []
        assert os.listdir(short_run / "containers") == []


def runtime_freed(svc: ComputeService, cid: str, timeout: float = 15.0) -> bool:
    """The run's runtime allocations (monitor, mount, cgroup, run folder) are released
    within ``timeout``: only the container's own records are left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if {a.kind for a in svc.db.allocations(cid)} == {"dir", "scratch", "plan"}:
            return True
        time.sleep(0.01)
    return False


def sh(script: str, **kw: object) -> ComputeSystem:
    return doc(process={"args": ["sh", "-c", script]}, **kw)


@e2e
@pytest.mark.parametrize("isolation", ["process", "host"])
def test_run_wait_logs_restart_remove(live: ComputeService, isolation: str) -> None:
    res = live.create(sh("echo out; echo err >&2; exit 3", isolation=isolation, name="r1"))
    live.start("r1")
    assert live.wait("r1", timeout=30) == {"exitCode": 3, "signal": None, "error": None}
    info = live.inspect("r1")
    assert info["state"] == "stopped" and info["exitCode"] == 3 and info["pid"] == 0
    assert info["startedAt"] and info["finishedAt"] and info["isolation"] == isolation
    lines = [(e["stream"], e["line"]) for e in live.logs("r1")]
    assert lines == [("stdout", "out\n"), ("stderr", "err\n")]
    assert [e["line"] for e in live.logs("r1", stderr=False)] == ["out\n"]
    # Between runs only the container's own files are left: runtime allocations are freed
    # (just after the exit is recorded: wait does not wait for the monitor's teardown).
    assert runtime_freed(live, res["id"])
    live.start("r1")
    assert live.wait("r1", timeout=30)["exitCode"] == 3
    assert len(list(live.logs("r1"))) == 4  # every run appends
    actions = [e["action"] for e in live.events(follow=False, filters={"container": "r1"})]
    assert actions == ["create", "start", "die", "start", "die"]
    live.remove("r1")
    with pytest.raises(NotFound):
        live.inspect("r1")


@e2e
def test_start_under_another_isolation_is_stored(live: ComputeService) -> None:
    live.create(sh("cat /proc/self/cgroup >/dev/null; echo $ISOBOX_SANDBOX_MOUNT_POINT",
                   name="iso"))
    live.start("iso", isolation="host")
    live.wait("iso", timeout=30)
    info = live.inspect("iso")
    assert info["isolation"] == "host" and info["document"]["isolation"] == "host"
    assert [e["line"] for e in live.logs("iso")] == [info["rootfs"] + "\n"]
    live.start("iso", isolation="process")
    live.wait("iso", timeout=30)
    assert live.inspect("iso")["isolation"] == "process"
    assert [e["line"] for e in live.logs("iso")][-1] == "\n"


@e2e
def test_stop_escalates_to_sigkill(live: ComputeService) -> None:
    # sh as pid 1 of its namespace ignores SIGTERM: stop must escalate after the timeout.
    live.create(sh("sleep 1000", name="st"))
    live.start("st")
    assert live.inspect("st")["state"] == "running" and live.inspect("st")["pid"] > 0
    t0 = time.monotonic()
    live.stop("st", timeout=1)
    took = time.monotonic() - t0
    info = live.inspect("st")
    assert info["state"] == "stopped" and info["exitCode"] == 137
    assert 1 <= took < 10
    live.stop("st")  # stopping a stopped container is nothing


@e2e
def test_kill_pause_resume_top_stats(live: ComputeService) -> None:
    live.create(sh("while :; do :; done", name="busy", isolation="host"))
    live.start("busy")
    with pytest.raises(Conflict, match="it is running"):
        live.start("busy")
    with pytest.raises(Conflict, match="it is running"):
        live.remove("busy")
    procs = live.top("busy")["processes"]
    assert any("sh" in p["command"] for p in procs)
    samples = []
    for sample in live.stats_stream("busy", interval=0.3):
        samples.append(sample)
        if len(samples) == 3:
            break
    assert samples[0]["cpuPercent"] == 0 and samples[-1]["cpuPercent"] > 20
    assert samples[-1]["cpuUsageNs"] > samples[0]["cpuUsageNs"]
    live.pause("busy")
    assert live.inspect("busy")["state"] == "paused"
    used = live.stats("busy")["cpuUsageNs"]
    time.sleep(0.3)
    assert live.stats("busy")["cpuUsageNs"] - used < 50_000_000  # frozen: (almost) no CPU
    with pytest.raises(Conflict, match="it is paused"):
        live.pause("busy")
    live.resume("busy")
    assert live.inspect("busy")["state"] == "running"
    live.kill("busy", "TERM")
    assert live.wait("busy", timeout=30)["exitCode"] == 143
    actions = [e["action"] for e in live.events(follow=False, filters={"container": "busy"})]
    assert actions == ["create", "start", "pause", "unpause", "kill", "die"]


@e2e
def test_remove_force_of_a_running_container(live: ComputeService) -> None:
    res = live.create(sh("sleep 1000", name="rf"))
    live.start("rf")
    live.remove("rf", force=True)
    with pytest.raises(NotFound):
        live.inspect("rf")
    assert host_leftovers(live.root, [res["id"]]) == []
    assert live.wait(res["id"], condition="removed")["exitCode"] == 137


@e2e
def test_auto_remove(live: ComputeService) -> None:
    res = live.create(sh("exit 5", name="ar", autoRemove=True))
    live.start("ar")
    assert live.wait(res["id"], condition="removed", timeout=30)["exitCode"] == 5
    with pytest.raises(NotFound):
        live.inspect(res["id"])
    actions = [e["action"] for e in live.events(follow=False, filters={"container": res["id"]})]
    assert actions == ["create", "start", "die", "destroy"]


@e2e
def test_wait_timeout_and_follow(live: ComputeService) -> None:
    live.create(sh("echo one; sleep 1; echo two", name="wf"))
    events = live.events(follow=True, filters={"container": "wf"})
    live.start("wf")
    with pytest.raises(WaitTimeout):
        live.wait("wf", timeout=0.2)
    lines = [e["line"] for e in live.logs("wf", follow=True)]
    assert lines == ["one\n", "two\n"]
    assert live.wait("wf", timeout=30)["exitCode"] == 0
    got = []
    for e in events:
        got.append(e["action"])
        if e["action"] == "die":
            break
    assert got == ["start", "die"]


@e2e
def test_attach_and_exec(live: ComputeService) -> None:
    live.create(doc(name="at", process={
        "args": ["sh", "-c", "read line; echo got:$line"], "stdin": True}))
    ours, theirs = socket.socketpair()
    live.start("at", attach=theirs, stdin=True)
    theirs.close()
    ours.sendall(S.encode(S.STDIN, b"hello\n"))
    out, exit_frame = read_stream(ours)
    assert out == b"got:hello\n" and exit_frame["exitCode"] == 0
    ours.close()
    assert live.wait("at", timeout=30)["exitCode"] == 0

    live.create(sh("sleep 1000", name="ex"))
    live.start("ex")
    ours, theirs = socket.socketpair()
    live.exec("ex", ExecSpec(args=["sh", "-c", "echo in-$HOSTNAME; exit 4"]), theirs)
    theirs.close()
    out, exit_frame = read_stream(ours)
    ours.close()
    assert out.startswith(b"in-") and exit_frame["exitCode"] == 4
    live.kill("ex")


def read_stream(sock: socket.socket) -> tuple[bytes, dict[str, Any]]:
    out = b""
    sock.settimeout(30)
    while True:
        frame = S.read_frame(sock)
        assert frame is not None, "stream ended without an exit frame"
        kind, payload = frame
        if kind in (S.STDOUT, S.STDERR):
            out += payload
        elif kind == S.CONTROL:
            msg = S.decode_control(payload)
            if "exit" in msg:
                return out, msg["exit"]


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def untar(chunks: Iterator[bytes]) -> dict[str, tarfile.TarInfo | bytes]:
    buf = io.BytesIO(b"".join(chunks))
    out: dict[str, tarfile.TarInfo | bytes] = {}
    with tarfile.open(fileobj=buf) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            out[m.name] = f.read() if f is not None else m
    return out


@e2e
@pytest.mark.parametrize("running", [False, True])
def test_archive_in_and_out(live: ComputeService, running: bool) -> None:
    # An image-side symlink pointing at the host's /etc: followed inside the root only.
    live.create(sh("mkdir -p /data && ln -s /etc /data/etc-link && ln -s ../../../../.. "
                   "/data/up && echo mine > /data/f; exec sleep 1000", name="cp"))
    live.start("cp")
    deadline = time.monotonic() + 10
    while not list(live.logs("cp")) and time.monotonic() < deadline:
        try:
            got = untar(live.archive_get("cp", "/data/f"))
            break
        except NotFound:
            time.sleep(0.05)
    assert got == {"f": b"mine\n"}
    if not running:
        live.kill("cp")
        live.wait("cp", timeout=30)
    passwd = untar(live.archive_get("cp", "/data/etc-link/passwd"))["passwd"]
    host = Path("/etc/passwd").read_bytes()
    assert isinstance(passwd, bytes) and passwd != host and passwd.startswith(b"root:")
    up = untar(live.archive_get("cp", "/data/up/etc/passwd"))["passwd"]
    assert up == passwd
    tree = untar(live.archive_get("cp", "/data"))
    assert isinstance(tree["data/etc-link"], tarfile.TarInfo)
    assert tree["data/etc-link"].issym() and tree["data/etc-link"].linkname == "/etc"
    with pytest.raises(NotFound):
        list(live.archive_get("cp", "/no/such"))

    live.archive_put("cp", "/data/etc-link", tar_of([file_entry("new.txt", b"hi\n")]))
    assert not Path("/etc/new.txt").exists()
    assert untar(live.archive_get("cp", "/etc/new.txt")) == {"new.txt": b"hi\n"}
    dev = tarfile.TarInfo("null2")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    wh = file_entry(".wh.f", b"")
    for bad in ([file_entry("../escape", b"x")], [file_entry("/abs", b"x")], [(dev, None)],
                [wh]):
        with pytest.raises(UnsafeLayer):
            live.archive_put("cp", "/data", tar_of(bad))
    assert untar(live.archive_get("cp", "/data/f")) == {"f": b"mine\n"}
    with pytest.raises(InvalidArgument):
        live.archive_put("cp", "/data", io.BytesIO(b"not a tar at all" * 64))
    if running:
        live.kill("cp")
        live.wait("cp", timeout=30)
        assert runtime_freed(live, live.inspect("cp")["id"])
    assert [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(live.root) in m] == []


@e2e
@pytest.mark.slow
def test_200_run_rm_cycles_from_4_threads(live: ComputeService) -> None:
    errors: list[BaseException] = []
    fds_before = len(os.listdir("/proc/self/fd"))

    def worker(n: int) -> None:
        try:
            for i in range(50):
                res = live.create(sh(f"exit {i % 7}", autoRemove=i % 2 == 0,
                                     isolation="host" if i % 3 == 0 else "process"))
                live.start(res["id"])
                got = live.wait(res["id"], timeout=60)
                assert got["exitCode"] == i % 7, got
                if i % 2:
                    live.remove(res["id"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert errors == [], "".join(traceback.format_exception(errors[0]))
    deadline = time.monotonic() + 30
    while live.enumerate() and time.monotonic() < deadline:
        time.sleep(0.1)  # the last auto-removes
    assert live.enumerate() == []
    assert len(created_ids(live)) == 200
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 8
