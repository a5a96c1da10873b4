"""The guest agent and its protocol, on the host: the agent is plain Python over silo and
jobs, so it runs here as a subprocess on a unix socket, driving real busybox containers
(real namespaces, overlay, cgroups) exactly as it does inside a utility VM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from isobox.agent import protocol as P
from isobox.agent.client import AgentClient, ProcessStream
from isobox.errors import Conflict, InvalidArgument, InvalidDocument, NotFound

# ---- protocol (pure) -----------------------------------------------------------------------


def test_header_layout_is_fixed_and_little_endian() -> None:
    raw = P.request(7, "negotiate", versions=[1])
    word, length, fid = struct.unpack("<IIQ", raw[:16])
    assert word == 0x1B0A0001 and fid == 7 and length == len(raw) - 16
    assert json.loads(raw[16:]) == {"op": "negotiate", "versions": [1]}
    d = P.data(5, P.STDERR, b"xy")
    assert struct.unpack("<IIQ", d[:16]) == (0x1B0A0004, 2, 5 << 2 | 2)
    assert P.split_key(5 << 2 | 2) == (5, P.STDERR)


def test_reader_takes_frames_fed_byte_by_byte() -> None:
    stream = P.request(1, "a") + P.data(3, P.STDOUT, b"hello") + P.notification("ready")
    r = P.FrameReader()
    got = []
    for i in range(len(stream)):
        got += r.frames(stream[i:i + 1])
    assert [(f.kind, f.id) for f in got] == [(P.REQUEST, 1), (P.DATA, 13),
                                            (P.NOTIFICATION, 0)]
    assert got[1].body == b"hello" and got[2].json() == {"event": "ready"}
    assert r.pending == 0


def test_reader_refuses_a_bad_header_and_resynchronises() -> None:
    bad_magic = struct.pack("<IIQ", 0xDEAD0001, 2, 1) + b"{}"
    bad_kind = struct.pack("<IIQ", P.MAGIC | 9, 0, 1)
    too_big = struct.pack("<IIQ", P.MAGIC | P.REQUEST, P.MAX_JSON + 1, 1)
    good = P.request(42, "top", id="x")
    r = P.FrameReader()
    r.feed(b"garbage!" + bad_magic + bad_kind + too_big + good)
    errors, frames = 0, []
    for _ in range(50):
        try:
            f = r.next()
        except P.ProtocolError:
            errors += 1
            continue
        if f is None:
            break
        frames.append(f)
    assert errors >= 3
    assert [(f.kind, f.id) for f in frames] == [(P.REQUEST, 42)]


def test_limits_and_bodies() -> None:
    with pytest.raises(ValueError):
        P.encode(P.DATA, 4, b"x" * (P.MAX_DATA + 1))
    with pytest.raises(ValueError):
        P.encode(P.REQUEST, 1, b"x" * (P.MAX_JSON + 1))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode_header(struct.pack("<IIQ", P.MAGIC | P.DATA, P.MAX_DATA + 1, 4))
    with pytest.raises(P.ProtocolError, match="not a JSON object"):
        P.Frame(P.REQUEST, 1, b"[1]").json()
    with pytest.raises(P.ProtocolError, match="not JSON"):
        P.Frame(P.REQUEST, 1, b"\xff{").json()
    with pytest.raises(P.ProtocolError):
        P.split_key(4 << 2 | 3)


def test_version_pick_and_mismatch() -> None:
    assert P.pick_version([1, 2, 3], (1, 2)) == 2
    with pytest.raises(P.VersionMismatch, match=r"host speaks \[7\], the guest \[1\]"):
        P.pick_version([7], (1,))
    with pytest.raises(P.ProtocolError):
        P.pick_version("1")


def test_errors_cross_the_wire_as_their_class() -> None:
    for exc in (NotFound("nope"), Conflict("busy"), InvalidArgument("bad"),
                P.VersionMismatch("v")):
        back = P.error_from_wire(P.error_to_wire(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert "ValueError: x" in str(P.error_from_wire(P.error_to_wire(ValueError("x"))))


def test_silo_config_json_round_trip(tmp_path: Path) -> None:
    from isobox.silo.config import from_json, from_oci, to_json
    from isobox.spec.runtime import default_config

    oci = default_config(["echo", "hi"])
    assert oci.linux is not None
    oci.linux.sysctl = {"net.ipv4.ip_forward": "1"}
    cfg = from_oci(oci, tmp_path)
    text = json.dumps(to_json(cfg))
    assert from_json(json.loads(text)) == cfg
    doc = json.loads(text)
    doc["process"]["uid"] = "0"
    with pytest.raises(InvalidDocument) as err:
        from_json(doc)
    assert err.value.field == "process.uid"
    doc = json.loads(text)
    doc["mounts"][0]["surprise"] = 1
    with pytest.raises(InvalidDocument) as err:
        from_json(doc)
    assert err.value.field == "mounts[0].surprise"
    doc = json.loads(text)
    doc["limits"]["memory"] = -1
    with pytest.raises(InvalidDocument):
        from_json(doc)


def test_guest_imports_no_pydantic_storage_or_spec() -> None:
    code = ("import sys, isobox.agent.guest\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pydantic', 'sqlite3') or "
            "m.startswith(('isobox.spec', 'isobox.storage', 'isobox.compute'))]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---- the agent on the host ------------------------------------------------------------------


@dataclass
class Env:
    client: AgentClient
    proc: subprocess.Popen[bytes]
    base: Path
    store: Any
    ids: list[str]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.store import ImageStore

    store = ImageStore(tmp_path_factory.mktemp("agent-store"))
    bootstrap_busybox(store)
    return store


def _start_agent(base: Path) -> tuple[AgentClient, subprocess.Popen[bytes]]:
    path = base / "agent.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    lst.settimeout(30)
    err = open(base / "agent.stderr", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "isobox.agent.guest", "--socket", str(path),
         "--state", str(base / "state")], stdin=subprocess.DEVNULL, stderr=err)
    err.close()
    try:
        conn, _ = lst.accept()
    finally:
        lst.close()
    return AgentClient(conn, timeout=30), proc


def _leftovers(base: Path, ids: list[str], marker: str = "") -> list[str]:
    from isobox.jobs.cgroup import cgroup_at

    out = []
    with open("/proc/self/mountinfo") as fh:
        out += [line.split()[4] for line in fh if str(base) in line.split()[4]]
    for cid in ids:
        out += [d for d in cgroup_at(None, cid).dirs() if os.path.isdir(d)]
    if marker:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if marker.encode() in cmd:
                    out.append(f"process {pid}: {cmd!r}")
    return out


@pytest.fixture
def agent(tmp_path: Path, image_store: Any) -> Iterator[Env]:
    client, proc = _start_agent(tmp_path)
    env = Env(client, proc, tmp_path, image_store, [])
    try:
        yield env
    finally:
        if not client.closed:
            with contextlib.suppress(Exception):
                client.shutdown()
        client.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the agent did not end after shutdown")
        for cid in env.ids:
            image_store.release_scratch(cid)
        assert _leftovers(tmp_path, env.ids) == []


def _cid(tag: str) -> str:
    return f"agt-{tag}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def _create(env: Env, args: list[str], *, tty: bool = False, stdin: bool = False,
            memory: int | None = None, tag: str = "c") -> tuple[str, ProcessStream]:
    from isobox.silo.config import from_oci, to_json
    from isobox.spec.runtime import default_config

    cid = _cid(tag)
    mounts = env.store.prepare_scratch(cid, "busybox:latest")
    env.ids.append(cid)
    bundle = env.base / "bundles" / cid
    bundle.mkdir(parents=True)
    cfg = from_oci(default_config(args), bundle)
    if memory:
        from dataclasses import replace

        cfg.limits = replace(cfg.limits, memory=memory)
    stream = env.client.create(
        cid, to_json(cfg), tty=tty, stdin=stdin,
        rootfs={"lower": [str(p) for p in mounts.lower], "upper": str(mounts.upper),
                "work": str(mounts.work)})
    return cid, stream


def _negotiated(env: Env) -> AgentClient:
    env.client.connect(30)
    return env.client


@pytest.mark.root
@pytest.mark.overlay
def test_run_echo_stdout_stderr_and_exit_code(agent: Env) -> None:
    c = _negotiated(agent)
    assert c.ready_info["versions"] == [1] and c.version == 1
    cid, s = _create(agent, ["sh", "-c", "echo hi; echo oops >&2; uname -r; echo $$; "
                             "exit 3"])
    assert s.pid > 0
    assert c.start(cid) == s.pid
    out, err, status = s.collect(20)
    assert out.decode().split() == ["hi", os.uname().release, "1"]
    assert err == b"oops\n"
    assert (status.exit_code, status.signal) == (3, None)
    assert c.wait(s.stream).exit_code == 3  # after the exit, answered at once
    c.delete(cid)
    with pytest.raises(NotFound):
        c.top(cid)


@pytest.mark.root
@pytest.mark.overlay
def test_exec_stats_top_and_signals(agent: Env) -> None:
    c = _negotiated(agent)
    marker = "98765.25"
    cid, s = _create(agent, ["sleep", marker], memory=64 << 20)
    c.start(cid)
    e = c.exec(cid, ["sh", "-c", "echo $FOO $PWD; id -u; exit 5"], env=["FOO=bar"],
               cwd="/tmp", uid=1000, gid=1000)
    out, _, status = e.collect(20)
    assert out.decode().split() == ["bar", "/tmp", "1000"] and status.exit_code == 5
    top = c.top(cid)
    assert [p["command"] for p in top] == [f"sleep {marker}"]
    assert top[0]["containerPid"] == 1
    st = c.stats(cid)
    assert st["pids"] == 1 and st["memoryLimit"] == 64 << 20 and st["memoryBytes"] > 0
    assert st["cpuUsageNs"] > 0
    # An exec'd sleep is not the pid namespace's init: SIGTERM ends it.
    e2 = c.exec(cid, ["sleep", marker])
    time.sleep(0.2)
    assert len(c.top(cid)) == 2
    e2.signal(signal.SIGTERM)
    assert e2.wait(20).signal == signal.SIGTERM
    assert e2.exit is not None and e2.exit.exit_code == 128 + signal.SIGTERM
    c.pause(cid)
    c.resume(cid)
    c.signal(cid, signal.SIGKILL)
    status = s.wait(20)
    assert (status.exit_code, status.signal) == (137, 9)
    c.delete(cid)
    assert _leftovers(agent.base, [cid], marker) == []


@pytest.mark.root
@pytest.mark.overlay
def test_stdin_is_streamed_and_closed(agent: Env) -> None:
    c = _negotiated(agent)
    cid, s = _create(agent, ["sh", "-c", "cat; echo done"], stdin=True)
    c.start(cid)
    payload = os.urandom(200_000).hex().encode()  # 400 kB: many frames, a full pipe
    s.write(payload)
    s.close_stdin()
    out, _, status = s.collect(30)
    assert out == payload + b"done\n" and status.exit_code == 0
    c.delete(cid)


@pytest.mark.root
@pytest.mark.overlay
def test_tty_resize_and_input(agent: Env) -> None:
    c = _negotiated(agent)
    cid, s = _create(agent, ["sh", "-c", "read line; stty size; tty; exit 4"], tty=True,
                     stdin=True)
    c.start(cid)
    s.resize(33, 101)
    s.write(b"go\n")
    out, err, status = s.collect(20)
    text = out.decode()
    assert "33 101" in text and "/dev/pts/" in text and err == b""
    assert status.exit_code == 4
    with pytest.raises(Conflict):
        c.resize(s.stream, 10, 10)  # its terminal is gone with it
    c.delete(cid)


@pytest.mark.root
@pytest.mark.overlay
def test_exec_with_a_tty(agent: Env) -> None:
    c = _negotiated(agent)
    cid, s = _create(agent, ["sleep", "1000"])
    c.start(cid)
    e = c.exec(cid, ["sh", "-c", "read x; stty size; echo got $x"], tty=True, stdin=True)
    e.resize(24, 77)
    e.write(b"abc\n")
    out, _, status = e.collect(20)
    assert "24 77" in out.decode() and "got abc" in out.decode()
    assert status.exit_code == 0
    c.delete(cid)  # kills the running sleep too
    assert s.wait(20).signal == 9


@pytest.mark.root
def test_version_mismatch_and_order_are_refused(agent: Env) -> None:
    c = agent.client
    c.wait_ready(30)
    with pytest.raises(P.ProtocolError, match="before negotiate"):
        c.call("top", id="x")
    with pytest.raises(P.VersionMismatch, match=r"host speaks \[99\]"):
        c.negotiate((99,))
    assert c.negotiate() == 1
    with pytest.raises(Conflict, match="negotiated already"):
        c.negotiate()


@pytest.mark.root
def test_malformed_frames_are_refused_and_the_agent_goes_on(agent: Env) -> None:
    c = _negotiated(agent)
    c.send_raw(b"\x00" * 40)  # not a frame at all
    c.send_raw(struct.pack("<IIQ", P.MAGIC | P.REQUEST, P.MAX_JSON + 5, 9))  # too long
    c.send_raw(struct.pack("<IIQ", P.MAGIC | 77, 0, 9))  # unknown kind
    c.send_raw(P.encode(P.RESPONSE, 3, b"{}"))  # the host sends no responses
    c.send_raw(P.encode(P.DATA, 1 << 2 | P.STDOUT, b"x"))  # nor output
    problems = []
    deadline = time.monotonic() + 10
    while len(problems) < 5 and time.monotonic() < deadline:
        n = c.notifications.get(timeout=10)
        if n["event"] == "protocolError":
            problems.append(n["message"])
    assert len(problems) >= 5, problems
    # A well-framed request with a bad body gets an error answer to its own id.
    with pytest.raises(InvalidArgument, match="unknown op"):
        c.call("explode")
    with pytest.raises(InvalidDocument):
        c.call("create", id="agt-bad-doc", stream=77, config={"root": "/x", "process": 1})
    with pytest.raises(InvalidArgument):
        c.call("signal", id="x", signal="TERM")
    rid = 555
    c.send_raw(P.encode(P.REQUEST, rid, b"not json"))
    time.sleep(0.3)
    # Still serving, and on the same channel.
    assert agent.proc.poll() is None
    assert c.hello()["entropyBytes"] == 0


@pytest.mark.root
def test_hello_adds_entropy_but_never_sets_the_host_clock(agent: Env) -> None:
    c = _negotiated(agent)
    before = time.time_ns()
    reply = c.hello(time_ns=before - 10**12, entropy=os.urandom(64))
    assert reply["clockSet"] is False and reply["entropyBytes"] == 64
    assert abs(reply["timeNs"] - time.time_ns()) < 60 * 10**9


@pytest.mark.root
@pytest.mark.overlay
def test_channel_loss_releases_everything(agent: Env) -> None:
    c = _negotiated(agent)
    marker = "98765.5"
    cid, _ = _create(agent, ["sleep", marker])
    c.start(cid)
    c.exec(cid, ["sleep", marker])
    assert len(c.top(cid)) == 2
    c.close()  # as if the host (or QEMU's chardev) went away
    assert agent.proc.wait(20) == 0
    assert _leftovers(agent.base, agent.ids, marker) == []


@pytest.mark.root
@pytest.mark.overlay
def test_failed_create_leaves_nothing(agent: Env) -> None:
    c = _negotiated(agent)
    with pytest.raises(InvalidArgument, match="leaves the container's root"):
        from isobox.silo.config import from_oci, to_json
        from isobox.spec.runtime import default_config

        cid = _cid("bad")
        mounts = agent.store.prepare_scratch(cid, "busybox:latest")
        agent.ids.append(cid)
        cfg = from_oci(default_config(["true"]), agent.base / "b2")
        os.symlink("/", mounts.upper / "escape")
        cfg.process.cwd = "/escape/etc"
        c.create(cid, to_json(cfg), rootfs={"lower": [str(p) for p in mounts.lower],
                                           "upper": str(mounts.upper),
                                           "work": str(mounts.work)})
    assert _leftovers(agent.base, agent.ids) == []
    # The id is free again and the stream number too.
    cid2, s = _create(agent, ["true"])
    c.start(cid2)
    assert s.wait(20).exit_code == 0


# ---- the same agent inside a utility VM (uvm's assets and launch) ---------------------------


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.slow
def test_agent_in_a_utility_vm(tmp_path: Path, image_store: Any) -> None:
    """The image's agent (pid 1 of the VM) runs a busybox container from an erofs layer disk
    over a tmpfs upper: the guest kernel's ``uname -r``, cgroup v2, exec, stats, top; the
    VM powers off cleanly after ``shutdown``."""
    from isobox.silo.config import from_oci, to_json
    from isobox.spec.runtime import default_config
    from isobox.uvm.assets import ensure_assets
    from isobox.uvm.vm import Disk, UtilityVM, VmConfig

    layer = image_store.layer_diff(image_store.images()[0].layers[0].chain_id)
    erofs = tmp_path / "layer0.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(erofs), str(layer)], check=True)
    cfg = from_oci(default_config(["sh", "-c", "uname -r; cat /proc/self/cgroup; "
                                   "exit 7"]), Path("/run/c1"))
    vm = UtilityVM(_cid("vm"), ensure_assets(), VmConfig(memory_mib=512,
                                                         disks=[Disk(erofs, "layer0")]))
    try:
        vm.start(60)
        assert vm.agent is not None
        c = AgentClient(vm.agent, timeout=120)
        ready = c.wait_ready(120)
        assert ready["pid"] == 1 and ready["kernel"] != os.uname().release
        assert c.negotiate() == 1
        assert c.hello(time_ns=time.time_ns(), entropy=os.urandom(32))["clockSet"] is True
        s = c.create("c1", to_json(cfg), disks=[{
            "source": "serial:layer0", "target": "/run/layers/0", "fstype": "erofs",
            "options": ["ro"]}], rootfs={"lower": ["/run/layers/0"],
                                         "upper": "/run/c1/upper", "work": "/run/c1/work"})
        c.start("c1")
        out, err, status = s.collect(120)
        assert out.decode().split() == [ready["kernel"], "0::/"], err
        assert status.exit_code == 7
        assert c.stats("c1")["cpuUsageNs"] > 0
        c.delete("c1")
        c.shutdown()
        info = vm.wait(60)
        assert info.returncode == 0 and "panic" not in info.console_tail.lower()
    finally:
        vm.close()
