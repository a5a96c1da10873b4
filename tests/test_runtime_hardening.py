"""isobox-runtime hardening: each test pins a fixed security-review finding."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import set_paths

pytestmark = [pytest.mark.root, pytest.mark.cgroup1]
RUNTIME = [sys.executable, "-m", "isobox.oci.cli"]


def _cid() -> str:
    return f"rv-{uuid.uuid4().hex[:12]}"


class RT:
    """One bundle in a traversable /tmp folder (0711, so a user-namespaced root reaches it)."""

    def __init__(self, top: Path, rootfs: Path) -> None:
        self.top = top
        self.bundle = top / "bundle"
        self.bundle.mkdir(mode=0o711)
        shutil.copytree(rootfs, self.bundle / "rootfs", symlinks=True)
        self.root = top / "state"
        self.roots = {self.root}
        subprocess.run([*RUNTIME, "spec"], cwd=self.bundle, check=True, timeout=60)
        self.base = json.loads((self.bundle / "config.json").read_text())

    def config(self, args: list[str], **changes: Any) -> dict[str, Any]:
        cfg = json.loads(json.dumps(self.base))
        cfg["process"]["args"] = args
        cfg["process"]["terminal"] = False
        set_paths(cfg, changes)
        (self.bundle / "config.json").write_text(json.dumps(cfg))
        return cfg

    def __call__(self, *args: str, root: Path | None = None, timeout: float = 60,
                 **kw: Any) -> subprocess.CompletedProcess[str]:
        root = root or self.root
        self.roots.add(root)
        out_path, err_path = self.top / "out", self.top / "err"
        with open(out_path, "w+") as out, open(err_path, "w+") as err:
            proc = subprocess.run([*RUNTIME, "--root", str(root), *args], cwd=self.bundle,
                                  stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                  check=False, timeout=timeout, **kw)
        proc.stdout, proc.stderr = out_path.read_text(), err_path.read_text()
        return proc

    def cleanup(self) -> None:
        for root in self.roots:
            with contextlib.suppress(Exception):
                items = json.loads(self("list", "--format", "json", root=root).stdout or "[]")
                for c in items:
                    self("delete", "--force", c["id"], root=root)


@pytest.fixture
def rt(busybox_rootfs: Path) -> Iterator[RT]:
    top = Path(tempfile.mkdtemp(prefix="isobox-rv-", dir="/tmp"))
    os.chmod(top, 0o711)
    r = RT(top, busybox_rootfs)
    try:
        yield r
    finally:
        r.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def _userns(rt: RT) -> dict[str, Any]:
    os.chown(rt.bundle / "rootfs", 100000, 100000)
    ns = rt.base["linux"]["namespaces"]
    return {
        "linux__namespaces": [*ns, {"type": "user"}],
        "linux__uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "linux__gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    }


def _no_cgroupns(rt: RT) -> list[dict[str, Any]]:
    return [n for n in rt.base["linux"]["namespaces"] if n["type"] != "cgroup"]


# ---- 1. createContainer hook: image code runs as full host root ----------------------------


def test_create_container_hook_from_the_image_runs_as_host_root(rt: RT) -> None:
    """container.py:349-366 runs createContainer/startContainer hooks as the runtime itself
    (host uid 0, every capability, host user/pid/net ns, no seccomp, no cgroup) after only a
    setns into the container's *pivoted* mount namespace: the hook path and its loader come
    from the image. An image that ships a file at the hook path escapes: here it mounts a
    proc of the *host* pid namespace and writes a host file through /proc/<runtime pid>/root
    (its parent: the runtime, whose root is the host's /)."""
    escaped = rt.top / "escaped-by-hook"
    hook = rt.bundle / "rootfs" / "usr" / "bin" / "vendor-hook"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(
        "#!/bin/sh\ncat >/dev/null\nmkdir -p /.hp\n"
        "mount -t proc proc /.hp 2>/dev/null && "
        f"echo escaped > /.hp/$PPID/root{escaped}\n"
        "umount /.hp 2>/dev/null\nexit 0\n")
    hook.chmod(0o755)
    cid = _cid()
    rt.config(["true"], hooks={"createContainer": [{"path": "/usr/bin/vendor-hook"}]})
    proc = rt("run", cid)
    try:
        assert not escaped.exists(), "a createContainer hook from the image wrote a host file"
    finally:
        escaped.unlink(missing_ok=True)
    # The path resolves on the host (the spec), where there is no such file: the image's
    # copy never runs and create fails, naming the hook.
    assert proc.returncode != 0 and "vendor-hook" in proc.stderr, proc.stderr


def test_container_hooks_run_inside_the_container(rt: RT) -> None:
    """createContainer runs in the init (the container's pid namespace: it sees itself in a
    proc of that namespace as a low pid), its path on the host; startContainer runs as the
    container's process: its uid, its capabilities, no_new_privs."""
    out = rt.top / "hook-out"
    host_hook = rt.top / "cc-hook"
    host_hook.write_text(f"#!/bin/sh\nstate=$(cat)\necho \"$state\" > {out}\n"
                         f"readlink /proc/self/ns/pid >> {out}\n")
    host_hook.chmod(0o755)
    inner = rt.bundle / "rootfs" / "sc-hook"
    inner.write_text("#!/bin/sh\ncat >/dev/null\n"
                     "grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/self/status > /sc-out\n")
    inner.chmod(0o755)
    cid = _cid()
    rt.config(["sh", "-c", "readlink /proc/self/ns/pid; cat /sc-out"],
              process__user={"uid": 1000, "gid": 1000},
              hooks={"createContainer": [{"path": str(host_hook)}],
                     "startContainer": [{"path": "/sc-hook"}]})
    (rt.bundle / "rootfs" / "sc-out").touch(mode=0o666)
    os.chmod(rt.bundle / "rootfs" / "sc-out", 0o666)
    proc = rt("run", cid)
    assert proc.returncode == 0, proc.stderr
    state_line, hook_ns = out.read_text().splitlines()
    state = json.loads(state_line)
    assert state["id"] == cid and state["bundle"] == str(rt.bundle) and state["pid"] > 0
    assert state["status"] == "creating"
    container_ns, *status = proc.stdout.splitlines()
    assert hook_ns == container_ns != os.readlink("/proc/self/ns/pid")
    fields = dict(line.split(":", 1) for line in status)
    assert fields["Uid"].split()[0] == "1000", status
    assert int(fields["CapEff"].strip(), 16) == 0 and fields["NoNewPrivs"].strip() == "1"


# ---- 2. cgroup v1 mount without a cgroup namespace -------------------------------------


def _victim_cgroup() -> Path:
    v = Path("/sys/fs/cgroup/memory", f"rv-victim-{uuid.uuid4().hex[:8]}")
    v.mkdir()
    return v


def test_cgroup_mount_shows_only_the_containers_own_cgroup(rt: RT) -> None:
    """rootfs.py:93-109 mounts each v1 hierarchy afresh. Without a cgroup namespace (Docker's
    default on v1: cgroupns=host) that is the *host's whole tree*, not the container's own
    cgroup (runc bind-mounts the container's own path): every host cgroup is visible."""
    victim = _victim_cgroup()
    try:
        cid = _cid()
        rt.config(["sh", "-c", f"ls /sys/fs/cgroup/memory/ | grep -c {victim.name}; true"],
                  linux__namespaces=_no_cgroupns(rt))
        proc = rt("run", cid)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "0", "the container sees a host cgroup outside its own"
    finally:
        victim.rmdir()


def test_rw_cgroup_mount_lets_the_container_leave_its_devices_cgroup(rt: RT) -> None:
    """Same mount with the cgroup mount rw (no "ro" option): the container's root writes the
    host's root cgroup.procs, leaves its devices cgroup, and opens a device node the devices
    cgroup denies (/dev/kmsg, c 1:11, opened write-only: no capability needed)."""
    mounts = [dict(m) for m in rt.base["mounts"]]
    for m in mounts:
        if m["type"] == "cgroup":
            m["options"] = ["nosuid", "noexec", "nodev", "relatime", "rw"]
    cid = _cid()
    script = ("mknod /tmp/k c 1 11; "
              "(echo x > /tmp/k) 2>/dev/null && echo BEFORE-OPEN; "
              "echo $$ > /sys/fs/cgroup/devices/cgroup.procs 2>/dev/null && echo MOVED; "
              "(echo rv-review-test > /tmp/k) 2>/dev/null && echo AFTER-OPEN; "
              "grep devices /proc/self/cgroup; rm -f /tmp/k")
    rt.config(["sh", "-c", script], linux__namespaces=_no_cgroupns(rt), mounts=mounts)
    proc = rt("run", cid)
    assert "BEFORE-OPEN" not in proc.stdout  # the devices cgroup works while inside it
    assert "MOVED" not in proc.stdout and "AFTER-OPEN" not in proc.stdout, proc.stdout


# ---- 3. user namespaces: exec is broken, host groups leak into the container --------------


def test_exec_into_a_user_namespaced_container(rt: RT) -> None:
    """execin.py:362 calls harden.apply(new_user_ns=False), so harden.py:347-348 calls
    setgroups() inside the container's user namespace, where init.py:68 wrote "deny":
    EPERM, and `exec` never works in a user-namespaced container."""
    cid = _cid()
    rt.config(["sleep", "60"], **_userns(rt))
    assert rt("run", "-d", cid).returncode == 0
    proc = rt("exec", cid, "sh", "-c", "echo inside", timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "inside\n"), proc.stderr


def test_user_namespace_drops_the_callers_supplementary_groups(rt: RT) -> None:
    """harden.py:347 skips setgroups in a new user namespace without additionalGids and
    init.py:68 denies it: the container keeps the runtime caller's supplementary groups (as
    host kgids, shown as 65534). A root-group-readable host file becomes readable by the
    container's unprivileged (host uid 100000) root."""
    gid = 4242
    secret = rt.bundle / "rootfs" / "group-secret"
    secret.write_text("s3cret\n")
    os.chown(secret, 0, gid)
    os.chmod(secret, 0o040)
    cid = _cid()
    rt.config(["sh", "-c", "grep Groups /proc/self/status; cat /group-secret 2>&1; true"],
              **_userns(rt))
    proc = rt("run", cid, preexec_fn=lambda: os.setgroups([gid]))
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout, proc.stdout


# ---- 4. exec: the joining process is dumpable inside the container's pid namespace ---------


def test_exec_joiner_is_never_dumpable_inside_the_container(rt: RT) -> None:
    """execin.py:353-358: the grandchild is born in the container's pid namespace as host
    root with every capability and *dumpable* (the intermediate never cleared it); only
    after the at-fork handlers and setsid does it become non-dumpable. A container with
    CAP_SYS_PTRACE (docker --cap-add SYS_PTRACE) can ptrace it or open /proc/<pid>/exe (the
    host's python) in that window. Here the window is widened to 2 s (os.setsid sleeps)."""
    cid = _cid()
    caps = rt.base["process"]["capabilities"]
    caps = {k: [*v, "CAP_SYS_PTRACE"] for k, v in caps.items()}
    watcher = ("end=$(( $(date +%s) + 20 )); while [ $(date +%s) -lt $end ]; do "
               "for d in /proc/[0-9]*; do p=${d#/proc/}; [ $p = 1 ] && continue; "
               "l=$(readlink $d/exe 2>/dev/null); case $l in *python*) echo $l > /seen; "
               "exit 0;; esac; done; done")
    rt.config(["sh", "-c", watcher], process__capabilities=caps)
    seen = rt.bundle / "rootfs" / "seen"
    assert rt("run", "-d", cid).returncode == 0
    slow_setsid = (
        "import os, sys, time\n"
        "real = os.setsid\n"
        "def slow():\n    time.sleep(2)\n    return real()\n"
        "os.setsid = slow\n"
        "from isobox.oci.cli import main\n"
        f"sys.exit(main(['--root', {str(rt.root)!r}, 'exec', {cid!r}, 'true']))\n")
    subprocess.run([sys.executable, "-c", slow_setsid], timeout=30, check=False,
                   stdin=subprocess.DEVNULL, capture_output=True)
    try:
        assert not seen.exists(), (
            f"the container read /proc/<pid>/exe of the exec'ing runtime: {seen.read_text()}")
    finally:
        seen.unlink(missing_ok=True)


# ---- 5. state on disk --------------------------------------------------------------------


def test_state_json_is_not_readable_by_other_users(rt: RT) -> None:
    """container.py:128-131 writes state.json (which holds process.env: secrets) with the
    umask's 0644 inside 0711 folders: any local user who knows the id reads it. runc's is
    0600."""
    cid = _cid()
    rt.config(["sleep", "30"], process__env=["PATH=/bin", "DB_PASSWORD=hunter2"])
    assert rt("create", cid).returncode == 0
    mode = stat.S_IMODE((rt.root / cid / "state.json").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_deleting_a_stale_container_spares_another_roots_container(rt: RT) -> None:
    """container.py:227-229 reuses an existing empty cgroup isobox/<id>; a stopped container
    with the same id under another --root still records it, and its `delete`
    (container.py:310-317) kills everything in it: the *other* root's running container."""
    cid = _cid()
    other = rt.top / "state-b"
    rt.config(["true"])
    assert rt("create", cid).returncode == 0
    assert rt("start", cid).returncode == 0
    deadline = time.monotonic() + 10
    while json.loads(rt("state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rt.config(["sleep", "60"])
    proc = rt("run", "-d", cid, root=other)
    if proc.returncode != 0:
        return  # refused: the cgroup is not shared (the fix)
    assert rt("delete", cid).returncode == 0
    assert json.loads(rt("state", cid, root=other).stdout)["status"] == "running", (
        "deleting a stopped container under one root killed a container of another root")


# ---- 6. error paths and config validation ---------------------------------------------


def test_run_that_fails_to_start_leaves_nothing(rt: RT) -> None:
    """oci/cli.py:234-239: when `start` fails in `run` (a startContainer hook exits 1) the
    created container is left behind: its init blocked on the fifo, its cgroup, its state
    (runc destroys it)."""
    cid = _cid()
    hook = rt.bundle / "rootfs" / "failing-hook"
    hook.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")
    hook.chmod(0o755)
    rt.config(["true"], hooks={"startContainer": [{"path": "/failing-hook"}]})
    proc = rt("run", cid)
    assert proc.returncode != 0
    left = json.loads(rt("list", "--format", "json").stdout or "[]")
    assert [c["id"] for c in left] == [], left


def test_non_namespaced_sysctl_is_refused(rt: RT) -> None:
    """rootfs.py:207-209 writes any linux.sysctl key under /proc/sys as host root: with no
    user namespace a non-namespaced key (vm.*, kernel.core_pattern) changes the *host*. runc
    refuses sysctls that are not namespaced. (The test writes the current value back.)"""
    key = "vm.overcommit_ratio"
    current = Path("/proc/sys/vm/overcommit_ratio").read_text().strip()
    cid = _cid()
    rt.config(["true"], linux__sysctl={key: current})
    proc = rt("run", cid)
    assert proc.returncode != 0, "a host-global sysctl was accepted and written"


def test_exec_with_a_terminal_as_another_user(rt: RT) -> None:
    """exec -t: the pty's slave is the new process's controlling terminal (it is made
    outside the pid namespace, then opened by the new session's leader), owned by its user."""
    import socket

    cid = _cid()
    rt.config(["sleep", "60"])
    assert rt("run", "-d", cid).returncode == 0
    path = rt.top / "console.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        srv.settimeout(30)
        proc = subprocess.Popen(
            [*RUNTIME, "--root", str(rt.root), "exec", "-t", "--console-socket", str(path),
             "--user", "1000:1000", cid, "sh", "-c",
             "tty; id -u; echo x > /dev/tty && echo ctty; exit 3"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, _ = srv.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
            out = b""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(fds[0], 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            os.close(fds[0])
            assert proc.wait(30) == 3, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["1000", "x", "ctty"], out


def test_rshared_root_propagates_nothing_to_the_host(rt: RT) -> None:
    """rootfsPropagation rshared: the container starts, and its mounts (/proc, /dev, ...)
    never appear in the host's view of the bundle."""
    cid = _cid()
    rt.config(["true"], linux__rootfsPropagation="rshared")
    proc = rt("run", cid)
    assert proc.returncode == 0, proc.stderr
    rootfs = str(rt.bundle / "rootfs")
    assert rootfs not in Path("/proc/self/mountinfo").read_text()


def test_failed_create_leaves_no_state(rt: RT) -> None:
    cid = _cid()
    rt.config(["true"], hooks={"createRuntime": [{"path": "/bin/false"}]})
    proc = rt("create", cid)
    assert proc.returncode != 0
    assert not (rt.root / cid).exists()


def test_non_namespaced_sysctls_refused_namespaced_ones_accepted(rt: RT) -> None:
    cid = _cid()
    rt.config(["cat", "/proc/sys/kernel/msgmax"], linux__sysctl={"kernel.msgmax": "4096"})
    proc = rt("run", cid)
    assert (proc.returncode, proc.stdout) == (0, "4096\n"), proc.stderr
    ns = [n for n in rt.base["linux"]["namespaces"] if n["type"] != "network"]
    rt.config(["true"], linux__namespaces=ns,
              linux__sysctl={"net.ipv4.ip_unprivileged_port_start": "1024"})
    proc = rt("run", _cid())
    assert proc.returncode != 0 and "network namespace" in proc.stderr, proc.stderr
    rt.config(["true"], linux__sysctl={"kernel.core_pattern": "|/tmp/x"})
    proc = rt("run", _cid())
    assert proc.returncode != 0 and "kernel.core_pattern" in proc.stderr, proc.stderr


def test_unsafe_state_root_is_refused(rt: RT) -> None:
    bad = rt.top / "open-root"
    bad.mkdir()
    os.chmod(bad, 0o777)
    proc = rt("list", root=bad)
    assert proc.returncode != 0 and "writable by group or others" in proc.stderr
    os.chmod(bad, 0o700)
    assert rt("list", root=bad).returncode == 0


def test_exec_keeps_the_oom_score_adj(rt: RT) -> None:
    cid = _cid()
    rt.config(["sleep", "60"], process__oomScoreAdj=500)
    assert rt("run", "-d", cid).returncode == 0
    proc = rt("exec", cid, "cat", "/proc/self/oom_score_adj", timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "500\n"), proc.stderr
