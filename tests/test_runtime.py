"""isobox-runtime on real namespaces, cgroups and a busybox bundle: the OCI lifecycle,
exit codes, exec, nothing left behind, and escape attempts that must all fail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.cgroup1]
RUNTIME = [sys.executable, "-m", "isobox.oci.cli"]


class Runtime:
    def __init__(self, root: Path, bundle: Path) -> None:
        self.root = root
        self.bundle = bundle

    def __call__(
        self, *args: str, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        # Files, not pipes: a created or detached container keeps the runtime's stdio open
        # (as under runc), so a pipe would never reach end-of-file.
        out_path, err_path = self.bundle.parent / "out", self.bundle.parent / "err"
        with open(out_path, "w+") as out, open(err_path, "w+") as err:
            proc = subprocess.run([*RUNTIME, "--root", str(self.root), *args], cwd=self.bundle,
                                  stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                  check=False, timeout=60, **kw)
        proc.stdout, proc.stderr = out_path.read_text(), err_path.read_text()
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc

    def config(self, args: list[str], **changes: Any) -> dict[str, Any]:
        cfg = json.loads((self.bundle / "config.json").read_text())
        cfg["process"]["args"] = args
        cfg["process"]["terminal"] = False
        for key, value in changes.items():
            cfg[key] = value
        (self.bundle / "config.json").write_text(json.dumps(cfg))
        return cfg

    def state(self, cid: str) -> dict[str, Any]:
        return dict(json.loads(self(*["state", cid]).stdout))


@pytest.fixture
def rt(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Runtime]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(busybox_rootfs, bundle / "rootfs", symlinks=True)
    r = Runtime(tmp_path / "state", bundle)
    r("spec")
    yield r
    for c in json.loads(r("list", "--format", "json").stdout or "[]"):
        r("delete", "--force", c["id"], check=False)


def leftovers(cid: str) -> list[str]:
    found = []
    for ctrl in os.listdir("/sys/fs/cgroup"):
        base = Path("/sys/fs/cgroup", ctrl)
        for dirpath, dirs, _ in os.walk(base):
            if cid in dirs:
                found.append(os.path.join(dirpath, cid))
    return found


def test_run_passes_output_and_exit_code(rt: Runtime) -> None:
    rt.config(["sh", "-c", "echo out; echo err >&2; exit 3"])
    proc = rt("run", "c1", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    # PID 1 of a pid namespace cannot be killed from inside it, even with SIGKILL.
    rt.config(["sh", "-c", "kill -9 $$; echo survived"])
    survived = rt("run", "c2", check=False)
    assert (survived.returncode, survived.stdout) == (0, "survived\n")
    assert leftovers("c1") == [] and leftovers("c2") == []


def test_lifecycle_states_and_illegal_steps(rt: Runtime) -> None:
    rt.config(["sleep", "300"])
    rt("create", "--pid-file", str(rt.bundle / "pid"), "c1")
    st = rt.state("c1")
    assert st["status"] == "created" and st["pid"] == int((rt.bundle / "pid").read_text())
    rt("delete", "--force", "c1")  # a created container can be deleted with --force
    rt("create", "c1")
    rt("start", "c1")
    assert rt.state("c1")["status"] == "running"
    again = rt("start", "c1", check=False)
    assert again.returncode == 1 and "running, not created" in again.stderr
    refused = rt("delete", "c1", check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    rt("pause", "c1")
    assert rt.state("c1")["status"] == "paused"
    rt("resume", "c1")
    rt("kill", "c1", "TERM")  # PID 1 without a handler ignores TERM, as under runc
    time.sleep(0.2)
    assert rt.state("c1")["status"] == "running"
    rt("kill", "c1", "KILL")
    deadline = time.monotonic() + 5
    while rt.state("c1")["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.state("c1")["status"] == "stopped"
    rt("delete", "c1")
    assert rt("state", "c1", check=False).returncode == 1
    assert not (rt.root / "c1").exists()
    assert leftovers("c1") == []


def test_exec_joins_the_container(rt: Runtime) -> None:
    rt.config(["sleep", "300"], hostname="inside")
    rt("run", "-d", "c1")
    out = rt("exec", "c1", "sh", "-c", "hostname; echo $$; tr '\\0' ' ' < /proc/1/cmdline")
    hostname, pid, *init_cmd = out.stdout.split()
    # Same UTS and pid namespaces as the container's init: it sees that init as pid 1.
    assert hostname == "inside" and int(pid) > 1 and init_cmd == ["sleep", "300"]
    assert rt("exec", "c1", "sh", "-c", "exit 5", check=False).returncode == 5
    assert json.loads(rt("ps", "--format", "json", "c1").stdout) == [rt.state("c1")["pid"]]
    rt("delete", "--force", "c1")
    assert leftovers("c1") == []


def test_limits_from_the_config_hold(rt: Runtime) -> None:
    rt.config(["sh", "-c", "cat /sys/fs/cgroup/pids/pids.max; i=0; while [ $i -lt 50 ]; do "
                           "sleep 5 & i=$((i+1)); done; echo done"])
    cfg = json.loads((rt.bundle / "config.json").read_text())
    cfg["linux"].setdefault("resources", {})["pids"] = {"limit": 10}
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    proc = rt("run", "c1", check=False)
    assert proc.stdout.split() == ["10"]  # it sees its own cgroup; it never got to "done"
    assert proc.returncode != 0 and "can't fork" in proc.stderr, proc.stderr


def test_killed_mid_create_then_delete_leaves_nothing(rt: Runtime) -> None:
    rt.config(["sleep", "300"])
    cfg = json.loads((rt.bundle / "config.json").read_text())
    hook_pid = rt.bundle.parent / "hook.pid"
    cfg["hooks"] = {"createRuntime": [{"path": "/bin/sh", "args": [
        "sh", "-c", f"echo $$ > {hook_pid}; exec sleep 30"]}]}
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([*RUNTIME, "--root", str(rt.root), "create", "c1"], cwd=rt.bundle)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = rt.root / "c1" / "state.json"
        if state.exists() and json.loads(state.read_text())["pid"]:
            break
        time.sleep(0.02)
    init = json.loads((rt.root / "c1" / "state.json").read_text())["pid"]
    proc.kill()  # the runtime dies while its hook runs: the init exists, create never ended
    proc.wait()
    # The runtime's hooks run while the init waits on the sync socket before pivot_root
    # (as runc): with the runtime gone the init may be ending by itself already.
    rt("delete", "--force", "c1")
    deadline = time.monotonic() + 5
    while Path(f"/proc/{init}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{init}/status").read_text()
        if "zombie" in status:
            break
        time.sleep(0.02)
    assert not Path(f"/proc/{init}").exists() or "zombie" in Path(
        f"/proc/{init}/status").read_text()
    assert leftovers("c1") == [] and not (rt.root / "c1").exists()
    # The hook belonged to the killed runtime, not to the container (as with runc): it
    # outlives both; end it so the test leaves nothing running.
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(hook_pid.read_text()), signal.SIGKILL)


def _stale_cgroup(cid: str, age: float) -> list[Path]:
    """What a runtime killed between its mkdir and its delete leaves: the container's empty
    cgroup folders (here in every v1 hierarchy but memory, as the CI machine once had)."""
    made = []
    for ctrl in ("cpu", "cpuacct", "pids", "freezer", "devices", "blkio"):
        base = Path("/sys/fs/cgroup", ctrl)
        if not base.is_dir() or base.is_symlink():
            continue
        d = base / "isobox" / cid
        d.mkdir(parents=True)
        made.append(d)
    assert made, "no v1 hierarchy to make a leftover in"
    then = time.time() - age
    for d in made:
        os.utime(d, (then, then))
    return made


def test_a_crashed_runtimes_empty_cgroup_is_reclaimed(rt: Runtime) -> None:
    cid = f"stale{os.getpid()}"
    made = _stale_cgroup(cid, age=3600)
    try:
        rt.config(["sh", "-c", "echo reclaimed"])
        proc = rt("run", cid, check=False)
        assert (proc.returncode, proc.stdout) == (0, "reclaimed\n"), proc.stderr
        rt("delete", cid, check=False)
        assert leftovers(cid) == []
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


def test_a_young_or_busy_cgroup_of_that_name_is_still_refused(rt: Runtime) -> None:
    cid = f"young{os.getpid()}"
    made = _stale_cgroup(cid, age=0)  # just made: maybe another runtime between mkdir and add
    try:
        rt.config(["true"])
        proc = rt("run", cid, check=False)
        assert proc.returncode != 0 and "exists already" in proc.stderr, proc.stderr
        assert all(d.is_dir() for d in made), "refused, yet another owner's folder removed"
        assert not (rt.root / cid).exists()
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            (made[0] / "cgroup.procs").write_text(str(sleeper.pid))
            then = time.time() - 3600
            for d in made:
                os.utime(d, (then, then))
            proc = rt("run", cid, check=False)
            assert proc.returncode != 0 and "exists already" in proc.stderr, proc.stderr
            assert sleeper.poll() is None and made[0].is_dir()
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        for d in made:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
    assert leftovers(cid) == []


def test_no_descriptor_leaks_into_the_container(rt: Runtime, tmp_path: Path) -> None:
    leak = os.open(tmp_path, os.O_RDONLY)  # a host directory fd in the runtime's caller
    try:
        rt.config(["sh", "-c", "ls /proc/self/fd | sort -n | tr '\\n' ' '"])
        proc = subprocess.run([*RUNTIME, "--root", str(rt.root), "run", "c1"], cwd=rt.bundle,
                              capture_output=True, text=True, pass_fds=(leak,), check=False)
    finally:
        os.close(leak)
    fds = proc.stdout.split()
    assert fds == ["0", "1", "2", "3"], fds  # 3 is ls's own directory handle


def test_cwd_outside_the_root_is_refused(rt: Runtime, tmp_path: Path) -> None:
    # CVE-2024-21626's way out: a host directory descriptor reached as the working dir.
    host_dir = os.open(tmp_path, os.O_RDONLY)
    cfg = rt.config(["pwd"])
    cfg["process"]["cwd"] = f"/proc/self/fd/{host_dir}"
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    try:
        proc = rt("run", "c1", check=False, pass_fds=(host_dir,))
    finally:
        os.close(host_dir)
    assert proc.returncode != 0 and "process.cwd" in proc.stderr, proc.stderr
    assert proc.stdout == ""


ESCAPES = {
    "write /proc/sys": "echo x > /proc/sys/kernel/hostname",
    "write /sys": "echo 1 > /sys/kernel/profiling",
    "mount": "mount -t tmpfs none /mnt",
    "mknod a disk and read it": "mknod /tmp/d b 254 0; head -c1 /tmp/d",
    "load a module": "insmod /nonexistent.ko || modprobe loop || "
                     "echo x > /proc/sys/kernel/modprobe",
    "see or signal a host process": f"kill -0 {os.getpid()}",
    "host files via /proc/1/root": "ls /proc/1/root/work /proc/1/root/root/.pyenv",
    "unshare a new mount namespace": "unshare -m true",
    "gain privilege through setuid": "su -c id nobody 2>/dev/null; "
                                     "/suid-busybox id -u | grep -qx 0",
}


@pytest.mark.parametrize("attempt", list(ESCAPES), ids=list(ESCAPES))
def test_escape_attempts_fail(rt: Runtime, attempt: str) -> None:
    script = ESCAPES[attempt]
    if "setuid" in attempt:
        rootfs = rt.bundle / "rootfs"
        shutil.copy2(rootfs / "bin" / "busybox", rootfs / "suid-busybox")
        os.chmod(rt.bundle / "rootfs" / "suid-busybox", 0o4755)
        cfg = rt.config(["sh", "-c", script])
        cfg["process"]["user"] = {"uid": 1000, "gid": 1000}
        (rt.bundle / "config.json").write_text(json.dumps(cfg))
    else:
        rt.config(["sh", "-c", script])
    proc = rt("run", "c1", check=False)
    assert proc.returncode != 0, f"{attempt} succeeded: {proc.stdout} {proc.stderr}"


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_proc_self_exe_cannot_rewrite_a_host_binary(rt: Runtime) -> None:
    # CVE-2019-5736: a program whose interpreter is /proc/self/exe gets, at exec time, the
    # binary that exec'd it. Here that is a sealed in-memory busybox, not a host file.
    evil = rt.bundle / "rootfs" / "evil"
    evil.write_text("#!/proc/self/exe\n")
    evil.chmod(0o755)
    host = [os.path.realpath(sys.executable), "/bin/busybox"]
    before = [_sha(h) for h in host]
    rt.config(["/evil"])
    proc = rt("run", "c1", check=False)
    # The interpreter the kernel ran was busybox (as "exe": no such applet), not Python.
    assert proc.returncode != 0 and "applet not found" in proc.stderr, proc.stderr
    assert [_sha(h) for h in host] == before


def test_runtime_flags_podman_and_containerd_pass(rt: Runtime, tmp_path: Path) -> None:
    rt.config(["true"])
    log = tmp_path / "log.json"
    rt("--log", str(log), "--log-format", "json", "create", "--bundle", str(rt.bundle),
       "--pid-file", str(tmp_path / "init.pid"), "c1")
    rt("start", "c1")
    rt("delete", "--force", "c1")
    bad = rt("--log", str(log), "--log-format", "json", "start", "nope", check=False)
    assert bad.returncode == 1
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and "does not exist" in last["msg"]
    sysd = rt("--systemd-cgroup", "state", "x", check=False)
    assert sysd.returncode == 1 and "cgroupfs" in sysd.stderr


def test_signals_reach_pid_1_with_a_handler(rt: Runtime) -> None:
    rt.config(["sh", "-c", "trap 'echo got TERM; exit 7' TERM; while :; do sleep 0.1; done"])
    proc = subprocess.Popen([*RUNTIME, "--root", str(rt.root), "run", "c1"], cwd=rt.bundle,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (rt.root / "c1" / "state.json").exists() and rt.state("c1")["status"] == "running":
            break
        time.sleep(0.05)
    rt("kill", "c1", str(int(signal.SIGTERM)))
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 7 and out == "got TERM\n"


def test_engine_config_seccomp_without_nnp_sysctl_and_devices(rt: Runtime) -> None:
    # What podman and dockerd send: a seccomp profile with noNewPrivileges false (loading it
    # then needs CAP_SYS_ADMIN, so it must happen before the capabilities are dropped, and it
    # is compiled before pivot_root, when libseccomp can still be loaded), a sysctl below the
    # read-only /proc/sys, and a process that is not root and writes to /dev/null.
    from isobox._sys.seccomp import default_profile

    cfg = rt.config(["sh", "-c", "cat /proc/sys/net/ipv4/ip_unprivileged_port_start; "
                                 "grep Seccomp: /proc/self/status; "
                                 "echo x > /dev/null && stat -c %a /dev/null /dev/zero"])
    cfg["process"]["noNewPrivileges"] = False
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000}
    cfg["linux"]["seccomp"] = default_profile(cfg["process"]["capabilities"]["bounding"])
    cfg["linux"]["sysctl"] = {"net.ipv4.ip_unprivileged_port_start": "0"}
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    proc = rt("run", "c1", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "Seccomp:", "2", "666", "666"]


def test_hooks_get_their_own_argv0_and_the_state(rt: Runtime, tmp_path: Path) -> None:
    # dockerd's prestart hook is dockerd itself, told its job by argv[0]
    # ("libnetwork-setkey"): args[0] must reach the hook as given.
    out = tmp_path / "hook.out"
    cfg = rt.config(["true"])
    cfg["hooks"] = {"prestart": [{
        "path": "/bin/busybox", "args": ["sh", "-c", f'echo "$0" > {out}; cat >> {out}'],
        "env": ["PATH=/bin:/usr/bin"]}]}
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    rt("run", "c1")
    name, state = out.read_text().split("\n", 1)
    assert name == "sh"
    assert json.loads(state)["id"] == "c1" and json.loads(state)["status"] == "created"


def test_terminal_master_goes_to_the_console_socket(rt: Runtime, tmp_path: Path) -> None:
    import socket

    cfg = rt.config(["sh", "-c", "tty; exit 4"])
    cfg["process"]["terminal"] = True
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "console.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        srv.settimeout(30)
        proc = subprocess.Popen([*RUNTIME, "--root", str(rt.root), "run", "--console-socket",
                                 str(path), "c1"], cwd=rt.bundle, stdin=subprocess.DEVNULL)
        try:
            conn, _ = srv.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
            assert len(fds) == 1
            out = b""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(fds[0], 4096)
                except OSError:  # EIO: the container's side of the terminal is closed
                    break
                if not chunk:
                    break
                out += chunk
            os.close(fds[0])
            assert proc.wait(30) == 4
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert out == b"/dev/pts/0\r\n"


def test_stdio_belongs_to_the_process_user(rt: Runtime) -> None:
    # Engines hand the runtime pipes that root owns with mode 0600; a process that is not
    # root reopens them through /dev/stdout (/proc/self/fd/1). runc gives them to the user.
    cfg = rt.config(["sh", "-c", "echo out > /dev/stdout; echo err > /dev/stderr"])
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000}
    (rt.bundle / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([*RUNTIME, "--root", str(rt.root), "run", "c1"], cwd=rt.bundle,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "out\n", "err\n")
