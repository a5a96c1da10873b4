"""Seccomp: OCI profiles compiled by libseccomp, loaded in a real child, and the default profile.

Every filter runs for real: the test forks, and the child sets no_new_privs, loads the
filter and execs a helper (static busybox, dash and coreutils, python3, dpkg), which reports
through its exit status and output. The child does nothing else between fork and exec: the
test process may have threads. Where a broken filter could let a helper mount over the
host, the child first moves into a private mount namespace.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from isobox._sys import linux as L
from isobox._sys import seccomp as S
from isobox.errors import InvalidDocument, SystemError_

pytestmark = pytest.mark.root

BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.access(p, os.X_OK)), None)
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
# Docker's default capability set: what a container gets unless told otherwise.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
ALLOW_ALL: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW"}
# run_filtered loads through libseccomp (seccomp_load), or the frozen program with seccomp(2)
# (Filter.freeze: what containers get); tests marked with the ``loaders`` fixture run both.
LOADER = {"frozen": False}


@pytest.fixture(params=["libseccomp", "frozen"])
def loaders(request: pytest.FixtureRequest) -> Iterable[None]:
    LOADER["frozen"] = request.param == "frozen"
    try:
        yield
    finally:
        LOADER["frozen"] = False


@dataclass
class Result:
    status: int  # raw wait status
    stdout: str
    stderr: str

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def __str__(self) -> str:
        return f"status={self.status:#x} stdout={self.stdout!r} stderr={self.stderr!r}"


def run_filtered(profile: Mapping[str, Any], argv: list[str], *, private_mounts: bool = False,
                 nnp: bool = True, timeout: float = 120) -> Result:
    """Compile ``profile``, fork, load it in the child, exec ``argv``; wait and collect."""
    filt = S.compile_filter(profile)
    if LOADER["frozen"]:
        filt.freeze()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    if private_mounts:
                        L.unshare(L.CLONE_NEWNS)
                        L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
                    if nnp:
                        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
                    filt.load()
                    os.execv(argv[0], argv)
                finally:
                    os._exit(127)
            deadline = time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail(f"{argv} did not finish in {timeout} s")
                time.sleep(0.01)
            out.seek(0)
            err.seek(0)
            return Result(status, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))
    finally:
        filt.release()


def python(profile: Mapping[str, Any], code: str, *, site: bool = False) -> Result:
    return run_filtered(profile, [PYTHON, *([] if site else ["-S"]), "-c", textwrap.dedent(code)])


def busybox(profile: Mapping[str, Any], script: str, **kw: Any) -> Result:
    if BUSYBOX is None:
        pytest.skip("busybox is not installed")
    return run_filtered(profile, [BUSYBOX, "sh", "-c", script], **kw)


def default(extra_caps: Iterable[str] = ()) -> dict[str, Any]:
    return S.default_profile([*DEFAULT_CAPS, *extra_caps])


# Raw calls from python through ctypes; each prints the errno it got (0: it worked).
ERRNO_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def e(rc):
    return ctypes.get_errno() if rc == -1 else 0
res = {}
"""


def probe(profile: Mapping[str, Any], calls: dict[str, str]) -> dict[str, int]:
    """Run each python expression (a libc call) under ``profile``; name -> errno (0 = ok)."""
    body = "".join(f"ctypes.set_errno(0)\nres[{k!r}] = e({v})\n" for k, v in calls.items())
    r = python(profile, ERRNO_PROBE + body + "print(repr(res))\n")
    assert r.exit_code == 0, str(r)
    got: dict[str, int] = eval(r.stdout.strip())  # noqa: S307 - our own repr of a dict of ints
    return got


# ---- the default profile: what it blocks ------------------------------------------------


