"""The two cgroup backends behind a Job: v1 (a hierarchy per controller) and v2 (unified).

Both present one small interface, :class:`Cgroup`: create, add a process, list processes,
set limits, read counters, freeze, kill everything, remove, and the files or descriptors
that signal a change. Which one is used is decided by probing (:func:`detect`), or by
``ISOBOX_CGROUP_VERSION=1|2``.

Where jobs live:

* v1: under the engine's own cgroup of each controller, in ``isobox/`` (so a limit the host
  put on the engine also holds for its jobs), or under ``$ISOBOX_CGROUP_PARENT``.
* v2: under ``<mount>/isobox/`` (v2 forbids enabling controllers below a cgroup that holds
  processes, such as the engine's own), or under ``$ISOBOX_CGROUP_PARENT``. A v2 job keeps
  its processes in a ``procs`` leaf so that nested jobs can sit beside them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from isobox.errors import InvalidArgument, IsoboxError, NotFound, from_oserror
from isobox.jobs.limits import IoLimit, Limits

CFS_PERIOD_US = 100_000
V1_CONTROLLERS = (
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "freezer", "devices",
)


@dataclass(frozen=True)
class DeviceRule:
    """One device-cgroup rule: allow or deny access (``rwm``) to ``type major:minor``.

    ``type`` is ``a`` (all), ``c`` or ``b``; a major or minor of None means any (``*``).
    """

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"

    def line(self) -> str:
        if self.type == "a":
            return "a"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {self.access}"


# What every container may use, whatever its config says (as runc): the default nodes,
# ptys, and the tun device.
DEFAULT_DEVICE_RULES = (
    DeviceRule(True, "c", None, None, "m"), DeviceRule(True, "b", None, None, "m"),
    DeviceRule(True, "c", 1, 3), DeviceRule(True, "c", 1, 5), DeviceRule(True, "c", 1, 7),
    DeviceRule(True, "c", 1, 8), DeviceRule(True, "c", 1, 9), DeviceRule(True, "c", 5, 0),
    DeviceRule(True, "c", 5, 1), DeviceRule(True, "c", 5, 2), DeviceRule(True, "c", 136, None),
    DeviceRule(True, "c", 10, 200),
)
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")


@dataclass
class Counters:
    cpu_user_ns: int = 0
    cpu_kernel_ns: int = 0
    memory_current: int = 0
    memory_peak: int = 0
    page_faults: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    io_read_ops: int = 0
    io_write_ops: int = 0
    memory_limit_hits: int = 0
    oom_kills: int = 0
    pids_limit_hits: int = 0
    throttled_periods: int = 0


@dataclass
class Watches:
    """What signals a change: files for inotify, and eventfds (v1 memory)."""

    files: list[str] = field(default_factory=list)
    eventfds: list[int] = field(default_factory=list)


class CgroupError(IsoboxError):
    pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise from_oserror("read", str(path), exc) from exc


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EBUSY):
            raise InvalidArgument(f"cgroup: writing {value.strip()!r} to {path}: "
                                  f"{os.strerror(exc.errno or 0)}") from exc
        raise from_oserror("write", str(path), exc) from exc


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = [*right.split(), "", "", ""][:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((left.split()[4], fstype, opts))
    return out


def _own(controller: str | None) -> str:
    """This process's cgroup path in a v1 controller's hierarchy (None: the v2 one)."""
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _id, ctrls, path = line.rstrip("\n").split(":", 2)
            if (controller is None and ctrls == "") or (
                controller is not None and controller in ctrls.split(",")
            ):
                return path
    return "/"


class Cgroup:
    """Interface of a job's cgroup; see CgroupV1 and CgroupV2."""

    version: int
    rel: str  # the job's path relative to each hierarchy's mount

    def create(self) -> None: raise NotImplementedError
    def child(self, name: str) -> Cgroup: raise NotImplementedError
    def add(self, pid: int) -> None: raise NotImplementedError
    def pids(self) -> list[int]: raise NotImplementedError
    def set_limits(self, limits: Limits, ncpu: int) -> None: raise NotImplementedError
    def set_devices(self, rules: list[DeviceRule]) -> bool: raise NotImplementedError
    def read(self) -> Counters: raise NotImplementedError
    def freeze(self) -> None: raise NotImplementedError
    def thaw(self) -> None: raise NotImplementedError
    def kill_all(self) -> None: raise NotImplementedError
    def remove(self) -> None: raise NotImplementedError
    def exists(self) -> bool: raise NotImplementedError
    def watches(self) -> Watches: raise NotImplementedError
    def dirs(self) -> list[str]: raise NotImplementedError

    def _wait_empty(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(f"job {self.rel}: processes still running after kill")
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)


