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

The parents a top-level job's cgroup needs (``isobox/``, or ``$ISOBOX_CGROUP_PARENT``) are
made on demand and removed again when they are empty after a job's removal
(:meth:`Cgroup.remove_parents`); :meth:`Cgroup.create` retries when a parent vanishes under
it, so concurrent jobs do not race each other there. Every empty component of
``$ISOBOX_CGROUP_PARENT`` goes too (never the engine's own cgroup, never one with a process or
another cgroup in it): settings made by hand on an empty one are lost with it, so put host
settings on a cgroup that holds something, or above the hierarchy's mount.

On v1 a job is the *union* of its folders in every hierarchy: :meth:`Cgroup.pids` and
:meth:`Cgroup.kill_all` look at all of them, so a process that moved itself out of some
hierarchies (a root process can) is still listed and killed.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from isobox.errors import (
    Conflict,
    InvalidArgument,
    IsoboxError,
    NotFound,
    SystemError_,
    from_oserror,
)
from isobox.jobs.limits import IoLimit, Limits

CFS_PERIOD_US = 100_000  # the kernel's default period, used whenever it allows the rate
CFS_PERIOD_MAX_US = 1_000_000  # the longest period the kernel accepts
CFS_QUOTA_MIN_US = 1_000  # the smallest quota the kernel accepts
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