@pytest.mark.usefixtures("loaders")
def test_default_profile_blocks_namespaces_mounts_keys_and_ptrace(tmp_path: Path) -> None:
    got = probe(default(), {
        "unshare": "libc.unshare(0x20000)",
        "mount": f"libc.mount(b'x', {str(tmp_path).encode()!r}, b'tmpfs', 0, None)",
        "keyctl": "libc.syscall(250, 0, -3, 1)",  # KEYCTL_GET_KEYRING_ID, session, create
        "add_key": "libc.syscall(248, b'user', b'isobox', b'x', 1, -3)",
        "ptrace": "libc.ptrace(0, 0, None, None)",  # PTRACE_TRACEME
        "setns": "libc.setns(os.open('/proc/self/ns/mnt', os.O_RDONLY), 0)",
        "pivot_root": "libc.syscall(155, b'/', b'/')",
        "clock_settime": "libc.syscall(227, 0, None)",
        "clone_newns": "libc.syscall(56, 0x20000 | 17, 0, 0, 0, 0)",  # clone(CLONE_NEWNS|SIGCHLD)
        "clone3": "libc.syscall(435, None, 0)",
    })
    assert got == {
        "unshare": errno.EPERM, "mount": errno.EPERM, "keyctl": errno.EPERM,
        "add_key": errno.EPERM, "ptrace": errno.EPERM, "setns": errno.EPERM,
        "pivot_root": errno.EPERM, "clock_settime": errno.EPERM,
        "clone_newns": errno.EPERM,
        "clone3": errno.ENOSYS,  # so that libc falls back to clone, which the filter can see
    }


def test_the_blocked_calls_work_without_the_filter(tmp_path: Path) -> None:
    # The probe above means something: as root with no filter, the same calls succeed
    # (clone3 with a NULL argument is EFAULT from the kernel, not ENOSYS from us).
    got = probe(ALLOW_ALL, {
        "unshare": "libc.unshare(0x20000)",
        "private": "libc.mount(None, b'/', None, 0x4000 | 0x40000, None)",  # MS_REC|MS_PRIVATE
        "mount": f"libc.mount(b'x', {str(tmp_path).encode()!r}, b'tmpfs', 0, None)",
        "keyctl": "0 if libc.syscall(250, 0, -3, 1) > 0 else -1",
        "ptrace": "libc.ptrace(0, 0, None, None)",
        "clone3": "libc.syscall(435, None, 64)",
    })
    assert got == {"unshare": 0, "private": 0, "mount": 0, "keyctl": 0, "ptrace": 0,
                   "clone3": errno.EFAULT}


@pytest.mark.usefixtures("loaders")
def test_default_profile_shell_commands_get_eperm() -> None:
    r = busybox(default(), "unshare -m true; echo unshare=$?; "
                           "mount -t tmpfs x /mnt; echo mount=$?", private_mounts=True)
    assert r.exit_code == 0, str(r)
    assert "unshare=1" in r.stdout and "mount=1" in r.stdout, str(r)
    assert "Operation not permitted" in r.stderr, str(r)  # busybox unshare
    assert "permission denied" in r.stderr, str(r)  # busybox mount's words for EPERM


# ---- the default profile: what still works -----------------------------------------------


def test_default_profile_runs_static_busybox() -> None:
    r = busybox(default(), "echo ok; ls /; cat /proc/self/status")
    assert r.exit_code == 0, str(r)
    assert r.stdout.startswith("ok\n")
    assert "proc\n" in r.stdout
    assert "Seccomp:\t2" in r.stdout  # mode 2: a filter is in force
    assert "NoNewPrivs:\t1" in r.stdout


def test_default_profile_runs_dash_and_coreutils() -> None:
    r = run_filtered(default(), ["/bin/sh", "-c", (
        "echo ok; /bin/ls / >/dev/null && /bin/cat /proc/self/status | /bin/grep Seccomp: && "
        "d=$(/bin/mktemp -d) && /bin/cp /etc/hostname $d/h && /bin/chmod 600 $d/h && "
        "/bin/chown root:root $d/h && /bin/ln -s h $d/l && /bin/stat -c %a $d/h && "
        "/bin/sort /etc/passwd | /usr/bin/wc -l >/dev/null && /bin/rm -r $d && /bin/date >/dev/null"
        " && echo done")])
    assert r.exit_code == 0, str(r)
    assert r.stdout.split("\n")[:4] == ["ok", "Seccomp:\t2", "600", "done"], str(r)


@pytest.mark.usefixtures("loaders")
def test_default_profile_runs_threaded_python() -> None:
    r = python(default(), """
        import threading, queue
        q = queue.Queue()
        ts = [threading.Thread(target=lambda i=i: q.put(sum(range(i * 1000)))) for i in range(8)]
        for t in ts: t.start()
        for t in ts: t.join()
        print("threads", q.qsize())
    """)
    assert r.exit_code == 0, str(r)
    assert r.stdout == "threads 8\n"


