"""The container's root filesystem, set up by the init inside its new mount namespace.

Order (as runc): stop propagation to the host; bind the root onto itself; the config's
mounts, each destination resolved *inside* the root (a symlink in the image cannot send a
mount to a host path); a minimal ``/dev``; ``pivot_root`` (the old root is detached, so no
host path stays reachable); sysctls; read-only and masked paths; a read-only root;
hostname.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from isobox._sys import linux as L
from isobox.errors import InvalidDocument, SystemError_
from isobox.silo.config import Device, Mount, SiloConfig

DEFAULT_DEVICES = [
    Device("/dev/null", "c", 1, 3), Device("/dev/zero", "c", 1, 5),
    Device("/dev/full", "c", 1, 7), Device("/dev/random", "c", 1, 8),
    Device("/dev/urandom", "c", 1, 9), Device("/dev/tty", "c", 5, 0),
]
DEV_LINKS = {
    "/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
    "/dev/core": "/proc/kcore",
}


def secure_join(root: str, path: str) -> str:
    """``path`` inside ``root``, following symlinks as if ``root`` were ``/``.

    No component, however the image's symlinks are made, resolves outside ``root``.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 255:
                raise InvalidDocument(f"too many symlinks resolving {path} in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _ensure_target(target: str, source_is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    if source_is_dir:
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        with open(target, "a"):
            pass


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy, from /proc/self/cgroup: controllers (as
    written there, "" for v2) -> path (relative to the cgroup namespace's root)."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            out[ctrls] = path
    return out


def _hierarchy_mounts(fstype: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, root, super options) of every ``fstype`` mount visible now."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if not fields or fields[0] != fstype:
                continue
            parts = left.split()
            out.append((parts[4], parts[3], fields[2].split(",")))
    return out


def _host_dir(mounts: list[tuple[str, str, list[str]]], ctrls: set[str],
              path: str) -> str | None:
    """The folder of cgroup ``path`` in a mounted hierarchy holding ``ctrls``."""
    for point, mroot, opts in mounts:
        if ctrls and not ctrls <= set(opts):
            continue
        if path == mroot or path.startswith(mroot.rstrip("/") + "/"):
            rest = path[len(mroot.rstrip("/")):].lstrip("/")
            d = os.path.join(point, rest)
            if os.path.isdir(d):
                return d
    return None


def _bind_cgroup(host_dir: str, target: str, flags: int) -> None:
    L.mount(host_dir, target, None, L.MS_BIND)
    L.mount(None, target, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY
            | (flags & (L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC | L.MS_RELATIME)))


def _cgroup_mount(root: str, m: Mount, target: str) -> None:
    """The container's own cgroups, never the host's tree.

    In a cgroup namespace whose root is the container's cgroup (``/proc/self/cgroup`` says
    ``/``) a fresh cgroupfs mount shows that cgroup only; it is writable only if the config
    says ``rw``. Without one (v1 engines' default: cgroupns=host) a fresh mount would be the
    host's whole hierarchy: then, as runc does, the container's own folder is bind-mounted,
    always read-only."""
    _mkdirs(target)
    flags = m.flags & ~L.MS_BIND
    own = _own_cgroups()
    v2 = any(
        line.split(" - ")[1].split()[0] == "cgroup2" and line.split()[4] == "/sys/fs/cgroup"
        for line in open("/proc/self/mountinfo")  # noqa: SIM115
    )
    if v2:
        path = own.get("", "/")
        if path == "/":
            L.mount("cgroup2", target, "cgroup2", flags)
            return
        host = _host_dir(_hierarchy_mounts("cgroup2"), set(), path)
        if host is None:
            raise InvalidDocument(f"mount {m.destination}: the container's cgroup {path} "
                                  "is not mounted on the host")
        _bind_cgroup(host, target, flags)
        return
    L.mount("tmpfs", target, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=755")
    mounts = _hierarchy_mounts("cgroup")
    seen: set[str] = set()
    for _point, _mroot, opts in mounts:
        ctrls = [o for o in opts if o not in ("rw", "ro") and not o.startswith("release_agent")]
        name = ",".join(c for c in ctrls if not c.startswith("name=")) or ctrls[-1].split("=")[-1]
        if name in seen:
            continue
        seen.add(name)
        key = next((k for k in own if k and set(k.split(",")) <= set(opts)), None)
        if key is None:
            continue  # a hierarchy this process is not in (another name=): nothing to show
        sub = os.path.join(target, name)
        _mkdirs(sub)
        path = own[key]
        if path == "/":
            with contextlib.suppress(SystemError_):
                L.mount("cgroup", sub, "cgroup", flags, ",".join(ctrls))
            continue
        host = _host_dir(mounts, set(key.split(",")), path)
        if host is not None:
            _bind_cgroup(host, sub, flags)
    if flags & L.MS_RDONLY:
        L.mount(None, target, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID
                | L.MS_NODEV | L.MS_NOEXEC)


def mount_one(root: str, m: Mount) -> None:
    target = secure_join(root, m.destination)
    if m.type == "cgroup":
        _cgroup_mount(root, m, target)
        return
    if m.is_bind:
        try:
            src_is_dir = os.path.isdir(m.source)
        except OSError:
            src_is_dir = False
        if not os.path.exists(m.source):
            raise InvalidDocument(f"mount {m.destination}: source {m.source} does not exist")
        _ensure_target(target, src_is_dir)
        L.mount(m.source, target, None, m.flags & (L.MS_BIND | L.MS_REC))
        # Bind mounts take their flags only on a remount.
        remount = m.flags & ~(L.MS_BIND | L.MS_REC | L.MS_REMOUNT)
        if remount:
            L.mount(None, target, None, L.MS_REMOUNT | L.MS_BIND | remount)
    else:
        _mkdirs(target)
        try:
            L.mount(m.source, target, m.type, m.flags, m.data or None)
        except SystemError_ as exc:
            # mqueue and friends may be refused in some set-ups: docker ignores it for
            # sysfs in a user namespace; we ignore EPERM only for mqueue.
            if not (m.type == "mqueue" and exc.errno == errno.EPERM):
                raise
    if m.propagation:
        L.mount(None, target, None, m.propagation)


def _make_device(root: str, dev: Device) -> None:
    target = secure_join(root, dev.path)
    _mkdirs(os.path.dirname(target))
    kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "u": stat.S_IFCHR, "p": stat.S_IFIFO}[dev.type]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    try:
        os.mknod(target, kind | (dev.mode & 0o7777), os.makedev(dev.major, dev.minor))
        os.chown(target, dev.uid, dev.gid)
        os.chmod(target, dev.mode & 0o7777)  # mknod's mode went through the umask
    except PermissionError:
        # In a user namespace mknod is refused: bind the host's node instead.
        with open(target, "a"):
            pass
        L.mount(dev.path, target, None, L.MS_BIND)


def setup_dev(root: str, cfg: SiloConfig) -> None:
    dev_is_mounted = any(m.destination == "/dev" for m in cfg.mounts)
    if not dev_is_mounted:
        return  # the bundle brings its own /dev: leave it
    seen = set()
    for dev in [*DEFAULT_DEVICES, *cfg.devices]:
        if dev.path in seen:
            continue
        seen.add(dev.path)
        _make_device(root, dev)
    for link, target in DEV_LINKS.items():
        path = secure_join(root, link)
        if not os.path.lexists(path):
            os.symlink(target, path)
    ptmx = secure_join(root, "/dev/ptmx")
    if os.path.isdir(secure_join(root, "/dev/pts")) and not os.path.lexists(ptmx):
        os.symlink("pts/ptmx", ptmx)
    for d in ("/dev/shm", "/dev/pts", "/dev/mqueue"):
        _mkdirs(secure_join(root, d))


def prepare(cfg: SiloConfig) -> None:
    """Everything before pivot_root: propagation, the root bind, mounts, /dev."""
    root = cfg.root
    L.mount(None, "/", None, cfg.rootfs_propagation or (L.MS_PRIVATE | L.MS_REC))
    # As runc: the mount holding the root is made private (in this mount namespace only)
    # before the root bind, so that with rootfsPropagation (r)shared nothing mounted in the
    # container propagates to the host's copy of the bundle (and pivot_root, which refuses
    # a shared parent, works).
    _parent_mount_private(root)
    L.mount(root, root, None, L.MS_BIND | L.MS_REC)
    for m in cfg.mounts:
        mount_one(root, m)
    setup_dev(root, cfg)


def _parent_mount_private(path: str) -> None:
    best, shared = "", False
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left = line.partition(" - ")[0].split()
            point = left[4]
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, shared = point, any(f.startswith("shared:") for f in left[6:])
    if best and shared:
        L.mount(None, best, None, L.MS_PRIVATE)


def pivot(root: str) -> None:
    """Make ``root`` the root; detach the old one so no host path stays reachable."""
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


def finish(cfg: SiloConfig) -> None:
    """After pivot_root: sysctls, read-only and masked paths, read-only root, names.

    Sysctls first, as runc: ``/proc/sys`` is one of the read-only paths engines ask for,
    and Docker sets ``net.ipv4.ip_unprivileged_port_start`` in every container."""
    for key, value in cfg.sysctl.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(value)
    for path in cfg.readonly_paths:
        _readonly(path)
    for path in cfg.masked_paths:
        _mask(path)
    if cfg.readonly_root:
        L.mount(None, "/", None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY)
    if cfg.hostname is not None and cfg.new_namespace("uts"):
        import socket

        socket.sethostname(cfg.hostname)
    if cfg.domainname is not None and cfg.new_namespace("uts"):
        L.setdomainname(cfg.domainname)


def _mask(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        L.mount("tmpfs", path, "tmpfs", L.MS_RDONLY, None)
    else:
        L.mount("/dev/null", path, None, L.MS_BIND)


def _readonly(path: str) -> None:
    if not os.path.exists(path):
        return
    L.mount(path, path, None, L.MS_BIND | L.MS_REC)
    flags = L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY
    try:
        L.mount(None, path, None, flags | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    except SystemError_:
        L.mount(None, path, None, flags)  # keep whatever locked flags the mount has


def check_cwd_inside() -> None:
    """CVE-2024-21626: after chdir, the working directory must be inside the container."""
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise InvalidDocument(f"process.cwd is not reachable inside the container: {exc}") from exc
    if not cwd.startswith("/") or cwd.startswith("(unreachable)"):
        raise InvalidDocument(f"process.cwd resolves outside the container ({cwd!r})")


def exists_in(root: str, path: str) -> bool:
    return Path(secure_join(root, path)).exists()