def cfs_quota_period(cpu_rate: int, ncpu: int) -> tuple[int, int]:
    """The CFS (quota, period) in microseconds for a CpuRate on ``ncpu`` CPUs.

    The default 100 ms period is kept when it allows the rate; a small rate gets a longer
    period (up to 1 s) so that its quota stays at or above the kernel's 1 ms minimum and
    the ratio is exact. Below what 1 ms per 1 s allows, the quota is 1 ms: the nearest rate
    that can be enforced, which :func:`enforced_cpu_rate` reports.
    """
    share = cpu_rate * ncpu  # in 1/10000 of one CPU
    period = CFS_PERIOD_US
    if share * period < CFS_QUOTA_MIN_US * 10000:
        period = min(CFS_PERIOD_MAX_US, -(-CFS_QUOTA_MIN_US * 10000 // share))
    quota = max(CFS_QUOTA_MIN_US, round(share * period / 10000))
    return quota, period


def enforced_cpu_rate(cpu_rate: int, ncpu: int) -> int:
    """The CpuRate the kernel really enforces for ``cpu_rate``: the same, or (for a rate
    below what the 1 ms minimum quota allows) the smallest one it can, rounded up."""
    quota, period = cfs_quota_period(cpu_rate, ncpu)
    real = quota * 10000 / (period * ncpu)
    if real <= cpu_rate * 1.001:
        return cpu_rate
    return math.ceil(real - 1e-9)


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


def prime_attach() -> bool:
    """Have the kernel's grace period for the next move into a cgroup start now.

    Every write to a ``cgroup.procs`` takes the global ``cgroup_threadgroup_rwsem`` for
    writing; when nobody took it for ~50 ms, that first waits for an RCU grace period
    (``rcu_sync_enter``: 5-20 ms on this host), and moves in the following ~50 ms do not.
    A process with time to spare (the monitors' zygote, right after it forked one) moves
    itself into its own cgroup — a move to where it is, which changes nothing — so that a
    container's move moments later finds the grace period passed, or under way. The
    target is checked to hold this process first: it is never moved anywhere else.
    Best effort: False when it did nothing."""
    try:
        with open("/proc/self/cgroup") as fh:
            own = [line.rstrip("\n").split(":", 2) for line in fh]
        mounts = _mounts()
        me = str(os.getpid())
        for _id, ctrls, path in own:
            for point, fstype, opts in mounts:
                if ctrls == "" and fstype != "cgroup2":
                    continue
                if ctrls and (fstype != "cgroup"
                              or not set(ctrls.split(",")) <= set(opts.split(","))):
                    continue
                procs = Path(point) / path.lstrip("/") / "cgroup.procs"
                if me not in _read(procs).split():
                    continue  # mounted elsewhere than its root: not our folder
                _write(procs, "0")
                return True
    except (OSError, ValueError, IsoboxError):
        pass
    return False


class Cgroup:
    """Interface of a job's cgroup; see CgroupV1 and CgroupV2."""

    version: int
    rel: str  # the job's path relative to each hierarchy's mount
    # create() refuses a folder that exists already (Conflict): a Job sets it, so two
    # owners can never share one cgroup (mkdir decides, no exists() check before it).
    exclusive: bool = False

    def create(self) -> None:
        """Make the cgroup (and missing parents); see :attr:`exclusive`."""
        raise NotImplementedError

    def child(self, name: str) -> Cgroup: raise NotImplementedError
    def add(self, pid: int) -> None: raise NotImplementedError

    def move_in(self, pid: int) -> None:
        """Move a *running* process in so that no child it forks meanwhile is left half in
        (v1: see :meth:`CgroupV1.move_in`)."""
        self.add(pid)

    def pids(self) -> list[int]: raise NotImplementedError

    def own_pids(self) -> list[int]:
        """The processes of this cgroup itself, not of nested ones (one cheap read)."""
        raise NotImplementedError

    def proc_keys(self) -> list[tuple[str, str]]:
        """(controller, path) pairs that name this cgroup in ``/proc/PID/cgroup`` (the
        controller is ``""`` on v2)."""
        raise NotImplementedError

    def remove_parents(self) -> None:
        """Remove the parents made for top-level jobs when they are empty (best effort)."""

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

    def reclaim_stale(self, min_age: float = 5.0) -> bool:
        """Remove this cgroup if it is a leftover: it exists, no process is in it or below
        it, and it was made more than ``min_age`` seconds ago (so not by an owner that is
        between its mkdir and its first process). True if it was removed. What a crashed
        runtime leaves is reclaimed this way by the next create of the same name; a busy
        or young cgroup is left alone (rmdir of a folder with a task fails anyway)."""
        if not self.exists() or self.pids():
            return False
        ages = []
        for d in self.dirs():
            with contextlib.suppress(FileNotFoundError):
                ages.append(os.stat(d).st_mtime)
        if not ages:
            return False
        made = max(ages)
        if time.time() - made < min_age:
            return False
        try:
            self.remove()
        except IsoboxError:
            return False
        return not self.exists()

    def _sigkill_members(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _wait_empty(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(f"job {self.rel}: processes still running after kill")
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)


class _Vanished(Exception):
    """A parent folder was removed (by another job's clean-up) while we were creating."""


# A folder removed under us: gone (ENOENT), or still visible but offline (ENODEV: mkdir in
# it, or a write to a file opened just before the rmdir).
_GONE = (errno.ENOENT, errno.ENODEV)


def _tree(top: Path) -> list[Path]:
    """``top`` and every folder below it, deepest first."""
    if not top.is_dir():
        return []
    found = [Path(d) for d, _dirs, _files in os.walk(top)]
    return sorted(found, key=lambda p: -len(p.parts))


def _procs_of(dirpath: Path) -> list[int]:
    return [int(x) for x in _read(dirpath / "cgroup.procs").split()]


def _prune(path: Path, stop: Path) -> None:
    """rmdir ``path``'s ancestors below ``stop`` while they are empty (stop at the first busy
    one: it has another job or a process in it)."""
    cur = path.parent
    while cur != stop and stop in cur.parents:
        try:
            os.rmdir(cur)
        except FileNotFoundError:
            pass
        except OSError:
            return  # EBUSY/ENOTEMPTY: in use; anything else: not ours to force
        cur = cur.parent


def _proc_state(pid: int) -> str | None:
    """The state letter of every thread of ``pid`` (None: no such process)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    states = ""
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                states += fh.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return states


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

    def __init__(
        self, paths: dict[str, Path], rel: str, *, stop: dict[str, Path] | None = None,
        mounts: dict[str, Path] | None = None,
    ) -> None:
        self.paths = paths  # controller -> this job's folder in that hierarchy
        self.rel = rel.strip("/")
        # controller -> the folder whose descendants remove_parents() may remove (the
        # engine's own cgroup, or the mount); None: this cgroup's parents are not ours.
        self.stop = stop
        self._mounts = mounts
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
        stop: dict[str, Path] = {}
        for ctrl, point in mounts.items():
            # Under the engine's own cgroup of each controller, so host limits still hold.
            own = _own(ctrl).strip("/")
            base = parent if parent is not None else own + "/isobox"
            paths[ctrl] = Path(point) / base.strip("/") / name
            stop[ctrl] = Path(point) if parent is not None else Path(point) / own
        return CgroupV1(paths, f"isobox/{name}", stop=stop,
                        mounts={c: Path(p) for c, p in mounts.items()})

    @staticmethod
    def from_paths(paths: dict[str, str], rel: str,
                   stop: dict[str, str] | None = None) -> CgroupV1:
        return CgroupV1({c: Path(p) for c, p in paths.items()}, rel,
                        stop={c: Path(p) for c, p in stop.items()} if stop else None)

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
        return CgroupV1({c: p / name for c, p in self.paths.items()}, f"{self.rel}/{name}",
                        mounts=self._mounts)

    def exists(self) -> bool:
        return any(p.is_dir() for p in self._paths().values())

    def create(self) -> None:
        exclusive = self.exclusive
        made: list[Path] = []  # this job's own folders made here (undone on a conflict)
        # One folder per hierarchy: co-mounted controllers (cpu,cpuacct) share theirs.
        hierarchies: dict[Path, set[str]] = {}
        for ctrl, path in self.paths.items():
            hierarchies.setdefault(path, set()).add(ctrl)
        try:
            for path, ctrls in hierarchies.items():
                if self._create_one(path, exclusive, cpuset="cpuset" in ctrls):
                    made.append(path)
        except BaseException:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        if "memory" in self.paths:
            with contextlib.suppress(InvalidArgument):
                _write(self._p("memory", "memory.use_hierarchy"), "1")

    def _create_one(self, path: Path, exclusive: bool, *, cpuset: bool) -> bool:
        """Make ``path`` and its missing parents; True if ``path`` itself was made here."""
        for _ in range(50):
            missing: list[Path] = []
            cur = path
            while not cur.is_dir() and cur != cur.parent:
                missing.append(cur)
                cur = cur.parent
            if not missing:
                if exclusive:
                    raise Conflict(f"a job named {self.rel.rsplit('/', 1)[-1]!r} exists "
                                   f"already ({path})")
                return False
            try:
                for d in reversed(missing):
                    try:
                        d.mkdir()
                    except FileExistsError:
                        if d == path and exclusive:
                            raise Conflict(f"a job named {self.rel.rsplit('/', 1)[-1]!r} "
                                           f"exists already ({path})") from None
                        continue
                    except OSError as exc:
                        if exc.errno in _GONE:
                            raise _Vanished from None
                        raise from_oserror("mkdir", str(d), exc) from exc
                    if cpuset:
                        self._inherit_cpuset(d)
                return True
            except _Vanished:
                continue  # a parent was removed by another job's clean-up: again
        raise CgroupError(f"creating {path}: its parent keeps disappearing")

    @staticmethod
    def _inherit_cpuset(d: Path) -> None:
        """A new v1 cpuset is empty: give it its parent's CPUs and memory nodes. A parent
        another owner has just made may still be empty itself, and v1 refuses a child's
        set that is not within its parent's (EACCES): fill such ancestors first, top down,
        with the nearest set value (the one their own creator is about to write)."""
        try:
            for f in ("cpuset.cpus", "cpuset.mems"):
                empty: list[Path] = [d]
                value = ""
                for anc in d.parents:
                    if not (anc / f).exists():
                        break
                    value = _read(anc / f).strip()
                    if value:
                        break
                    empty.append(anc)
                for target in reversed(empty):
                    if target is d or not _read(target / f).strip():
                        _write(target / f, value or "0")
        except SystemError_ as exc:
            if exc.errno in _GONE:
                raise _Vanished from exc
            raise

    def add(self, pid: int) -> None:
        for path in self._paths().values():
            try:
                _write(path / "cgroup.procs", str(pid))
            except InvalidArgument as exc:
                if not Path(f"/proc/{pid}").exists():
                    raise NotFound(f"process {pid} does not exist") from exc
                raise

    def move_in(self, pid: int) -> None:
        """Move a running process into every hierarchy, as one step for its children.

        Each write to a hierarchy's ``cgroup.procs`` is atomic, the series is not: a child
        forked between two writes would be born half in the job. So the process is stopped
        (SIGSTOP, and we wait until every thread is stopped) for the moves and continued
        after — unless it was stopped already, then it is left stopped. Its parent may see
        the stop and the continue (SIGCHLD, ``WUNTRACED``), and a few system calls return
        EINTR after a stop (signal(7)). The engine cannot stop itself: its own pid is moved
        without the stop.
        """
        if len(self._paths()) == 1 or pid == os.getpid():
            self.add(pid)
            return
        state = _proc_state(pid)
        if state is None:
            raise NotFound(f"process {pid} does not exist")
        stopped_already = bool(state) and all(c in "TtZX" for c in state)
        if not stopped_already:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError as exc:
                raise NotFound(f"process {pid} does not exist") from exc
        try:
            deadline = time.monotonic() + 2.0
            while not stopped_already and time.monotonic() < deadline:
                state = _proc_state(pid)
                if not state or all(c in "TtZX" for c in state):
                    break
                time.sleep(0.0005)
            self.add(pid)
        finally:
            if not stopped_already:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def pids(self) -> list[int]:
        """Every process in this job and its nested jobs, in *any* of its hierarchies."""
        seen: dict[int, None] = {}
        for top in self._paths().values():
            for dirpath in _tree(top):
                for pid in _procs_of(dirpath):
                    seen[pid] = None
        return list(seen)

    def own_pids(self) -> list[int]:
        return _procs_of(self.paths["pids" if "pids" in self.paths else "freezer"])

    def _mount(self, ctrl: str) -> Path | None:
        if self._mounts is None:
            self._mounts = {}
            for c, p in self.paths.items():
                point = _mount_of(p)
                if point:
                    self._mounts[c] = Path(point)
        return self._mounts.get(ctrl)

    def proc_keys(self) -> list[tuple[str, str]]:
        keys: list[tuple[str, str]] = []
        for ctrl, path in self.paths.items():
            mount = self._mount(ctrl)
            if mount is not None and mount in path.parents:
                keys.append((ctrl, "/" + str(path.relative_to(mount))))
        return keys

    def set_limits(self, limits: Limits, ncpu: int) -> None:
        if limits.cpu_rate is not None:
            # The kernel checks quota/period against the parent's and the children's at
            # each write. Quota and period are both monotone in the rate (a lower rate: a
            # longer period, a smaller quota), so the ratio between the two writes lies
            # between the old and the new one: the order of Job.update() keeps it valid.
            quota, period = cfs_quota_period(limits.cpu_rate, ncpu)
            _write(self._p("cpu", "cpu.cfs_period_us"), str(period))
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
        total = _read(self._p("cpuacct", "cpuacct.usage")).strip()
        user = _read(self._p("cpuacct", "cpuacct.usage_user")).strip()
        if total and user:
            # usage is exact; the user/system split is sampled at timer ticks, so a job that
            # used a few milliseconds may show 0 + 0. Split the exact total in the sampled
            # ratio (all of it as user time when no tick hit: the kernel's cputime_adjust).
            u = int(user)
            k = int(_read(self._p("cpuacct", "cpuacct.usage_sys")).strip() or 0)
            c.cpu_user_ns = int(total) * u // (u + k) if u + k else int(total)
            c.cpu_kernel_ns = int(total) - c.cpu_user_ns
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

    def _thaw_tree(self) -> None:
        """Thaw every nested freezer folder, deepest first, then this one: a v1 child that
        was frozen itself stays frozen when only its parent is thawed."""
        if "freezer" not in self.paths:
            return
        for d in _tree(self.paths["freezer"]):
            with contextlib.suppress(IsoboxError):
                _write(d / "freezer.state", "THAWED")

    def kill_all(self) -> None:
        # Frozen, no process can fork between listing and killing; SIGKILL is delivered
        # when they thaw. Then wait until the cgroup is empty (re-killing stragglers, in
        # every hierarchy: a process that left the freezer one is killed too).
        if not self.exists():
            return
        with contextlib.suppress(IsoboxError):  # a task stuck in D state: kill anyway
            if "freezer" in self.paths:
                self.freeze()
        try:
            self._sigkill_members()
        finally:
            self._thaw_tree()
        self._wait_empty()

    def remove(self) -> None:
        for fd in self._eventfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._eventfds.clear()
        for path in self._paths().values():
            for d in _tree(path):  # folders a process of the job made, then the job's
                _rmdir(d)

    def remove_parents(self) -> None:
        if self.stop is None:
            return
        for ctrl, path in self.paths.items():
            stop = self.stop.get(ctrl)
            if stop is not None:
                _prune(path, stop)

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

    def __init__(self, rel: str, mount: str, *, prune: bool = False) -> None:
        self.rel = rel.strip("/")
        self.mount = mount
        self.prune = prune  # remove_parents() may remove this cgroup's empty parents

    @staticmethod
    def root(name: str) -> CgroupV2:
        mount = _v2_mount()
        if mount is None:
            raise NotFound("no cgroup v2 hierarchy is mounted")
        parent = os.environ.get("ISOBOX_CGROUP_PARENT", "isobox").strip("/")
        return CgroupV2(f"{parent}/{name}", mount, prune=True)

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
        for _ in range(50):
            try:
                self._create_once(self.exclusive)
                return
            except _Vanished:
                continue  # a parent was removed by another job's clean-up: again
        raise CgroupError(f"creating {self.path}: its parent keeps disappearing")

    def _create_once(self, exclusive: bool) -> None:
        cur = Path(self.mount)
        parts = Path(self.rel).parts
        for i, part in enumerate(parts):
            try:
                self._enable_below(cur)
            except SystemError_ as exc:
                if exc.errno in _GONE:
                    raise _Vanished from exc
                raise
            cur = cur / part
            try:
                cur.mkdir()
            except FileExistsError:
                if exclusive and i == len(parts) - 1:
                    raise Conflict(f"a job named {part!r} exists already ({cur})") from None
            except OSError as exc:
                if exc.errno in _GONE:
                    raise _Vanished from None
                raise from_oserror("mkdir", str(cur), exc) from exc
        try:
            self._enable_below(self.path)
            self.leaf.mkdir(exist_ok=True)
        except BaseException as exc:
            if exclusive:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
            if isinstance(exc, OSError):
                raise from_oserror("mkdir", str(self.leaf), exc) from exc
            raise

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

    def own_pids(self) -> list[int]:
        return _procs_of(self.leaf)

    def proc_keys(self) -> list[tuple[str, str]]:
        return [("", f"/{self.rel}/procs"), ("", f"/{self.rel}")]

    def _need(self, ctrl: str, what: str) -> None:
        if ctrl not in self.available():
            raise InvalidArgument(
                f"{what}: the cgroup v2 '{ctrl}' controller is not enabled for {self.path}"
            )

    def set_limits(self, limits: Limits, ncpu: int) -> None:
        if limits.cpu_rate is not None:
            self._need("cpu", "cpu_rate")
            quota, period = cfs_quota_period(limits.cpu_rate, ncpu)
            _write(self.path / "cpu.max", f"{quota} {period}")
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
        # v2's memory.events and pids.events count the events of every descendant too:
        # a nested job's OOM kill would reach its parent twice (its own counter, and the
        # child's event, which every job passes to its ancestors). The ``.local`` files
        # (Linux 5.2 and 6.13) count this cgroup's own: the limit set on the job folder,
        # the OOM kills of its processes (in ``procs``).
        c.memory_limit_hits, c.oom_kills = 0, 0
        for d in (self.path, self.leaf):
            local = d / "memory.events.local"
            mev = _kv(_read(local if local.exists() else d / "memory.events"))
            c.memory_limit_hits += mev.get("max", 0)
            c.oom_kills += mev.get("oom_kill", 0)
            if not local.exists():
                break  # no .local: the job folder's hierarchical counters hold them all
        c.pids_limit_hits = sum(_kv(_read(f)).get("max", 0) for f in self._pids_events())
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

    def _events_file(self, ctrl: str) -> Path:
        local = self.path / f"{ctrl}.events.local"
        return local if local.exists() else self.path / f"{ctrl}.events"

    def _pids_events(self) -> list[Path]:
        """Where a refused fork of this job is counted. Since Linux 6.13 in the cgroup whose
        ``pids.max`` was hit (the job folder's ``pids.events.local``); before, in the
        ``pids.events`` of the cgroup of the task that tried to fork -- the job's
        ``procs`` leaf, and never in the job folder (the limit's), which has no tasks.
        A nested job's refusals are its own and reach this job through its events."""
        local = self.path / "pids.events.local"
        if local.exists():
            return [local]
        return [self.path / "pids.events", self.leaf / "pids.events"]

    def kill_all(self) -> None:
        if not self.exists():
            return
        if (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1")  # the kernel kills forks in flight too
        else:
            self.freeze()
            try:
                self._sigkill_members()
            finally:
                self.thaw()
        self._wait_empty()

    def remove(self) -> None:
        for d in _tree(self.path):  # procs, folders a process of the job made, the job's
            _rmdir(d)

    def remove_parents(self) -> None:
        if self.prune:
            _prune(self.path, Path(self.mount))

    def watches(self) -> Watches:
        files = [*self._pids_events(), self._events_file("memory")]
        if (self.leaf / "memory.events.local").exists():
            files.append(self.leaf / "memory.events.local")
        return Watches(files=[str(f) for f in files if f.exists()])


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
        out: dict[str, object] = {
            "version": 1, "rel": cg.rel, "paths": {c: str(p) for c, p in cg.paths.items()}}
        if cg.stop is not None:
            out["stop"] = {c: str(p) for c, p in cg.stop.items()}
        return out
    assert isinstance(cg, CgroupV2)
    return {"version": 2, "rel": cg.rel, "mount": cg.mount, "prune": cg.prune}


def from_description(desc: dict[str, object]) -> Cgroup:
    rel = str(desc["rel"])
    if desc.get("version") == 1:
        paths, stop = desc["paths"], desc.get("stop")
        assert isinstance(paths, dict)
        return CgroupV1.from_paths(
            {str(k): str(v) for k, v in paths.items()}, rel,
            {str(k): str(v) for k, v in stop.items()} if isinstance(stop, dict) else None)
    return CgroupV2(rel, str(desc["mount"]), prune=bool(desc.get("prune", False)))


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