def _rmdir(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EBUSY: the last task is still being torn down by the kernel.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise from_oserror("rmdir", str(path), exc) from exc
            time.sleep(0.01)


class CgroupV1(Cgroup):
    version = 1

    def __init__(self, paths: dict[str, Path], rel: str) -> None:
        self.paths = paths  # controller -> this job's folder in that hierarchy
        self.rel = rel.strip("/")
        self._eventfds: list[int] = []

    @staticmethod
    def root(name: str) -> CgroupV1:
        mounts: dict[str, str] = {}
        for point, fstype, opts in _mounts():
            if fstype != "cgroup":
                continue
            for ctrl in opts.split(","):
                if ctrl in V1_CONTROLLERS:
                    mounts.setdefault(ctrl, point)
        missing = [c for c in ("cpu", "cpuacct", "memory", "pids", "freezer") if c not in mounts]
        if missing:
            raise NotFound(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        parent = os.environ.get("ISOBOX_CGROUP_PARENT")
        paths: dict[str, Path] = {}
        for ctrl, point in mounts.items():
            # Under the engine's own cgroup of each controller, so host limits still hold.
            base = parent if parent is not None else _own(ctrl).strip("/") + "/isobox"
            paths[ctrl] = Path(point) / base.strip("/") / name
        return CgroupV1(paths, f"isobox/{name}")

    @staticmethod
    def from_paths(paths: dict[str, str], rel: str) -> CgroupV1:
        return CgroupV1({c: Path(p) for c, p in paths.items()}, rel)

    def _paths(self) -> dict[str, Path]:
        seen: dict[str, Path] = {}
        for path in self.paths.values():
            seen.setdefault(str(path), path)
        return seen

    def _p(self, ctrl: str, name: str) -> Path:
        return self.paths[ctrl] / name

    def dirs(self) -> list[str]:
        return list(self._paths())

    def child(self, name: str) -> CgroupV1:
        return CgroupV1({c: p / name for c, p in self.paths.items()}, f"{self.rel}/{name}")

    def exists(self) -> bool:
        return any(p.is_dir() for p in self._paths().values())

    def create(self) -> None:
        for ctrl, path in self.paths.items():
            missing: list[Path] = []
            cur = path
            while not cur.is_dir():
                missing.append(cur)
                cur = cur.parent
            for d in reversed(missing):
                try:
                    d.mkdir()
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise from_oserror("mkdir", str(d), exc) from exc
                if ctrl == "cpuset":
                    # A new v1 cpuset is empty: inherit the parent's CPUs and memory nodes.
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        _write(d / f, _read(d.parent / f).strip() or "0")
        if "memory" in self.paths:
            with contextlib.suppress(InvalidArgument):
                _write(self._p("memory", "memory.use_hierarchy"), "1")

    def add(self, pid: int) -> None:
        for path in self._paths().values():
            try:
                _write(path / "cgroup.procs", str(pid))
            except InvalidArgument as exc:
                if not Path(f"/proc/{pid}").exists():
                    raise NotFound(f"process {pid} does not exist") from exc
                raise

    def pids(self) -> list[int]:
        """Every process in this job and its nested jobs."""
        top = self.paths["pids" if "pids" in self.paths else "freezer"]
        out: list[int] = []
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                out += [int(x) for x in _read(Path(dirpath) / "cgroup.procs").split()]
        return out

    def set_limits(self, limits: Limits, ncpu: int) -> None:
        if limits.cpu_rate is not None:
            quota = max(1000, round(limits.cpu_rate / 10000 * ncpu * CFS_PERIOD_US))
            _write(self._p("cpu", "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            _write(self._p("cpu", "cpu.cfs_quota_us"), str(quota))
        if limits.cpu_weight is not None:
            shares = min(262144, max(2, limits.cpu_weight * 1024 // 100))
            _write(self._p("cpu", "cpu.shares"), str(shares))
        if limits.memory is not None:
            _write(self._p("memory", "memory.limit_in_bytes"), str(limits.memory))
        if limits.pids is not None:
            _write(self._p("pids", "pids.max"), str(limits.pids))
        if limits.cpuset is not None:
            if "cpuset" not in self.paths:
                raise InvalidArgument("cpuset: the cpuset controller is not mounted here")
            _write(self._p("cpuset", "cpuset.cpus"), limits.cpuset)
        for io in limits.io:
            self._set_io(io)

    def set_devices(self, rules: list[DeviceRule]) -> bool:
        """Deny every device, then apply ``rules`` in order (later rules win). True: enforced."""
        if "devices" not in self.paths:
            raise InvalidArgument("device rules: the devices controller is not mounted here")
        _write(self._p("devices", "devices.deny"), "a")
        for rule in rules:
            if rule.type == "a" and not rule.allow:
                _write(self._p("devices", "devices.deny"), "a")
                continue
            _write(self._p("devices", "devices.allow" if rule.allow else "devices.deny"),
                   rule.line())
        return True

    def _set_io(self, io: IoLimit) -> None:
        if "blkio" not in self.paths:
            raise InvalidArgument("io limits: the blkio controller is not mounted here")
        for attr, fname in (
            ("read_bps", "blkio.throttle.read_bps_device"),
            ("write_bps", "blkio.throttle.write_bps_device"),
            ("read_iops", "blkio.throttle.read_iops_device"),
            ("write_iops", "blkio.throttle.write_iops_device"),
        ):
            value = getattr(io, attr)
            if value is not None:
                _write(self._p("blkio", fname), f"{io.device} {value}")

    def read(self) -> Counters:
        c = Counters()
        user = _read(self._p("cpuacct", "cpuacct.usage_user")).strip()
        if user:
            c.cpu_user_ns = int(user)
            c.cpu_kernel_ns = int(_read(self._p("cpuacct", "cpuacct.usage_sys")).strip() or 0)
        else:
            stat = _kv(_read(self._p("cpuacct", "cpuacct.stat")))
            hz = os.sysconf("SC_CLK_TCK")
            c.cpu_user_ns = stat.get("user", 0) * 1_000_000_000 // hz
            c.cpu_kernel_ns = stat.get("system", 0) * 1_000_000_000 // hz
        c.memory_current = int(_read(self._p("memory", "memory.usage_in_bytes")).strip() or 0)
        c.memory_peak = int(_read(self._p("memory", "memory.max_usage_in_bytes")).strip() or 0)
        c.memory_limit_hits = int(_read(self._p("memory", "memory.failcnt")).strip() or 0)
        mstat = _kv(_read(self._p("memory", "memory.stat")))
        c.page_faults = mstat.get("total_pgfault", mstat.get("pgfault", 0))
        c.oom_kills = _kv(_read(self._p("memory", "memory.oom_control"))).get("oom_kill", 0)
        c.pids_limit_hits = _kv(_read(self._p("pids", "pids.events"))).get("max", 0)
        c.throttled_periods = _kv(_read(self._p("cpu", "cpu.stat"))).get("nr_throttled", 0)
        if "blkio" in self.paths:
            for fname, rd, wr in (
                ("blkio.throttle.io_service_bytes_recursive", "io_read_bytes", "io_write_bytes"),
                ("blkio.throttle.io_serviced_recursive", "io_read_ops", "io_write_ops"),
            ):
                for line in _read(self._p("blkio", fname)).splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[1] in ("Read", "Write"):
                        attr = rd if parts[1] == "Read" else wr
                        setattr(c, attr, getattr(c, attr) + int(parts[2]))
        return c

    def freeze(self) -> None:
        _write(self._p("freezer", "freezer.state"), "FROZEN")
        deadline = time.monotonic() + 5
        while _read(self._p("freezer", "freezer.state")).strip() != "FROZEN":
            if time.monotonic() > deadline:
                raise CgroupError(f"job {self.rel}: freezing did not complete")
            time.sleep(0.002)

    def thaw(self) -> None:
        _write(self._p("freezer", "freezer.state"), "THAWED")

    def kill_all(self) -> None:
        # Frozen, no process can fork between listing and killing; SIGKILL is delivered
        # when they thaw. Then wait until the cgroup is empty (re-killing stragglers).
        if not self.exists():
            return
        self.freeze()
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self.thaw()
        self._wait_empty()

    def remove(self) -> None:
        for fd in self._eventfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._eventfds.clear()
        for path in self._paths().values():
            _rmdir(path)

    def watches(self) -> Watches:
        w = Watches(files=[str(self._p("pids", "pids.events"))])
        oom = self._p("memory", "memory.oom_control")
        control = self._p("memory", "cgroup.event_control")
        if oom.exists() and control.exists():
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ofd = os.open(oom, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(control, f"{efd} {ofd}")
            finally:
                os.close(ofd)
            self._eventfds.append(efd)
            w.eventfds.append(efd)
        return w


class CgroupV2(Cgroup):
    version = 2

    def __init__(self, rel: str, mount: str) -> None:
        self.rel = rel.strip("/")
        self.mount = mount

    @staticmethod
    def root(name: str) -> CgroupV2:
        mount = _v2_mount()
        if mount is None:
            raise NotFound("no cgroup v2 hierarchy is mounted")
        parent = os.environ.get("ISOBOX_CGROUP_PARENT", "isobox").strip("/")
        return CgroupV2(f"{parent}/{name}", mount)

    @property
    def path(self) -> Path:
        return Path(self.mount) / self.rel

    @property
    def leaf(self) -> Path:
        return self.path / "procs"

    def dirs(self) -> list[str]:
        return [str(self.path)]

    def child(self, name: str) -> CgroupV2:
        if name == "procs":
            raise InvalidArgument("'procs' is reserved for a v2 job's own processes")
        return CgroupV2(f"{self.rel}/{name}", self.mount)

    def exists(self) -> bool:
        return self.path.is_dir()

    def available(self) -> set[str]:
        return set(_read(self.path / "cgroup.controllers").split())

    def create(self) -> None:
        cur = Path(self.mount)
        for part in Path(self.rel).parts:
            self._enable_below(cur)
            cur = cur / part
            try:
                cur.mkdir()
            except FileExistsError:
                pass
            except OSError as exc:
                raise from_oserror("mkdir", str(cur), exc) from exc
        self._enable_below(self.path)
        try:
            self.leaf.mkdir(exist_ok=True)
        except OSError as exc:
            raise from_oserror("mkdir", str(self.leaf), exc) from exc

    @staticmethod
    def _enable_below(path: Path) -> None:
        have = set(_read(path / "cgroup.controllers").split())
        on = set(_read(path / "cgroup.subtree_control").split())
        for ctrl in V2_CONTROLLERS:
            if ctrl in have and ctrl not in on:
                with contextlib.suppress(InvalidArgument):
                    _write(path / "cgroup.subtree_control", f"+{ctrl}")

    def add(self, pid: int) -> None:
        try:
            _write(self.leaf / "cgroup.procs", str(pid))
        except InvalidArgument as exc:
            if not Path(f"/proc/{pid}").exists():
                raise NotFound(f"process {pid} does not exist") from exc
            raise

    def pids(self) -> list[int]:
        out: list[int] = []
        for dirpath, _dirs, files in os.walk(self.path):
            if "cgroup.procs" in files:
                out += [int(x) for x in _read(Path(dirpath) / "cgroup.procs").split()]
        return out

    def _need(self, ctrl: str, what: str) -> None:
        if ctrl not in self.available():
            raise InvalidArgument(
                f"{what}: the cgroup v2 '{ctrl}' controller is not enabled for {self.path}"
            )

    def set_limits(self, limits: Limits, ncpu: int) -> None:
        if limits.cpu_rate is not None:
            self._need("cpu", "cpu_rate")
            quota = max(1000, round(limits.cpu_rate / 10000 * ncpu * CFS_PERIOD_US))
            _write(self.path / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if limits.cpu_weight is not None:
            self._need("cpu", "cpu_weight")
            _write(self.path / "cpu.weight", str(limits.cpu_weight))
        if limits.memory is not None:
            self._need("memory", "memory")
            _write(self.path / "memory.max", str(limits.memory))
        if limits.pids is not None:
            self._need("pids", "pids")
            _write(self.path / "pids.max", str(limits.pids))
        if limits.cpuset is not None:
            self._need("cpuset", "cpuset")
            _write(self.path / "cpuset.cpus", limits.cpuset)
        for io in limits.io:
            self._need("io", "io limits")
            parts = [io.device]
            for attr, key in (("read_bps", "rbps"), ("write_bps", "wbps"),
                              ("read_iops", "riops"), ("write_iops", "wiops")):
                v = getattr(io, attr)
                if v is not None:
                    parts.append(f"{key}={v}")
            _write(self.path / "io.max", " ".join(parts))

    def set_devices(self, rules: list[DeviceRule]) -> bool:
        """Not enforced: cgroup v2 controls devices with an eBPF program, which isobox does
        not load yet. The caller must compensate (the silo drops CAP_MKNOD)."""
        del rules
        return False

    def read(self) -> Counters:
        c = Counters()
        cpu = _kv(_read(self.path / "cpu.stat"))
        c.cpu_user_ns = cpu.get("user_usec", 0) * 1000
        c.cpu_kernel_ns = cpu.get("system_usec", 0) * 1000
        c.throttled_periods = cpu.get("nr_throttled", 0)
        c.memory_current = int(_read(self.path / "memory.current").strip() or 0)
        c.memory_peak = int(_read(self.path / "memory.peak").strip() or 0)
        c.page_faults = _kv(_read(self.path / "memory.stat")).get("pgfault", 0)
        mev = _kv(_read(self.path / "memory.events"))
        c.memory_limit_hits = mev.get("max", 0)
        c.oom_kills = mev.get("oom_kill", 0)
        c.pids_limit_hits = _kv(_read(self.path / "pids.events")).get("max", 0)
        for line in _read(self.path / "io.stat").splitlines():
            fields_ = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            c.io_read_bytes += int(fields_.get("rbytes", 0))
            c.io_write_bytes += int(fields_.get("wbytes", 0))
            c.io_read_ops += int(fields_.get("rios", 0))
            c.io_write_ops += int(fields_.get("wios", 0))
        return c

    def freeze(self) -> None:
        _write(self.path / "cgroup.freeze", "1")
        deadline = time.monotonic() + 5
        while _kv(_read(self.path / "cgroup.events")).get("frozen") != 1:
            if time.monotonic() > deadline:
                raise CgroupError(f"job {self.rel}: freezing did not complete")
            time.sleep(0.002)

    def thaw(self) -> None:
        _write(self.path / "cgroup.freeze", "0")

    def kill_all(self) -> None:
        if not self.exists():
            return
        if (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1")  # the kernel kills forks in flight too
        else:
            self.freeze()
            try:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            finally:
                self.thaw()
        self._wait_empty()

    def remove(self) -> None:
        _rmdir(self.leaf)
        _rmdir(self.path)

    def watches(self) -> Watches:
        return Watches(files=[str(self.path / f) for f in ("memory.events", "pids.events")
                              if (self.path / f).exists()])


def _v2_mount() -> str | None:
    for point, fstype, _opts in _mounts():
        if fstype == "cgroup2":
            return point
    return None


def detect(name: str) -> Cgroup:
    """The backend this host uses, for a new top-level job called ``name``."""
    forced = os.environ.get("ISOBOX_CGROUP_VERSION")
    if forced == "2":
        return CgroupV2.root(name)
    if forced == "1":
        return CgroupV1.root(name)
    if forced:
        raise InvalidArgument(f"ISOBOX_CGROUP_VERSION={forced!r}: must be 1 or 2")
    mounts = _mounts()
    if any(fstype == "cgroup2" and point == "/sys/fs/cgroup" for point, fstype, _ in mounts):
        return CgroupV2.root(name)
    if any(fstype == "cgroup" for _, fstype, _ in mounts):
        return CgroupV1.root(name)
    v2 = _v2_mount()
    if v2 is not None:
        return CgroupV2.root(name)
    raise NotFound("no cgroup hierarchy is mounted")


def describe(cg: Cgroup) -> dict[str, object]:
    """What the reaper needs to find a job's cgroup again (JSON-serialisable)."""
    if isinstance(cg, CgroupV1):
        return {"version": 1, "rel": cg.rel, "paths": {c: str(p) for c, p in cg.paths.items()}}
    assert isinstance(cg, CgroupV2)
    return {"version": 2, "rel": cg.rel, "mount": cg.mount}


def from_description(desc: dict[str, object]) -> Cgroup:
    rel = str(desc["rel"])
    if desc.get("version") == 1:
        paths = desc["paths"]
        assert isinstance(paths, dict)
        return CgroupV1.from_paths({str(k): str(v) for k, v in paths.items()}, rel)
    return CgroupV2(rel, str(desc["mount"]))


def cgroup_at(path: str | None, name: str) -> Cgroup:
    """The cgroup an OCI runtime uses: ``cgroupsPath`` if given, else ``isobox/<name>``.

    An absolute ``cgroupsPath`` (``/default/<id>`` from containerd, ``/docker/<id>`` from
    dockerd) is taken from each hierarchy's root, as runc does; a relative one goes below the
    engine's own cgroup. The systemd form (``slice:prefix:name``) is refused: it needs
    systemd, which isobox does not drive.
    """
    if path and ":" in path:
        raise InvalidArgument(
            f"cgroupsPath {path!r} is in systemd form; isobox manages cgroupfs only "
            "(drop --systemd-cgroup / use cgroup_manager = \"cgroupfs\")"
        )
    base = detect(name)
    if not path:
        return base
    if isinstance(base, CgroupV1):
        paths: dict[str, Path] = {}
        for ctrl, job_dir in base.paths.items():
            mount = _mount_of(job_dir)
            root = "" if path.startswith("/") else _own(ctrl).strip("/")
            paths[ctrl] = Path(mount) / root / path.strip("/")
        return CgroupV1(paths, path.strip("/"))
    assert isinstance(base, CgroupV2)
    return CgroupV2(path.strip("/"), base.mount)


def _mount_of(path: Path) -> str:
    best = ""
    for point, fstype, _ in _mounts():
        if fstype == "cgroup" and str(path).startswith(point + "/") and len(point) > len(best):
            best = point
    return best
