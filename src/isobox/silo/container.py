"""A container's lifecycle, as the OCI runtime spec defines it, on disk under a state root.

::

    (nothing) ──create──▶ creating ──▶ created ──start──▶ running ──(exit)──▶ stopped
                              │                 │  ▲ pause/resume ▼          │
                              └──────────── delete (--force) ◀─── paused ◀───┘

The status is never trusted from the file alone: it is derived from the init's pid (checked
against its start time, so a reused pid is not mistaken for the container), the exec fifo
(present until ``start``) and the freezer. An illegal step raises :class:`IllegalState`.

``<root>/<id>/state.json`` (0600: it holds the process's environment) is written atomically
(temp file + rename) first thing in ``create`` — before anything is allocated — with the
cgroup it will use, so ``delete`` can release everything even when ``create`` was killed -9
halfway. The cgroup is made exclusively (a folder that exists already is refused) and its
folders' inodes are recorded right after: ``delete`` kills and removes only a cgroup this
container made, never one of another container that happens to have the same path.

Hooks: prestart, createRuntime, poststart and poststop run here, on the host, as the
runtime. createContainer and startContainer run inside the container init (``init.py``):
never as the runtime with only the container's mount namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from isobox._sys import linux as L
from isobox.errors import Conflict, InvalidArgument, IsoboxError, NotFound
from isobox.jobs.cgroup import (
    DEFAULT_DEVICE_RULES,
    Cgroup,
    cgroup_at,
    describe,
    from_description,
)
from isobox.silo.config import Hook, Process, SiloConfig
from isobox.silo.hooks import run_hook
from isobox.silo.init import spawn

__all__ = ["Container", "IllegalState", "State", "Status", "check_id", "parse_signal",
           "run_hook"]

STATE_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
OCI_VERSION = "1.2.0"


class Status(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class IllegalState(Conflict):
    """A lifecycle step that the container's current status does not allow."""


@dataclass
class State:
    id: str
    bundle: str
    pid: int = 0
    pid_start: int = 0
    created: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # The container's process as converted at create: exec's defaults, without parsing
    # config.json again (pydantic's models cost ~200 ms to load).
    process: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    # The container has its own user namespace (exec joins it and drops groups there).
    user_ns: bool = False
    # The cgroup's folders this container made, with their inodes (its owner token): a
    # cgroup that is not recorded here, or was replaced since, is never killed or removed.
    cgroup_owner: dict[str, int] = field(default_factory=dict)
    version: int = STATE_VERSION


def check_id(container_id: str) -> str:
    if not _ID_RE.match(container_id):
        raise InvalidArgument(f"invalid container id {container_id!r}")
    return container_id


def _start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: when the process started (ticks since boot)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(data[data.rindex(")") + 2 :].split()[19])


def _alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2]
    return state not in ("Z", "X") and _start_time(pid) == start


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError as exc:
        raise InvalidArgument(f"unknown signal {text!r}") from exc


