"""The compute service: the engine core behind ``isoboxd`` (the seeds' Host Compute Service).

One :class:`ComputeService` owns the ``compute`` tables of the state database, the
container lifecycle (:mod:`isobox.compute.lifecycle`), the event bus, and one *watcher*
thread per running container, which follows the container's monitor (``subscribe``) and
records the exit. The monitors themselves are separate processes made by the spawner's
zygote: they outlive the daemon, and :meth:`open` adopts them again.

Every resource a container gets is first written to its release list (the ``allocations``
table), then made. :meth:`remove` and crash recovery free the list newest first, with
idempotent release functions, so a daemon killed at any instruction leaves nothing that
the next :meth:`open` does not find and free.

Concurrency: the API is a threaded HTTP server, so every method may run in many threads.
Writes are SQLite immediate transactions; steps that change one container's resources
(start, pause, remove, cp into a stopped one) hold that container's lock; nothing holds a
lock while it waits for a process to exit, except ``remove``, which holds only its own
container's lock (the watcher records an exit without it). Waiting is a condition variable
notified on every state change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import signal as signal_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from isobox import __version__
from isobox.compute import lifecycle, network_glue
from isobox.compute.db import Allocation, ComputeDB, ContainerRow
from isobox.compute.events import EventBus, Filters, format_time, now_ns
from isobox.compute.lifecycle import ACTIVE
from isobox.errors import (
    Conflict,
    InvalidArgument,
    IsoboxError,
    IsolationUnavailable,
    NotFound,
    WaitTimeout,
    from_oserror,
)
from isobox.paths import root_dir, run_dir
from isobox.spec.compute import ComputeSystem, ExecSpec, dump_document, parse_document
from isobox.spec.wire import (
    API_VERSION,
    ComputeSystemInfo,
    CreateResult,
    DaemonInfo,
    Event,
    LogEntry,
    ProcessList,
    StatsSample,
    WaitResult,
)

if TYPE_CHECKING:
    import socket

    from isobox.compute.images import ImageService
    from isobox.compute.monitor_client import MonitorClient
    from isobox.compute.spawner import Spawner
    from isobox.network.service import NetworkService
    from isobox.spec.image import ImageConfig
    from isobox.storage.store import ImageStore, Mounts

log = logging.getLogger(__name__)

#: Isolations a container can run under (``vm`` when :func:`vm_unavailable` says so).
RUNNABLE = ("process", "host", "vm")
#: Kinds of allocation that belong to one run (released when it ends), newest first.
RUNTIME_KINDS = ("monitor", "uvm", "mount", "cgroup", "rundir", network_glue.ENDPOINT_KIND)


def vm_unavailable() -> str | None:
    """Why vm isolation cannot run here (no QEMU, no utility-VM assets), or None. Cheap:
    it never builds the assets nor boots anything."""
    from isobox.errors import ToolMissing
    from isobox.uvm.accel import qemu_binary
    from isobox.uvm.assets import load_assets

    try:
        qemu_binary()
    except ToolMissing as exc:
        return f"vm isolation: {exc}"
    if load_assets() is None:
        return "vm isolation: the utility-VM assets are not built (run `isobox uvm build`)"
    return None


def _check_vm(doc: ComputeSystem) -> None:
    why = vm_unavailable()
    if why is not None:
        raise IsolationUnavailable(why)
    mode = doc.network.mode
    if mode == "host" or mode.startswith(network_glue.CONTAINER_PREFIX):
        raise IsolationUnavailable(
            f"network.mode {mode!r}: a utility VM has a network of its own (a tap on a "
            "network's bridge) or none; pass --network none or a network")
    if doc.network.rate is not None:
        raise IsolationUnavailable("network.rate: not supported under vm isolation yet")


def _kill_uvm(data: dict[str, Any]) -> None:
    """Release of a run's utility VM (kind ``uvm``): normally its monitor ended it; after a
    crash its QEMU (own session, outlives the monitor) is found by its pid file and the
    VM's name on its command line, killed, and its run folder removed."""
    folder = Path(str(data["dir"]))
    try:
        pid = int((folder / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid > 0:
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if f"isobox-{data['vm']}".encode() in cmd:
                os.kill(pid, signal_mod.SIGKILL)
                _wait_gone(pid, None, 10.0)
    shutil.rmtree(folder, ignore_errors=True)
#: Exit code recorded when a container's monitor vanished without writing status.json.
LOST_EXIT = 255
_FINISHED_KEPT = 1024


def _starttime(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks since boot): with the pid it names one
    process for good, so a recycled pid is never mistaken for our monitor."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    if pid <= 0:
        return False
    now = _starttime(pid)
    if now is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        if data[data.rindex(b")") + 2:][:1] == b"Z":
            return False  # a zombie has ended; only its parent's wait is missing
    except (OSError, ValueError):
        return False
    return start is None or now == start


def _wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    """Until the process ``pid`` (started at ``start``) is gone; False on timeout.

    Woken by a pidfd the moment it exits (no polling interval added to every removal);
    polled where pidfds are not available."""
    if not _alive(pid, start):
        return True
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            # Checked after the open: the descriptor names our process, not a successor.
            if not _alive(pid, start):
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(0.0, timeout) * 1000)
        finally:
            os.close(fd)
        return not _alive(pid, start)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while _alive(pid, start):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as fh:
            return any(line.split()[4] == path for line in fh)
    except OSError:
        return False


def _unmount(path: str) -> None:
    from isobox._sys import linux

    for _ in range(100):
        if not _mounted(path):
            return
        try:
            linux.umount2(path, linux.MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (22, 2):  # EINVAL (not a mount any more), ENOENT
                raise
    if _mounted(path):
        raise IsoboxError(f"cannot unmount {path}")


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise from_oserror("remove", str(path), exc) from exc


def parse_signal(sig: int | str) -> int:
    """``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"`` → 9; anything else is InvalidArgument."""
    if isinstance(sig, int) or (isinstance(sig, str) and sig.isdigit()):
        num = int(sig)
        if not 0 < num < signal_mod.NSIG:
            raise InvalidArgument(f"invalid signal number {num}")
        return num
    name = sig.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal_mod.Signals[name])
    except KeyError as exc:
        raise InvalidArgument(f"unknown signal {sig!r}") from exc


_ADJECTIVES = (
    "agile", "bold", "brave", "calm", "clever", "eager", "fair", "gentle", "happy", "keen",
    "lucid", "merry", "nimble", "proud", "quiet", "sharp", "steady", "swift", "tidy", "witty",
)
_NAMES = (
    "babbage", "curie", "dijkstra", "euler", "fermat", "gauss", "hopper", "knuth", "lamport",
    "liskov", "lovelace", "noether", "pascal", "ritchie", "shannon", "thompson", "turing",
    "wirth", "hamilton", "torvalds",
)


def generate_name() -> str:
    """A docker-like ``adjective_scientist`` name with a short random suffix."""
    return (f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}_"
            f"{secrets.token_hex(2)}")