def test_default_profile_runs_asyncio() -> None:
    r = run_filtered(default(), [PYTHON, "-c",
                                 "import asyncio; asyncio.run(asyncio.sleep(0)); print('ok')"])
    assert (r.exit_code, r.stdout) == (0, "ok\n"), str(r)
    # a fuller loop: a subprocess (posix_spawn: clone3 -> ENOSYS -> clone), a socket pair,
    # a timer and a thread-pool job
    r = python(default(), """
        import asyncio, socket
        async def main():
            p = await asyncio.create_subprocess_exec(
                "/bin/echo", "child", stdout=asyncio.subprocess.PIPE)
            out, _ = await p.communicate()
            a, b = socket.socketpair()
            r, w = await asyncio.open_connection(sock=a)
            b.sendall(b"ping\\n")
            line = await r.readline()
            n = await asyncio.get_running_loop().run_in_executor(None, sum, [1, 2, 3])
            await asyncio.sleep(0.01)
            print(out.decode().strip(), line.decode().strip(), n, p.returncode)
            w.close(); b.close()
        asyncio.run(main())
    """, site=True)
    assert r.exit_code == 0, str(r)
    assert r.stdout == "child ping 6 0\n"


def test_default_profile_runs_dpkg(tmp_path: Path) -> None:
    if shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg is not installed")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: isobox-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: isobox <probe@example.invalid>\nDescription: seccomp probe\n")
    (pkg / "usr" / "share" / "isobox-probe").mkdir(parents=True)
    (pkg / "usr" / "share" / "isobox-probe" / "hello").write_text("hello\n")
    root = tmp_path / "root"
    (root / "var" / "lib" / "dpkg" / "info").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "updates").mkdir()
    (root / "var" / "lib" / "dpkg" / "status").touch()
    script = f"""
        set -e
        dpkg-deb --root-owner-group --build {pkg} {tmp_path}/probe.deb >/dev/null
        dpkg --root={root} --log=/dev/null -i {tmp_path}/probe.deb >/dev/null
        dpkg --root={root} -s isobox-probe | grep '^Status:'
        cat {root}/usr/share/isobox-probe/hello
        dpkg --root={root} --log=/dev/null -r isobox-probe >/dev/null
        test ! -e {root}/usr/share/isobox-probe/hello
        dpkg-query -W dpkg >/dev/null
        if command -v apt-cache >/dev/null; then apt-cache policy dpkg >/dev/null; fi
        echo done
    """
    r = run_filtered(default(), ["/bin/sh", "-c", textwrap.dedent(script)])
    assert r.exit_code == 0, str(r)
    assert r.stdout == "Status: install ok installed\nhello\ndone\n", str(r)


# ---- capability-gated rules --------------------------------------------------------------


def test_default_profile_resolves_capability_groups() -> None:
    plain = default()
    admin = S.default_profile([*DEFAULT_CAPS, "sys_admin"])  # prefix and case are optional

    def names(p: Mapping[str, Any], action: str = "SCMP_ACT_ALLOW") -> set[str]:
        return {n for r in p["syscalls"] if r["action"] == action and not r.get("args")
                for n in r["names"]}

    for p in (plain, admin):
        assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == errno.EPERM
        assert not {"archMap", "comment"} & set(p)
        assert all(set(r) <= {"names", "action", "args", "errnoRet"} for r in p["syscalls"])
    if platform.machine() == "x86_64":
        assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    gated = {"mount", "umount2", "unshare", "setns", "pivot_root", "bpf", "perf_event_open",
             "ptrace", "process_vm_readv", "init_module", "clock_settime", "reboot", "mbind",
             "acct", "iopl", "syslog", "kcmp", "open_by_handle_at", "name_to_handle_at"}
    never = {"keyctl", "add_key", "request_key", "kexec_load", "swapon", "userfaultfd",
             "io_uring_setup", "move_pages", "uselib", "ustat", "sysfs", "_sysctl"}
    assert not (gated | never) & names(plain)
    assert "chroot" in names(plain)  # CAP_SYS_CHROOT is a default capability
    assert {"mount", "umount2", "unshare", "setns", "clone", "clone3"} <= names(admin)
    assert not never & names(admin)
    # clone3 is ENOSYS and clone is masked only without CAP_SYS_ADMIN
    assert "clone3" in names(plain, "SCMP_ACT_ERRNO") and "clone3" not in names(plain)
    assert "clone3" not in names(admin, "SCMP_ACT_ERRNO")
    assert [r["args"] for r in plain["syscalls"] if r["names"] == ["clone"]] == [
        [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]]
    for cap, calls in {"CAP_SYS_PTRACE": {"ptrace", "process_vm_readv", "process_vm_writev"},
                       "CAP_SYS_MODULE": {"init_module", "finit_module", "delete_module"},
                       "CAP_SYS_TIME": {"settimeofday", "clock_settime", "clock_adjtime"},
                       "CAP_SYS_BOOT": {"reboot"}, "CAP_SYS_PACCT": {"acct"},
                       "CAP_SYS_NICE": {"mbind", "set_mempolicy", "get_mempolicy"},
                       "CAP_SYS_RAWIO": {"iopl", "ioperm"}, "CAP_SYSLOG": {"syslog"},
                       "CAP_BPF": {"bpf"}, "CAP_PERFMON": {"perf_event_open"}}.items():
        assert calls <= names(S.default_profile([cap])), cap


