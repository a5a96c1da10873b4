"""Run a command so that it cannot move itself out of its cgroups: ``confine.py -- ARGV``.

Used by ``Job.spawn(..., confine=True)``, inside the job, between the job's launcher and the
command. Standard library only: it is run by path (``python -I -S confine.py``) and must
not depend on isobox being importable with the command's environment.

Why it takes this much. On cgroup v1 the kernel lets any process whose effective uid is 0
write any pid to any ``cgroup.procs`` — no capability is checked — so dropping CAP_SYS_ADMIN
alone keeps nobody in. What keeps a root process in is that it cannot *reach* a writable
cgroup filesystem:

1. a mount namespace of its own (slave: the host's later mounts still appear in it, its own
   changes do not leave it) in which every cgroup mount is remounted read-only;
2. without CAP_SYS_ADMIN, so it can neither remount them read-write nor mount a new
   cgroupfs, unmount, ``setns`` back into the host's mount namespace or make new ones;
3. without CAP_SYS_PTRACE, so ``/proc/<pid>/root`` of a process outside (the host's mount
   namespace, with the writable mounts) stays closed to it, as does attaching to one;
4. without CAP_SYS_MODULE (kernel code can move anything anywhere).

The three are removed from the bounding set (so no exec, setuid or file capability brings
them back), from the inheritable set and from the ambient set, then ARGV is executed.

What remains possible for a root process — the documented limit of a *host* job — is to
have something outside the job act for it: a privileged daemon it can talk to, or a kernel
usermode helper it can configure (``/proc/sys/kernel/core_pattern``, ``modprobe``). Only
process isolation (namespaces, no host root) closes those.

Exit status: 126 when the confinement cannot be set up (the command is *not* run
unconfined), 127 when the command is not found, as a shell.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME = 256, 1024, 2048
MS_SLAVE, MS_RELATIME, MS_STRICTATIME = 1 << 19, 1 << 21, 1 << 24
_PER_MOUNT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
              "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
              "strictatime": MS_STRICTATIME, "nosymfollow": MS_NOSYMFOLLOW}

CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 16, 19, 21
DROPPED = (CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_ADMIN)
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_CAPGET, SYS_CAPSET = {"x86_64": (125, 126), "aarch64": (90, 91)}.get(
    os.uname().machine, (125, 126))
_CAP_V3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]


class _Failed(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise _Failed(f"{what}: {os.strerror(err)}")


def cgroup_mounts(mountinfo: str) -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) of every cgroup and cgroup2 mount."""
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] in (["cgroup"], ["cgroup2"]) and len(fields) > 5:
            point = fields[4].replace("\\040", " ").replace("\\011", "\t")
            point = point.replace("\\012", "\n").replace("\\134", "\\")
            flags = 0
            for opt in fields[5].split(","):
                flags |= _PER_MOUNT.get(opt, 0)
            out.append((point, flags))
    return out


def _confine() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    with open("/proc/self/mountinfo") as fh:
        mounts = cgroup_mounts(fh.read())
    for point, flags in mounts:
        _check(_libc.mount(None, os.fsencode(point), None,
                           MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None),
               f"remount {point} read-only")
    for cap in DROPPED:
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
    header = (ctypes.c_uint32 * 2)(_CAP_V3, 0)
    data = (ctypes.c_uint32 * 6)()  # 2 x (effective, permitted, inheritable)
    _check(_libc.syscall(SYS_CAPGET, header, data), "capget")
    for cap in DROPPED:
        word, bit = divmod(cap, 32)
        for field in range(3):
            data[word * 3 + field] &= ~(1 << bit) & 0xFFFFFFFF
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset")


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("isobox-confine: nothing to run", file=sys.stderr)
        return 126
    try:
        _confine()
    except (_Failed, OSError) as exc:
        print(f"isobox-confine: cannot confine the command: {exc}", file=sys.stderr)
        return 126
    try:
        os.execvp(args[0], args)
    except FileNotFoundError:
        print(f"isobox-confine: {args[0]}: not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"isobox-confine: {args[0]}: {exc.strerror}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