class ComputeService:
    """Compute systems behind one interface (see ``docs/compute-service.md``)."""

    def __init__(self, root: Path | None = None, run: Path | None = None) -> None:
        self.root = root or root_dir()
        self.run = run or run_dir()
        self._spawner: Spawner | None = None
        self._store: ImageStore | None = None
        self._db: ComputeDB | None = None
        self._bus: EventBus | None = None
        self._images: ImageService | None = None
        self._networks: NetworkService | None = None
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._changed = threading.Condition()
        self._finished: OrderedDict[str, WaitResult] = OrderedDict()
        self._watchers: dict[str, threading.Thread] = {}
        # cid -> set once the resources of its last run are released (see _finish).
        self._settling: dict[str, threading.Event] = {}
        self._closing = False

    # ---- set-up ------------------------------------------------------------------------

    def open(self, *, monitors: bool = True) -> None:
        """Spawner first (a fork must happen before any thread exists), then the state
        database, crash recovery, and a watcher for every container still running.

        ``monitors=False`` opens without a spawner (tests of the state alone; tools that
        only read)."""
        if monitors:
            from isobox.compute.spawner import Spawner

            self._spawner = Spawner()
        from isobox.storage.store import ImageStore

        for d in (self.root / "containers", self.run / "containers"):
            d.mkdir(parents=True, exist_ok=True)
        self._store = ImageStore(self.root)
        self._db = ComputeDB(self.root / "state.db")
        self._bus = EventBus(self._db)
        from isobox.network.service import NetworkService

        self._networks = NetworkService(self.root / "state.db", self.run)
        self._recover()
        self._recover_network()

    def close(self) -> None:
        """Stop serving; running containers keep running (their monitors outlive us)."""
        self._closing = True
        with self._changed:
            self._changed.notify_all()
        if self._bus is not None:
            self._bus.close()
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None
        # Watchers check _closing before they write; one caught mid-write logs an error.
        if self._db is not None:
            self._db.close()
        if self._networks is not None:
            self._networks.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> ComputeService:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> ComputeDB:
        if self._db is None:
            raise IsoboxError("the compute service is not open")
        return self._db

    @property
    def store(self) -> ImageStore:
        if self._store is None:
            raise IsoboxError("the compute service is not open")
        return self._store

    @property
    def bus(self) -> EventBus:
        if self._bus is None:
            raise IsoboxError("the compute service is not open")
        return self._bus

    @property
    def networks(self) -> NetworkService:
        """The Host Networking Service (``isobox.network``): networks, endpoints, IPAM."""
        if self._networks is None:
            raise IsoboxError("the compute service is not open")
        return self._networks

    @property
    def images(self) -> ImageService:
        if self._images is None:
            from isobox.compute.images import ImageService

            self._images = ImageService(self.store)
        return self._images

    # ---- paths -------------------------------------------------------------------------

    def container_dir(self, cid: str) -> Path:
        return self.root / "containers" / cid

    def run_dir(self, cid: str) -> Path:
        return self.run / "containers" / cid

    def socket_path(self, cid: str) -> Path:
        return self.run_dir(cid) / "monitor.sock"

    # ---- locks -------------------------------------------------------------------------

    def _lock_of(self, cid: str) -> threading.RLock:
        with self._guard:
            lock = self._locks.get(cid)
            if lock is None:
                lock = self._locks[cid] = threading.RLock()
            return lock

    @contextmanager
    def _locked(self, ref: str) -> Iterator[ContainerRow]:
        """The container's lock, and its row as it is once the lock is held."""
        row = self.db.resolve(ref)
        with self._lock_of(row.id):
            current = self.db.get(row.id)
            if current is None:
                raise NotFound(f"no such container: {ref}")
            yield current

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _emit(self, row: ContainerRow | None, action: str, cid: str = "", name: str = "",
              extra: Mapping[str, str] | None = None) -> None:
        attrs: dict[str, str] = {}
        if row is not None:
            cid, name = row.id, row.name
            attrs["image"] = row.image
            attrs["name"] = row.name
            attrs.update(row.document.get("labels") or {})
        attrs.update(extra or {})
        try:
            self.bus.publish("container", action, cid, name, attrs)
        except IsoboxError as exc:  # the event history is best effort, never a failed call
            log.warning("event %s of %s not recorded: %s", action, cid, exc)

    # ---- the release list --------------------------------------------------------------

    def _release_one(self, cid: str, a: Allocation) -> None:
        """Free one allocation. Each branch is idempotent: freeing what was never made, or
        was freed already, does nothing."""
        d = a.data
        if a.kind == "dir":
            _rmtree(Path(d["path"]))
        elif a.kind == "scratch":
            self.store.release_scratch(cid)
        elif a.kind == "plan":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d["path"])
        elif a.kind == "mount":
            _unmount(str(d["path"]))
            with contextlib.suppress(OSError):
                if d.get("remove"):
                    os.rmdir(d["path"])
        elif a.kind == "monitor":
            pid = int(d.get("pid") or 0)
            start = d.get("start")
            if pid and not _wait_gone(pid, start, 10.0):
                with contextlib.suppress(ProcessLookupError):
                    if _alive(pid, start):
                        os.kill(pid, signal_mod.SIGKILL)
                _wait_gone(pid, start, 10.0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d["socket"])
        elif a.kind == "cgroup":
            _kill_cgroup(str(d["name"]))
        elif a.kind == "uvm":
            _kill_uvm(d)
        elif a.kind == "rundir":
            _rmtree(Path(d["path"]))
        elif a.kind == network_glue.ENDPOINT_KIND:
            network_glue.release(self.networks, cid)
        else:
            log.warning("container %s: unknown allocation kind %r left alone", cid, a.kind)

    def _release(self, cid: str, kinds: Sequence[str] | None = None) -> None:
        """Free the release list (or its ``kinds``) newest first; a failure is raised after
        every other allocation had its turn, and its record stays for the next try."""
        first: BaseException | None = None
        for a in self.db.allocations(cid, kinds):
            try:
                self._release_one(cid, a)
            except Exception as exc:  # go on; the first failure is raised after
                log.warning("container %s: release %s %s: %s", cid, a.kind, a.data, exc)
                first = first or exc
                continue
            self.db.forget(a.seq)
        if first is not None:
            raise first

    # ---- create ------------------------------------------------------------------------

    def create(self, doc: ComputeSystem) -> CreateResult:
        """Make a container from its document: a row, a folder, a scratch layer, a plan.

        Nothing runs yet. On any failure everything made is released and the row deleted.
        """
        if doc.isolation == "vm":
            _check_vm(doc)
        network_glue.check(doc, doc.isolation)
        image = self.store.get(doc.image)
        config_bytes = self.store.blobs.read_bytes(image.config_digest)
        cid = doc.id or secrets.token_hex(32)
        created = format_time(now_ns())
        for attempt in range(50):
            name = doc.name or generate_name()
            document = dump_document(doc.model_copy(update={"id": cid, "name": name}))
            row = ContainerRow(
                id=cid, name=name, image=doc.image, image_digest=image.digest,
                image_id=image.config_digest, isolation=doc.isolation, state="creating",
                pid=0, exit_code=None, signal=None, error=None, created_at=created,
                started_at=None, finished_at=None, document=document,
            )
            try:
                self.db.insert(row)
                break
            except Conflict:
                if doc.name or attempt == 49 or self.db.get(cid) is not None:
                    raise
        with self._lock_of(cid):
            try:
                self._allocate(row, config_bytes)
            except BaseException:
                try:
                    self._release(cid)
                except Exception:  # the first error is the one to report; this is logged
                    log.exception("container %s: rollback of create", cid)
                finally:
                    self.db.delete(cid)
                raise
        self._emit(row, "create")
        return CreateResult(id=cid, name=name, warnings=[])

    def _allocate(self, row: ContainerRow, config_bytes: bytes) -> None:
        from isobox.compute.plan import build_plan, write_plan
        from isobox.spec.image import ImageConfig

        cid = row.id
        cdir = self.container_dir(cid)
        self.db.record(cid, "dir", {"path": str(cdir)})
        try:
            cdir.mkdir(mode=0o711)
            (cdir / "image-config.json").write_bytes(config_bytes)
        except OSError as exc:
            raise from_oserror("create container folder", str(cdir), exc) from exc
        seq = self.db.record(cid, "scratch", {"image": row.image_digest})
        mounts = self.store.prepare_scratch(cid, row.image_digest)
        self.db.amend(seq, {"image": row.image_digest, "lower": [str(p) for p in mounts.lower],
                            "upper": str(mounts.upper), "work": str(mounts.work)})
        plan_path = cdir / "plan.json"
        self.db.record(cid, "plan", {"path": str(plan_path)})
        doc = parse_document(row.document)
        plan = build_plan(doc, ImageConfig.model_validate_json(config_bytes), mounts,
                          container_id=cid, name=row.name, isolation=row.isolation,
                          container_dir=cdir, run_dir=self.run_dir(cid))
        write_plan(plan, plan_path)
        if not self.db.update(cid, when=["creating"], state="created"):
            raise Conflict(f"container {row.name}: no longer creating")

    def _mounts(self, cid: str) -> Mounts:
        from isobox.storage.store import Mounts

        for a in self.db.allocations(cid, ["scratch"]):
            if "upper" in a.data:
                return Mounts([Path(p) for p in a.data["lower"]], Path(a.data["upper"]),
                              Path(a.data["work"]))
        raise IsoboxError(f"container {cid}: its scratch layer is not recorded")

    def _image_config(self, cid: str) -> ImageConfig:
        from isobox.spec.image import ImageConfig

        path = self.container_dir(cid) / "image-config.json"
        try:
            return ImageConfig.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise from_oserror("read", str(path), exc) from exc

    # ---- start -------------------------------------------------------------------------

    def start(self, ref: str, *, isolation: str | None = None,
              attach: socket.socket | None = None, stdin: bool = False) -> None:
        """Run the container under its isolation (or ``isolation``, which is stored).

        With ``attach``, that socket is handed to the monitor as the container's stream
        before the process runs, so not one byte of output is missed."""
        from isobox.compute.plan import build_plan, write_plan

        with self._locked(ref) as row:
            cid = row.id
            lifecycle.check("start", row.state, row.name)
            if not self._settle(cid):
                raise Conflict(f"container {row.name}: its last run is still being released")
            iso = isolation or row.isolation
            if iso not in RUNNABLE:
                raise InvalidArgument(f"unknown isolation {iso!r} (process, host, vm)")
            doc = parse_document(row.document)
            if doc.isolation != iso:
                doc = doc.model_copy(update={"isolation": iso})
            if iso == "vm":
                _check_vm(doc)
            cdir = self.container_dir(cid)
            rdir = self.run_dir(cid)
            mounts = self._mounts(cid)
            disk = cdir / "scratch.ext4"
            if iso != "vm" and disk.exists():
                # The last run was under vm isolation: its changes come home first.
                from isobox.compute.vm_backend import copy_scratch_back

                copy_scratch_back(disk, mounts.upper)
            plan = build_plan(doc, self._image_config(cid), mounts,
                              container_id=cid, name=row.name, isolation=iso,
                              container_dir=cdir, run_dir=rdir)
            if iso == "vm":
                plan.vm["layerDisks"] = [str(p) for p in self._layer_disks(row, mounts)]
            net = network_glue.decide(doc, iso, cid, self._netns_of)
            network_glue.apply_to_plan(
                plan, net, join_dir=self.container_dir(net.join_id) if net.join_id else None)
            plan_path = cdir / "plan.json"
            write_plan(plan, plan_path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cdir / "status.json")  # the last run's; the new one writes its own
            endpoint = None
            if net.kind == "network":
                # First on the run's release list, so freed last: after the monitor ended.
                self.db.record(cid, network_glue.ENDPOINT_KIND, {"network": net.network})
                try:
                    endpoint = network_glue.reserve(self.networks, net, cid, row.name, cdir)
                    if iso == "vm" and endpoint is not None:
                        # No namespace to wait for: the tap exists before QEMU opens it.
                        network_glue.attach_vm(self.networks, endpoint, net, plan)
                        write_plan(plan, plan_path)
                        endpoint = None  # attached
                except BaseException:
                    self._release(cid, RUNTIME_KINDS)
                    raise
            self.db.record(cid, "cgroup", {"name": cid})
            self.db.record(cid, "rundir", {"path": str(rdir)})
            if iso == "vm":
                from isobox.compute.vm_backend import vm_id

                vid = vm_id(cid)
                self.db.record(cid, "uvm", {"vm": vid, "dir": str(self.run / "uvm" / vid)})
            rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.db.record(cid, "mount", {"path": plan.rootfs})
            sock = self.socket_path(cid)
            seq = self.db.record(cid, "monitor", {"socket": str(sock)})
            if self._spawner is None:
                raise IsoboxError("the compute service was opened without monitors")
            try:
                mpid = self._spawner.spawn(plan_path)  # thread-safe; waits in parallel
                self.db.amend(seq, {"socket": str(sock), "pid": mpid,
                                    "start": _starttime(mpid)})
            except BaseException:
                self._release(cid, RUNTIME_KINDS)
                raise
            ready = threading.Event()
            abort = threading.Event()
            self._watch(cid, mpid, ready, abort)
            try:
                client = self._client(row)
                if endpoint is not None:
                    # The namespace exists, the process waits: wire it before it runs.
                    init_pid = int(client.status().get("pid") or 0)
                    network_glue.attach(self.networks, endpoint, net, init_pid)
                if attach is not None:
                    client.attach(attach, stdin=stdin, stdout=True, stderr=True)
                pid = client.start()
                self.db.update(
                    cid, state="running", pid=pid, isolation=iso, document=dump_document(doc),
                    started_at=format_time(now_ns()), finished_at=None, exit_code=None,
                    signal=None, error=None,
                )
            except BaseException:
                abort.set()
                ready.set()
                with contextlib.suppress(IsoboxError, OSError):
                    self._client(row).signal(signal_mod.SIGKILL, all=True)
                self._release(cid, RUNTIME_KINDS)
                raise
            finally:
                ready.set()
            started = self.db.get(cid) or row
        self._notify()
        self._emit(started, "start")

    def _layer_disks(self, row: ContainerRow, mounts: Mounts) -> list[Path]:
        """One read-only erofs disk per layer, top first: the store's, shared by every VM
        (built once per layer)."""
        store_disks = getattr(self.store, "image_erofs_layers", None)
        if store_disks is not None:
            return list(store_disks(row.image_digest))
        from isobox.compute.vm_backend import layer_disk

        return [layer_disk(p) for p in mounts.lower]

    def _netns_of(self, ref: str) -> tuple[str, int, str]:
        """(id, first process, isolation) of the running container a ``container:<ref>``
        run joins."""
        other = self.db.resolve(ref)
        if other.state not in ("running", "paused") or other.pid <= 0:
            raise Conflict(f"network mode container:{ref}: container {other.name} is "
                           f"{other.state}, not running")
        return other.id, other.pid, other.isolation

    # ---- watchers: one thread per running container ------------------------------------

    def _watch(self, cid: str, monitor_pid: int, ready: threading.Event,
               abort: threading.Event) -> None:
        t = threading.Thread(target=self._watcher, args=(cid, monitor_pid, ready, abort),
                             name=f"watch-{cid[:12]}", daemon=True)
        with self._guard:
            self._watchers[cid] = t
        t.start()

    def _watcher(self, cid: str, monitor_pid: int, ready: threading.Event,
                 abort: threading.Event) -> None:
        from isobox.compute.monitor_client import MonitorClient

        exit_info: dict[str, Any] | None = None
        try:
            for msg in MonitorClient(str(self.socket_path(cid))).subscribe():
                if "exit" in msg:
                    exit_info = dict(msg["exit"] or {})
                    break
                ev = msg.get("event")
                if isinstance(ev, dict) and not self._closing:
                    ready.wait()
                    row = self.db.get(cid)
                    attrs = {str(k): str(v) for k, v in (ev.get("attributes") or {}).items()}
                    self._emit(row, str(ev.get("action", "event")), cid, extra=attrs)
        except (IsoboxError, OSError) as exc:
            log.debug("container %s: subscription ended: %s", cid, exc)
        except Exception:  # a watcher must never die silently with the container untracked
            log.exception("container %s: watcher failed", cid)
        ready.wait()
        if abort.is_set() or self._closing:
            return
        try:
            self._finish(cid, monitor_pid, exit_info)
        except Exception:
            log.exception("container %s: recording its exit failed", cid)
        finally:
            with self._guard:
                if self._watchers.get(cid) is threading.current_thread():
                    del self._watchers[cid]

    def _read_status(self, cid: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.container_dir(cid) / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _settle(self, cid: str, timeout: float = 60.0) -> bool:
        """Until the runtime resources of the container's last run are released (the exit
        is recorded before that); False on timeout."""
        with self._guard:
            ev = self._settling.get(cid)
        return ev is None or ev.wait(timeout)

    def _finish(self, cid: str, monitor_pid: int, exit_info: dict[str, Any] | None) -> None:
        """A run ended: record the exit, wake waiters, emit ``die``; then free its runtime
        allocations and remove an auto-remove container.

        The exit is recorded as soon as it is known: the monitor sends it before it
        releases what it made (unmounts, the cgroup, ...), which takes tens of
        milliseconds nobody waiting for the exit code needs to wait for. What would touch
        those resources meanwhile waits for the release first (:meth:`_settle`: ``start``,
        ``remove``, a ``cp`` into the stopped container); a daemon that dies in between
        leaves the records, and :meth:`_recover` frees them."""
        start = None
        for a in self.db.allocations(cid, ["monitor"]):
            if int(a.data.get("pid") or 0) == monitor_pid:
                start = a.data.get("start")
        if exit_info is None:
            # No exit from the monitor (it died, or the subscription broke): what it wrote,
            # if anything, is read once it is gone.
            _wait_gone(monitor_pid, start, 10.0)
            exit_info = self._read_status(cid)
        error = None
        if exit_info is None:
            exit_info = {"exitCode": LOST_EXIT, "signal": None}
            error = "monitor lost"
        settled = threading.Event()
        with self._guard:
            self._settling[cid] = settled
        try:
            changed, row = self._record_exit(cid, exit_info, error)
            # The monitor releases what it made, then exits: give it time to do so before
            # freeing (idempotently) whatever it left.
            _wait_gone(monitor_pid, start, 10.0)
            try:
                self._release(cid, RUNTIME_KINDS)
            except Exception as exc:  # the exit is recorded all the same; remove retries
                log.warning("container %s: release after exit: %s", cid, exc)
                if changed and row is not None and row.error is None:
                    self.db.update(cid, when=["stopped"], error=f"release after exit: {exc}")
        finally:
            settled.set()
            with self._guard:
                if self._settling.get(cid) is settled:
                    del self._settling[cid]
        if changed and row is not None and row.document.get("autoRemove"):
            with contextlib.suppress(NotFound, Conflict):
                self.remove(cid, force=True)

    def _record_exit(self, cid: str, exit_info: dict[str, Any], error: str | None
                     ) -> tuple[bool, ContainerRow | None]:
        """The run's end in the row, the finished list and the event bus; waiters woken."""
        raw_code = exit_info.get("exitCode")
        code = int(raw_code) if raw_code is not None else LOST_EXIT
        sig = exit_info.get("signal")
        err = error or exit_info.get("error")
        changed = self.db.update(
            cid, when=list(ACTIVE), state="stopped", pid=0, exit_code=code,
            signal=int(sig) if sig is not None else None, error=err,
            finished_at=exit_info.get("finishedAt") or format_time(now_ns()),
        )
        result = WaitResult(exitCode=code, signal=int(sig) if sig is not None else None,
                            error=err)
        with self._guard:
            self._finished[cid] = result
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
        self._notify()
        row = self.db.get(cid)
        if changed and row is not None:
            self._emit(row, "die", extra={"exitCode": str(code)})
        return changed, row

    # ---- wait, signals, pause ----------------------------------------------------------

    def _wait_inactive(self, cid: str, timeout: float | None) -> bool:
        """Until the container is not running (or gone); False on timeout."""
        def done() -> bool:
            row = self.db.get(cid)
            return row is None or row.state not in ACTIVE or self._closing

        with self._changed:
            return self._changed.wait_for(done, timeout)

    def wait(self, ref: str, *, condition: str = "not-running",
             timeout: float | None = None) -> WaitResult:
        """Block until the container stopped (``not-running``; a container that is created
        but not started yet counts as not stopped) or is gone (``removed``)."""
        if condition not in ("not-running", "removed"):
            raise InvalidArgument(f"unknown wait condition {condition!r} (not-running, removed)")
        try:
            cid = self.db.resolve(ref).id
        except NotFound:
            with self._guard:
                done = self._finished.get(ref)
            if done is None:
                raise
            return done

        seen: list[ContainerRow | None] = []

        def ready() -> bool:
            # The row is kept as it was when the condition held: an auto-remove may move
            # it on (to removing, then gone) before we read it again.
            row = self.db.get(cid)
            if row is None or (condition == "not-running"
                               and row.state in ("stopped", "removing")):
                seen[:] = [row]
                return True
            return False

        with self._changed:
            self._changed.wait_for(lambda: ready() or self._closing, timeout)
        if not seen:
            what = "not removed" if condition == "removed" else "not stopped"
            raise WaitTimeout(f"container {ref}: {what} after {timeout} s")
        row = seen[0]
        if row is not None and row.exit_code is not None:
            return WaitResult(exitCode=row.exit_code, signal=row.signal, error=row.error)
        with self._guard:
            done = self._finished.get(cid)
        if done is not None:
            return done
        code = row.exit_code if row is not None and row.exit_code is not None else 0
        return WaitResult(exitCode=code, signal=None, error=None)

    def _client(self, row: ContainerRow) -> MonitorClient:
        from isobox.compute.monitor_client import MonitorClient

        return MonitorClient(str(self.socket_path(row.id)))

    def kill(self, ref: str, signal: int | str = "SIGKILL") -> None:
        sig = parse_signal(signal)
        row = self.db.resolve(ref)
        lifecycle.check("kill", row.state, row.name)
        self._client(row).signal(sig, all=False)
        self._emit(row, "kill", extra={"signal": str(sig)})

    def stop(self, ref: str, *, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to every process after ``timeout``. A container that is
        not running is left as it is."""
        row = self.db.resolve(ref)
        if row.state not in ACTIVE:
            return
        client = self._client(row)
        with contextlib.suppress(NotFound):
            if row.state == "paused":
                self.resume(row.id)
            client.signal(signal_mod.SIGTERM, all=False)
            if not self._wait_inactive(row.id, timeout):
                client.signal(signal_mod.SIGKILL, all=True)
        if not self._wait_inactive(row.id, 30.0):
            raise IsoboxError(f"container {row.name} did not stop after SIGKILL")
        self._emit(row, "stop")

    def pause(self, ref: str) -> None:
        with self._locked(ref) as row:
            lifecycle.check("pause", row.state, row.name)
            self._client(row).pause()
            self.db.update(row.id, when=["running"], state="paused")
        self._notify()
        self._emit(row, "pause")

    def resume(self, ref: str) -> None:
        with self._locked(ref) as row:
            lifecycle.check("resume", row.state, row.name)
            self._client(row).resume()
            self.db.update(row.id, when=["paused"], state="running")
        self._notify()
        self._emit(row, "unpause")

    # ---- remove ------------------------------------------------------------------------

    def remove(self, ref: str, *, force: bool = False) -> None:
        """Delete a container and free everything on its release list, newest first.

        A running one needs ``force``: it is killed and its monitor waited for first."""
        with self._locked(ref) as row:
            cid = row.id
            if row.state in ACTIVE:
                if not force:
                    lifecycle.check("remove", row.state, row.name)
                with contextlib.suppress(NotFound, IsoboxError, OSError):
                    if row.state == "paused":
                        self._client(row).resume()
                    self._client(row).signal(signal_mod.SIGKILL, all=True)
                if not self._wait_inactive(cid, 15.0):
                    log.warning("container %s: no exit after SIGKILL; freeing it anyway", cid)
            elif row.state != "removing":
                lifecycle.check("remove --force" if force else "remove", row.state, row.name)
            if not self._settle(cid):
                log.warning("container %s: its last run is still being released; freeing "
                            "it here too", cid)
            self.db.update(cid, state="removing")
            self._release(cid)
            self.db.delete(cid)
        with self._guard:
            self._locks.pop(cid, None)
            self._finished.setdefault(cid, WaitResult(
                exitCode=row.exit_code if row.exit_code is not None else 0,
                signal=row.signal, error=row.error))
        self._notify()
        self._emit(row, "destroy")

    # ---- inspect -----------------------------------------------------------------------

    def _info(self, row: ContainerRow) -> ComputeSystemInfo:
        cdir = self.container_dir(row.id)
        state: Any = row.state
        return ComputeSystemInfo(
            id=row.id, name=row.name, image=row.image, imageId=row.image_id,
            isolation=row.isolation, state=state,
            pid=row.pid if row.state in ACTIVE else 0, exitCode=row.exit_code,
            error=row.error, createdAt=row.created_at, startedAt=row.started_at,
            finishedAt=row.finished_at, labels=dict(row.document.get("labels") or {}),
            document=row.document, rootfs=str(cdir / "rootfs"), scratch=str(cdir / "scratch"),
        )

    def inspect(self, ref: str) -> ComputeSystemInfo:
        row = self.db.resolve(ref)
        if row.state == "creating":
            raise NotFound(f"no such container: {ref}")
        return self._info(row)

    def enumerate(self, *, states: Sequence[str] | None = None,
                  isolation: str | Sequence[str] | None = None,
                  labels: Mapping[str, str | None] | None = None,
                  name: str | None = None) -> list[ComputeSystemInfo]:
        """Containers matching every given filter (newest first). ``labels``: ``{k: v}``
        wants that value, ``{k: None}`` only the key; ``name`` matches a part of the name."""
        isos = [isolation] if isinstance(isolation, str) else isolation
        out: list[ComputeSystemInfo] = []
        for row in self.db.all():
            if row.state == "creating":
                continue
            if states and row.state not in states:
                continue
            if isos and row.isolation not in isos:
                continue
            if name and name not in row.name:
                continue
            have = row.document.get("labels") or {}
            if labels and any(k not in have or (v is not None and have[k] != v)
                              for k, v in labels.items()):
                continue
            out.append(self._info(row))
        return out

    def info(self) -> DaemonInfo:
        vm_why = vm_unavailable() or "available"
        accel = None
        if vm_why == "available":
            from isobox.uvm.accel import cached_result
            from isobox.uvm.assets import load_assets

            assets = load_assets()
            found = cached_result(assets) if assets is not None else None
            if found is not None:
                accel = found.name
                vm_why = f"available ({found.name}: {found.reason})"
            else:
                vm_why = "available (accelerator not probed yet: the first vm run probes)"
        cg2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        return DaemonInfo(
            version=__version__, apiVersion=API_VERSION, pid=os.getpid(), root=str(self.root),
            run=str(self.run), cgroupVersion=2 if cg2 else 1,
            isolations={"process": "available", "host": "available", "vm": vm_why},
            accelerator=accel, containers=self.db.counts(), images=len(self.store.images()),
            networks=len(self.networks.list()),
        )

    # ---- through the monitor -----------------------------------------------------------

    def _active(self, ref: str, action: str) -> ContainerRow:
        row = self.db.resolve(ref)
        lifecycle.check(action, row.state, row.name)
        return row

    def attach(self, ref: str, sock: socket.socket, *, stdin: bool = False,
               stdout: bool = True, stderr: bool = True) -> None:
        row = self._active(ref, "attach")
        self._client(row).attach(sock, stdin=stdin, stdout=stdout, stderr=stderr)
        self._emit(row, "attach")

    def exec(self, ref: str, spec: ExecSpec, sock: socket.socket) -> None:
        row = self._active(ref, "exec")
        self._client(row).exec(sock, spec.model_dump(mode="json", by_alias=True))
        self._emit(row, "exec_start", extra={"execCommand": " ".join(spec.args)})

    def top(self, ref: str) -> ProcessList:
        row = self._active(ref, "top")
        procs: list[Any] = self._client(row).top()
        return ProcessList(processes=procs)

    def stats(self, ref: str) -> StatsSample:
        row = self._active(ref, "stats")
        sample: Any = self._client(row).stats()
        return cast("StatsSample", sample)

    def stats_stream(self, ref: str, interval: float = 1.0) -> Iterator[StatsSample]:
        """A sample every ``interval`` seconds while the container runs; ``cpuPercent`` is
        the CPU time used between two samples over the wall time between them."""
        if interval <= 0:
            raise InvalidArgument("interval must be positive")
        row = self._active(ref, "stats")
        client = self._client(row)
        prev: tuple[int, int] | None = None
        while not self._closing:
            try:
                sample = cast("StatsSample", client.stats())
            except NotFound:
                return
            now = time.monotonic_ns()
            if prev is not None and now > prev[1]:
                used = sample["cpuUsageNs"] - prev[0]
                sample["cpuPercent"] = round(max(used, 0) * 100.0 / (now - prev[1]), 2)
            prev = (sample["cpuUsageNs"], now)
            yield sample
            if self._wait_inactive(row.id, interval):
                return

    def logs(self, ref: str, *, follow: bool = False, since: str | float | None = None,
             until: str | float | None = None, tail: int | None = None, stdout: bool = True,
             stderr: bool = True) -> Iterator[LogEntry]:
        from isobox.compute.logfile import follow_log, read_log

        row = self.db.resolve(ref)
        path = self.container_dir(row.id) / "log.jsonl"
        streams = [s for s, on in (("stdout", stdout), ("stderr", stderr)) if on]

        def running() -> bool:
            cur = self.db.get(row.id)
            return cur is not None and cur.state in ACTIVE

        if follow:
            entries = follow_log(path, running, since=since, until=until, tail=tail,
                                 streams=streams, stop=lambda: self._closing)
        else:
            entries = read_log(path, since=since, until=until, tail=tail, streams=streams)
        for e in entries:
            yield LogEntry(time=e["time"], stream=e["stream"], line=e["line"])

    def events(self, *, since: str | float | None = None, until: str | float | None = None,
               filters: Filters | None = None, follow: bool = True) -> Iterator[Event]:
        return self.bus.stream(since=since, until=until, filters=filters, follow=follow)

    # ---- cp ----------------------------------------------------------------------------

    def _live_root(self, row: ContainerRow) -> str:
        """Where a running container's root is seen from the host: its first process's
        root (process isolation; whatever mount namespace it is in), or the mount point."""
        if row.isolation == "process" and row.pid > 0:
            return f"/proc/{row.pid}/root"
        return str(self.container_dir(row.id) / "rootfs")

    @contextmanager
    def _stopped_root(self, row: ContainerRow, *, writable: bool) -> Iterator[str]:
        """A stopped container's root, mounted for the time of a ``cp``: read-only as a
        stack of lower layers at a private point (no lock needed: it never uses the upper
        layer as one), or writable at the usual point (the caller holds the lock, so no
        start can mount it meanwhile). Recorded on the release list before it is made."""
        from isobox._sys import linux

        if not self._settle(row.id):  # the last run's monitor may still be unmounting
            raise Conflict(f"container {row.name}: its last run is still being released")
        m = self._mounts(row.id)
        cdir = self.container_dir(row.id)
        if writable:
            point = cdir / "rootfs"
            opts = m.overlay_options()
        else:
            point = cdir / f"cp-{secrets.token_hex(4)}"
            opts = "lowerdir=" + ":".join(str(p) for p in [m.upper, *m.lower])
        seq = self.db.record(row.id, "mount", {"path": str(point), "remove": not writable})
        try:
            point.mkdir(exist_ok=True)
            try:
                linux.mount("overlay", str(point), "overlay",
                            linux.MS_NODEV | (0 if writable else linux.MS_RDONLY), opts)
            except OSError as exc:
                raise from_oserror("mount overlay", str(point), exc) from exc
            yield str(point)
        finally:
            _unmount(str(point))
            if not writable:
                with contextlib.suppress(OSError):
                    point.rmdir()
            self.db.forget(seq)

    def archive_get(self, ref: str, path: str) -> Iterator[bytes]:
        """A tar of ``path`` inside the container (``cp`` out), streamed."""
        from isobox.compute.archive import tar_out

        row = self.db.resolve(ref)
        lifecycle.check("archive", row.state, row.name)
        self._archive_reachable(row)
        if row.state in ACTIVE:
            root = self._live_root(row)
            gen = tar_out(root, path)
            first = next(gen, None)  # errors (no such path) surface before any byte
            if first is not None:
                yield first
                yield from gen
            return
        with self._stopped_root(row, writable=False) as root:
            gen = tar_out(root, path)
            yield from gen

    def _archive_reachable(self, row: ContainerRow) -> None:
        """``cp`` reads the container's root on the host. A running vm container's root is
        inside its VM, and after a vm run the writable layer is in ``scratch.ext4``: refuse
        clearly rather than copy the wrong files (cp for vm comes with the agent's tar)."""
        from isobox.compute.plan import SCRATCH_DISK

        in_vm = row.state in ACTIVE and row.isolation == "vm"
        if in_vm or (self.container_dir(row.id) / SCRATCH_DISK).exists():
            raise IsolationUnavailable(
                f"container {row.name}: cp is not available for a container whose writable "
                "layer is in a utility VM yet (stop it and start it with "
                "--isolation=process to copy)")

    def archive_put(self, ref: str, path: str, stream: BinaryIO) -> None:
        """Extract the tar ``stream`` into the directory ``path`` inside the container."""
        from isobox.compute.archive import tar_in

        with self._locked(ref) as row:
            lifecycle.check("archive", row.state, row.name)
            self._archive_reachable(row)
            spool = self.container_dir(row.id)
            if row.state in ACTIVE:
                tar_in(self._live_root(row), path, stream, spool_dir=spool)
                return
            with self._stopped_root(row, writable=True) as root:
                tar_in(root, path, stream, spool_dir=spool)

    # ---- crash recovery ----------------------------------------------------------------

    def _recover_network(self) -> None:
        """Free every endpoint whose container does not run any more (it died while the
        daemon was away, or a start crashed): its rules, veth, address, names."""
        live = {r.id for r in self.db.all() if r.state in ACTIVE}
        try:
            self.networks.recover(live)
        except Exception:
            log.exception("recovery of the network endpoints failed")

    def _recover(self) -> None:
        """Bring every row back to a state that is true: roll back a ``creating``, finish
        a ``removing``, adopt a monitor that still runs, record the exit of one that ended
        while we were away (or declare it lost), and remove auto-remove containers that
        stopped meanwhile."""
        for row in self.db.all():
            cid = row.id
            try:
                if row.state == "creating":
                    self._release(cid)
                    self.db.delete(cid)
                elif row.state == "removing":
                    self._release(cid)
                    self.db.delete(cid)
                    self._emit(row, "destroy")
                elif row.state in ACTIVE:
                    mons = self.db.allocations(cid, ["monitor"])
                    mpid = int(mons[0].data.get("pid") or 0) if mons else 0
                    try:
                        status = self._client(row).status()
                    except (NotFound, OSError):
                        status = None
                    if status is not None:
                        state = str(status.get("state", "running"))
                        if state in ACTIVE and state != row.state:
                            self.db.update(cid, state=state)
                        ready = threading.Event()
                        ready.set()
                        self._watch(cid, mpid, ready, threading.Event())
                    else:
                        self._finish(cid, mpid, self._read_status(cid))
                else:  # created or stopped
                    if self.db.allocations(cid, ["monitor"]) and self._recover_start(row):
                        continue
                    # The exit was recorded (or the run never began), the daemon went away
                    # before the run's resources were released: free them now (the monitor
                    # first ends).
                    if self.db.allocations(cid, RUNTIME_KINDS):
                        self._release(cid, RUNTIME_KINDS)
                    if row.state == "stopped" and row.document.get("autoRemove"):
                        self.remove(cid, force=True)
            except Exception:
                log.exception("recovery of container %s (%s) failed", cid, row.state)

    def _recover_start(self, row: ContainerRow) -> bool:
        """A row not running that still has a monitor: the daemon died inside ``start``.

        The monitor says where that start got to. Running (or paused): the row says so and
        a watcher follows it, as for an adopted running row. Still ``created`` (its process
        waits for a start that will never come): the monitor is told to end (SIGTERM: it
        kills the waiting process and undoes what it made), so that a later ``start`` does
        not race an orphan on the same socket, rootfs and cgroup. Gone (or ended) with an
        exit of this run on disk that the row does not have yet: that exit is recorded.
        Returns True when the run is now tracked; False leaves the release to the caller."""
        cid = row.id
        mons = self.db.allocations(cid, ["monitor"])
        mpid = int(mons[0].data.get("pid") or 0)
        start = mons[0].data.get("start")
        try:
            status: dict[str, Any] | None = self._client(row).status()
        except (IsoboxError, OSError):
            status = None
        state = str(status.get("state")) if status is not None else None
        if status is not None and state in ACTIVE:
            self.db.update(cid, state=state, pid=int(status.get("pid") or 0),
                           started_at=status.get("startedAt") or format_time(now_ns()),
                           finished_at=None, exit_code=None, signal=None, error=None)
            ready = threading.Event()
            ready.set()
            self._watch(cid, mpid, ready, threading.Event())
            return True
        if state == "created":
            with contextlib.suppress(ProcessLookupError):
                if _alive(mpid, start):
                    os.kill(mpid, signal_mod.SIGTERM)
            _wait_gone(mpid, start, 10.0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.container_dir(cid) / "status.json")  # of the kill, no run
            return False
        last = self._read_status(cid)
        if (last is not None and last.get("startedAt")
                and last.get("finishedAt") != row.finished_at):
            self.db.update(cid, state="running")
            self._finish(cid, mpid, last)
            return True
        return False


def _kill_cgroup(name: str) -> None:
    """Kill whatever is left in a container's job (its monitor died without cleaning up)
    and remove the job's folders. Nothing there: nothing to do."""
    from isobox.jobs.cgroup import detect

    try:
        cg = detect(name)
    except IsoboxError:
        return
    if not cg.exists():
        return
    cg.kill_all()
    cg.remove()
    cg.remove_parents()