def test_capabilities_unblock_their_calls(tmp_path: Path) -> None:
    got = probe(default(["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]), {
        "unshare": "libc.unshare(0x20000)",
        "private": "libc.mount(None, b'/', None, 0x4000 | 0x40000, None)",
        "mount": f"libc.mount(b'x', {str(tmp_path).encode()!r}, b'tmpfs', 0, None)",
        "ptrace": "libc.ptrace(0, 0, None, None)",
        "keyctl": "libc.syscall(250, 0, -3, 1)",  # no capability opens the keyring
    })
    assert got == {"unshare": 0, "private": 0, "mount": 0, "ptrace": 0, "keyctl": errno.EPERM}
    r = busybox(default(["CAP_SYS_ADMIN"]), "unshare -m true && echo ok", private_mounts=True)
    assert (r.exit_code, r.stdout) == (0, "ok\n"), str(r)


# ---- rule semantics ----------------------------------------------------------------------


def test_personality_is_allowed_for_listed_values_only() -> None:
    got = probe(default(), {
        "query": "0 if libc.personality(ctypes.c_ulong(0xFFFFFFFF)) >= 0 else -1",
        "linux": "0 if libc.personality(0) >= 0 else -1",
        "no_randomize": "libc.personality(0x0040000)",  # ADDR_NO_RANDOMIZE
        "read_implies_exec": "libc.personality(0x0400000)",
    })
    assert got == {"query": 0, "linux": 0, "no_randomize": errno.EPERM,
                   "read_implies_exec": errno.EPERM}


@pytest.mark.usefixtures("loaders")
def test_errno_ret_is_honoured() -> None:
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
        {"names": ["getpgid"], "action": "SCMP_ACT_ERRNO"},  # EPERM when absent
    ]}
    got = probe(profile, {"getpriority": "libc.getpriority(0, 0)",
                          "getpgid": "libc.getpgid(0)", "getpid": "0 * libc.getpid()"})
    assert got == {"getpriority": errno.EXDEV, "getpgid": errno.EPERM, "getpid": 0}
    # and the default action's errno
    profile = default()
    profile["defaultErrnoRet"] = errno.ENXIO
    assert probe(profile, {"keyctl": "libc.syscall(250, 0, -3, 1)"}) == {"keyctl": errno.ENXIO}


@pytest.mark.usefixtures("loaders")
def test_args_of_a_rule_are_anded_and_a_repeated_argument_is_ored() -> None:
    def eq(index: int, value: int) -> dict[str, Any]:
        return {"index": index, "value": value, "op": "SCMP_CMP_EQ"}

    calls = {"process_self": "libc.getpriority(0, 0)", "process_pid": "libc.getpriority(0, 1)",
             "pgrp_self": "libc.getpriority(1, 0)", "user_self": "libc.getpriority(2, 0)"}
    deny: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EDOM,
         "args": [eq(0, 0), eq(1, 0)]}]}
    # which == PRIO_PROCESS AND who == 0
    assert probe(deny, calls) == {"process_self": errno.EDOM, "process_pid": 0,
                                  "pgrp_self": 0, "user_self": 0}
    # which == PRIO_PGRP OR which == PRIO_USER (libseccomp cannot AND one argument twice)
    deny["syscalls"][0]["args"] = [eq(0, 1), eq(0, 2)]
    assert probe(deny, calls) == {"process_self": 0, "process_pid": 0,
                                  "pgrp_self": errno.EDOM, "user_self": errno.EDOM}
    # masked equality: (which & 0x2) == 0x2, and the other comparison operators
    deny["syscalls"][0]["args"] = [{"index": 0, "value": 2, "valueTwo": 2,
                                    "op": "SCMP_CMP_MASKED_EQ"}]
    assert probe(deny, calls)["user_self"] == errno.EDOM
    assert probe(deny, calls)["pgrp_self"] == 0
    deny["syscalls"][0]["args"] = [{"index": 0, "value": 1, "op": "SCMP_CMP_GE"},
                                   {"index": 1, "value": 1, "op": "SCMP_CMP_LT"}]
    assert probe(deny, calls) == {"process_self": 0, "process_pid": 0,
                                  "pgrp_self": errno.EDOM, "user_self": errno.EDOM}