class Container:
    def __init__(self, root: Path, state: State) -> None:
        self.root = root
        self.state = state
        self.dir = root / state.id

    # ---- persistence ---------------------------------------------------------------------

    @property
    def fifo(self) -> Path:
        return self.dir / "exec.fifo"

    def save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a killed save: O_EXCL below makes it anew, 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # The fields hold JSON data already (dicts, lists, scalars): no ``asdict``, which
        # deep-copies the process and its seccomp profile at each of the four saves.
        state = {f.name: getattr(self.state, f.name) for f in fields(self.state)}
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(state))
        os.replace(tmp, self.dir / "state.json")

    @classmethod
    def load(cls, root: Path, container_id: str) -> Container:
        check_id(container_id)
        path = root / container_id / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"container {container_id} does not exist") from exc
        except ValueError as exc:
            raise IsoboxError(f"container {container_id}: state file is damaged") from exc
        if data.get("version") != STATE_VERSION:
            raise IsoboxError(f"container {container_id}: state version {data.get('version')}")
        return cls(root, State(**data))

    @classmethod
    def all(cls, root: Path) -> list[Container]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(root)):
                with contextlib.suppress(IsoboxError):
                    out.append(cls.load(root, name))
        return out

    def base_process(self) -> Process:
        """The container's own process settings (exec starts from them)."""
        d = dict(self.state.process)
        d["rlimits"] = [tuple(r) for r in d.get("rlimits", [])]
        return Process(**d)

    @property
    def cgroup(self) -> Cgroup:
        return from_description(self.state.cgroup)

    # ---- status --------------------------------------------------------------------------

    def status(self) -> Status:
        s = self.state
        if s.pid == 0:
            return Status.CREATING
        if not _alive(s.pid, s.pid_start):
            return Status.STOPPED
        if self.fifo.exists() and not s.started:
            return Status.CREATED
        with contextlib.suppress(Exception):
            cg = self.cgroup
            frozen = _is_frozen(cg)
            if frozen:
                return Status.PAUSED
        return Status.RUNNING

    def oci_state(self) -> dict[str, Any]:
        status = self.status()
        return {
            "ociVersion": OCI_VERSION,
            "id": self.state.id,
            "status": str(status),
            "pid": self.state.pid if status not in (Status.STOPPED, Status.CREATING) else 0,
            "bundle": self.state.bundle,
            "annotations": self.state.annotations,
        }

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        container_id: str,
        bundle: Path,
        cfg: SiloConfig,
        *,
        console_socket: str | None = None,
        preserve_fds: int = 0,
        pid_file: Path | None = None,
    ) -> Container:
        check_id(container_id)
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        cdir = root / container_id
        try:
            cdir.mkdir(mode=0o711)
        except FileExistsError as exc:
            raise Conflict(f"container {container_id} exists already") from exc
        cg = cgroup_at(cfg.cgroups_path, container_id)
        state = State(
            id=container_id, bundle=str(bundle.absolute()),
            created=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            annotations=cfg.annotations, cgroup=describe(cg),
            hooks={k: [asdict(h) for h in v] for k, v in cfg.hooks.items()},
            process=_process_dict(cfg.process), user_ns=cfg.new_namespace("user"),
        )
        c = cls(root, state)
        c.save()  # first: whatever follows can be released by delete, even after a crash
        console = None
        try:
            # Never share a cgroup: an existing folder (another container's, maybe stopped
            # but not deleted, under another --root) is refused, and delete releases only
            # the folders recorded as made here.
            cg.exclusive = True
            try:
                cg.create()
            except Conflict:
                # An empty, old folder of that name is what a crashed runtime leaves
                # (killed between its mkdir and its delete): reclaim it, as delete would.
                if not cg.reclaim_stale():
                    raise
                cg.create()
            state.cgroup_owner = _cgroup_inodes(cg)
            c.save()
            cg.set_limits(cfg.limits, os.cpu_count() or 1)
            if not cg.set_devices(cfg.device_rules or list(DEFAULT_DEVICE_RULES)):
                # Device rules not enforceable here (cgroup v2 without an eBPF program):
                # the container may not make device nodes at all.
                mknod = ~(1 << L.CAP_NUMBER["CAP_MKNOD"])
                p = cfg.process
                p.bounding, p.effective, p.permitted = (
                    p.bounding & mknod, p.effective & mknod, p.permitted & mknod)
                p.inheritable, p.ambient = p.inheritable & mknod, p.ambient & mknod
            os.mkfifo(c.fifo, 0o600)
            if cfg.new_namespace("user"):
                # The init is root of its user namespace, i.e. the mapped host ids: the
                # fifo must be theirs for it to open (as runc does).
                os.chown(c.fifo, _host_id(cfg.uid_map, 0), _host_id(cfg.gid_map, 0))
            if console_socket:
                import socket

                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                console.connect(console_socket)

            def before_pivot(pid: int) -> dict[str, Any]:
                # The init has made its mounts and waits (not pivoted yet): record it, run
                # the runtime's hooks, and hand the init the state for its own hooks.
                state.pid, state.pid_start = pid, _start_time(pid)
                c.save()
                c._run_hooks("prestart")
                c._run_hooks("create_runtime")
                return c.oci_state()

            # If we die mid-create, the sync socket closes and stage 1 and the init exit;
            # what they left is in the cgroup recorded above, which delete releases.
            pid = spawn(cfg, join_cgroup=cg.add, exec_fifo=str(c.fifo),
                        console_socket=console, preserve_fds=preserve_fds,
                        before_pivot=before_pivot)
            if pid_file is not None:
                _atomic_write(pid_file, str(pid))
        except BaseException:
            with contextlib.suppress(Exception):
                c._destroy()
            if not _alive(state.pid, state.pid_start):
                c._remove_dir()  # nothing left to release: no state either
            raise
        finally:
            if console is not None:
                console.close()
        return c

    def start(self) -> None:
        status = self.status()
        if status != Status.CREATED:
            raise IllegalState(f"container {self.state.id} is {status}, not created")
        # startContainer hooks run in the init, as the container's process (init.py).
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ready, _, _ = select.select([fd], [], [], 10.0)
            if not ready or not os.read(fd, 1):
                raise IsoboxError(f"container {self.state.id}: init did not start")
        finally:
            os.close(fd)
        self.fifo.unlink(missing_ok=True)
        self.state.started = True
        self.save()
        self._run_hooks("poststart", fatal=False)

    def kill(self, sig: int, *, all_processes: bool = False) -> None:
        status = self.status()
        if status in (Status.STOPPED, Status.CREATING):
            raise IllegalState(f"container {self.state.id} is {status}: nothing to signal")
        if all_processes:
            for pid in self.cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            os.kill(self.state.pid, sig)

    def delete(self, *, force: bool = False) -> None:
        status = self.status()
        if status in (Status.RUNNING, Status.PAUSED) and not force:
            raise IllegalState(
                f"container {self.state.id} is {status}: stop it first or use --force"
            )
        self._destroy()
        self._run_hooks("poststop", fatal=False)
        self._remove_dir()

    def _remove_dir(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                os.unlink(self.dir / name)
            os.rmdir(self.dir)

    def owns_cgroup(self) -> bool:
        """The cgroup's folders are still the ones this container made (same inodes)."""
        owner = self.state.cgroup_owner
        if not owner:
            return False
        return _cgroup_inodes(self.cgroup, only=owner) == {
            d: ino for d, ino in owner.items() if os.path.isdir(d)}

    def _destroy(self) -> None:
        """Kill what is left, release the cgroup — only one this container made.
        Idempotent."""
        cg = self.cgroup
        if self.owns_cgroup() and cg.exists():
            with contextlib.suppress(Exception):
                cg.thaw()
            cg.kill_all()
            cg.remove()
        elif _alive(self.state.pid, self.state.pid_start):
            os.kill(self.state.pid, signal.SIGKILL)  # the init at least: it is ours
        with contextlib.suppress(Exception):
            cg.remove_parents()  # the engine's isobox/ parent, when no container is left
        self.fifo.unlink(missing_ok=True)

    def pause(self) -> None:
        if self.status() != Status.RUNNING:
            raise IllegalState(f"container {self.state.id} is {self.status()}, not running")
        self.cgroup.freeze()

    def resume(self) -> None:
        if self.status() != Status.PAUSED:
            raise IllegalState(f"container {self.state.id} is {self.status()}, not paused")
        self.cgroup.thaw()

    def pids(self) -> list[int]:
        return self.cgroup.pids() if self.owns_cgroup() and self.cgroup.exists() else []

    # ---- hooks ---------------------------------------------------------------------------

    def _run_hooks(self, kind: str, *, fatal: bool = True) -> None:
        """Run the runtime-side hooks of ``kind`` (never createContainer/startContainer:
        those run inside the init)."""
        assert kind not in ("create_container", "start_container"), kind
        for raw in self.state.hooks.get(kind, []):
            hook = Hook(**raw)
            try:
                run_hook(hook, json.dumps(self.oci_state()).encode())
            except IsoboxError:
                if fatal:
                    raise


def _process_dict(proc: Process) -> dict[str, Any]:
    """``asdict(proc)`` without its deep copy of the seccomp profile (~2 ms a create): the
    fields are scalars and lists of scalars (copied here), and the profile, which nothing
    changes, is shared."""
    out: dict[str, Any] = {}
    for f in fields(proc):
        value = getattr(proc, f.name)
        out[f.name] = [tuple(v) if isinstance(v, tuple) else v for v in value] \
            if isinstance(value, list) else value
    return out


def _cgroup_inodes(cg: Cgroup, only: dict[str, int] | None = None) -> dict[str, int]:
    """Inode of each of the cgroup's folders that exists (of those in ``only`` if given)."""
    out: dict[str, int] = {}
    for d in (list(only) if only is not None else cg.dirs()):
        with contextlib.suppress(OSError):
            out[d] = os.stat(d).st_ino
    return out


def _is_frozen(cg: Cgroup) -> bool:
    for d in cg.dirs():
        state = Path(d, "freezer.state")
        if state.exists():
            return state.read_text().strip() == "FROZEN"
        events = Path(d, "cgroup.events")
        if events.exists():
            return "frozen 1" in events.read_text()
    return False


def _host_id(mapping: list[tuple[int, int, int]], inside: int) -> int:
    for container_id, host_id, size in mapping:
        if container_id <= inside < container_id + size:
            return host_id + inside - container_id
    return inside


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