# A second thread makes the call, through ctypes, which lets go of the GIL first (a thread
# killed holding it would hang the rest); a killed thread never ends its Python-level state,
# so nothing joins it; and no core file.
KILL_FROM_A_THREAD = """
import ctypes, os, resource, threading, time
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
libc = ctypes.CDLL(None)
print("before", flush=True)
threading.Thread(target=libc.getpriority, args=(0, 0), daemon=True).start()
time.sleep(0.3)
print("survived", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("action", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"])
@pytest.mark.usefixtures("loaders")
def test_kill_process_and_trap_end_the_process_with_sigsys(action: str) -> None:
    # KILL_PROCESS takes the whole process down, whichever thread made the call; TRAP's
    # SIGSYS, unhandled, does too.
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getpriority"], "action": action}]}
    r = python(profile, KILL_FROM_A_THREAD)
    assert r.signal == signal.SIGSYS, str(r)
    assert r.stdout == "before\n"


@pytest.mark.usefixtures("loaders")
def test_kill_thread_kills_only_the_calling_thread() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getpriority"], "action": "SCMP_ACT_KILL"}]}
    r = python(profile, KILL_FROM_A_THREAD)
    assert (r.exit_code, r.stdout) == (0, "before\nsurvived\n"), str(r)


def test_rules_with_the_default_action_are_skipped_and_unknown_names_listed() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.EPERM,
               "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
               "flags": ["SECCOMP_FILTER_FLAG_LOG"],
               "syscalls": [
                   {"names": ["getpid", "isobox_no_such_call", "stime"],
                    "action": "SCMP_ACT_ALLOW"},
                   {"names": ["mount"], "action": "SCMP_ACT_ERRNO"},  # == default: skipped
                   {"names": ["umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},  # same
               ]}
    with S.compile_filter(profile) as filt:
        assert filt.unknown == ("isobox_no_such_call",)
        assert filt.rules == 2  # getpid, and stime (a syscall of x86 only)


def test_filter_exports_bpf_and_releases() -> None:
    filt = S.compile_filter(default())
    try:
        bpf = filt.export_bpf()
        assert len(bpf) > 0 and len(bpf) % 8 == 0  # struct sock_filter is 8 bytes
        assert len(bpf) // 8 > 100  # far more than a stub
        small = S.compile_filter(ALLOW_ALL)
        assert 0 < len(small.export_bpf()) < len(bpf)
        small.release()
    finally:
        filt.release()
    filt.release()  # idempotent
    with pytest.raises(ValueError, match="after release"):
        filt.export_bpf()


@pytest.mark.usefixtures("loaders")
def test_the_filter_leaves_no_new_privs_to_the_runtime() -> None:
    # CTL_NNP is 0: loading (as root, CAP_SYS_ADMIN) does not set no_new_privs by itself
    r = busybox(ALLOW_ALL, "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status", nnp=False)
    assert r.stdout == "NoNewPrivs:\t0\nSeccomp:\t2\n", str(r)


@pytest.mark.parametrize("frozen", [False, True])
def test_load_without_no_new_privs_or_cap_sys_admin_is_refused(frozen: bool) -> None:
    filt = S.compile_filter(ALLOW_ALL)
    if frozen:
        filt.freeze()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                L.capset(0, 0, 0)
                filt.load()
            except SystemError_ as exc:
                code = 0 if exc.errno == errno.EACCES and exc.op == "seccomp_load" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        filt.release()


# ---- validation --------------------------------------------------------------------------


def test_unknown_action_is_an_invalid_document_naming_it() -> None:
    with pytest.raises(InvalidDocument, match=r"seccomp\.syscalls\[1\]\.action.*SCMP_ACT_NOPE"):
        S.compile_filter({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getppid"], "action": "SCMP_ACT_NOPE"}]})
    with pytest.raises(InvalidDocument, match=r"seccomp\.defaultAction.*SCMP_ACT_NOTIFY"):
        S.compile_filter({"defaultAction": "SCMP_ACT_NOTIFY"})
    with pytest.raises(InvalidDocument, match=r"seccomp\.defaultAction.*None"):
        S.compile_filter({})


@pytest.mark.parametrize(("profile", "field", "word"), [
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}]}]},
     r"seccomp\.syscalls\[0\]\.args\[0\]\.op", "SCMP_CMP_ALMOST"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     r"seccomp\.syscalls\[0\]\.args\[0\]\.index", "6"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
     r"seccomp\.syscalls\[0\]\.args\[0\]\.value", "-1"),
    ({"architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_VAX"]},
     r"seccomp\.architectures\[1\]", "SCMP_ARCH_VAX"),
    ({"flags": ["SECCOMP_FILTER_FLAG_FAST"]}, r"seccomp\.flags\[0\]", "SECCOMP_FILTER_FLAG_FAST"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "errnoRet": 5}]},
     r"seccomp\.syscalls\[0\]\.errnoRet", "SCMP_ACT_KILL"),
    ({"syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]},
     r"seccomp\.syscalls\[0\]\.names", "non-empty"),
    ({"syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO",
                    "includes": {"caps": ["CAP_SYS_ADMIN"]}}]},
     r"seccomp\.syscalls\[0\]\.includes", "default_profile"),
])
def test_invalid_documents_name_the_field(profile: dict[str, Any], field: str,
                                          word: str) -> None:
    with pytest.raises(InvalidDocument, match=field) as info:
        S.compile_filter({"defaultAction": "SCMP_ACT_ALLOW", **profile})
    assert word in str(info.value)


# ---- compiled once, frozen ---------------------------------------------------------------


def test_a_frozen_filter_is_the_program_libseccomp_would_load() -> None:
    profile = default()
    with S.compile_filter(profile) as fresh:
        bpf = fresh.export_bpf()
    filt = S.compile_filter(profile).freeze()
    assert filt.frozen and filt.export_bpf() == bpf
    assert (filt.unknown, filt.rules) == (S.compile_filter(profile).unknown,
                                          S.compile_filter(profile).rules)
    filt.release()  # nothing to free: the program stays loadable
    assert filt.export_bpf() == bpf


def test_compile_cached_is_once_per_profile() -> None:
    a = S.compile_cached(default())
    assert S.compile_cached(default()) is a and a.frozen
    other = default()
    other["defaultErrnoRet"] = errno.ENXIO  # any change of the profile: its own program
    b = S.compile_cached(other)
    assert b is not a and b.export_bpf() != a.export_bpf()
    assert probe(other, {"keyctl": "libc.syscall(250, 0, -3, 1)"}) == {"keyctl": errno.ENXIO}
    with pytest.raises(InvalidDocument):
        S.compile_cached({"defaultAction": "SCMP_ACT_NOPE"})  # errors are not cached away


@pytest.mark.usefixtures("loaders")
def test_flags_reach_the_kernel() -> None:
    # TSYNC from a threaded process: every thread gets the filter (seccomp(2)'s flag).
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"],
               "syscalls": [{"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": errno.EXDEV}]}
    filt = S.compile_filter(profile)
    if LOADER["frozen"]:
        filt.freeze()
        assert filt.kernel_flags == 1 | 2
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            import ctypes
            import threading

            libc = ctypes.CDLL(None, use_errno=True)
            go, done = threading.Event(), threading.Event()
            seen: list[int] = []

            def other() -> None:
                go.wait()
                ctypes.set_errno(0)
                libc.getpriority(0, 0)
                seen.append(ctypes.get_errno())
                done.set()

            threading.Thread(target=other, daemon=True).start()
            L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
            filt.load()
            go.set()
            done.wait(10)
            code = 0 if seen == [errno.EXDEV] else 3
        finally:
            os._exit(code)
    os.close(r)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    filt.release()
    assert os.waitstatus_to_exitcode(status) == 0
