"""VM isolation behind the monitor's :class:`~isobox.compute.backends.Backend` interface.

:class:`VmBackend` boots one utility VM per run (:class:`isobox.uvm.vm.UtilityVM`) and has
its guest agent (:class:`isobox.agent.client.AgentClient`) create the container there: the
very same silo + jobs code, under the guest's kernel and cgroup v2. The monitor sees what
it sees of the other backends, so its protocol, logs, streams and status file are the same:

- **stdio as pipes.** The monitor hands the backend the child's ends of its pipes (or wants
  a pty master); a pump thread per process writes the agent's output frames into them and
  closes each when the guest says that channel ended, and a stdin thread forwards what the
  monitor writes. So the monitor's output path, log and attach streams are untouched.
- **exits without SIGCHLD.** No host process is the container's; a process's end arrives as
  the agent's ``exit`` notification. The backend queues ``(pid, wait status)`` and writes a
  byte to :meth:`events_fd`, which the monitor watches and answers with :meth:`take_exits`.
  Pids are the guest's. The monitor does not ``waitpid(-1)`` for this backend
  (``reaps_children`` is False): QEMU is its child, and ``UtilityVM``'s watcher reaps it.
- **QEMU's death** (kill -9, a guest panic) closes the agent channel: every live process is
  reported killed (SIGKILL) and :attr:`error` says why, which the monitor writes to
  ``status.json``.
- **pause/resume** freeze the container's cgroup in the guest (the agent still answers
  ``top``/``stats``); ``stats``/``top`` come from the agent (guest pids, guest cgroup).

The container's file system (docs/uvm-design.md, "Container file system"): one read-only
erofs disk per image layer (shared by every VM), a writable ext4 scratch disk in the
container's folder, mapped directories over virtio-9p.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import select
import shutil
import struct
import subprocess
import termios
import threading
import time
import tty as tty_mod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isobox.compute.backends import ChildIO
from isobox.compute.plan import (
    GUEST_BUNDLE,
    GUEST_LAYERS,
    GUEST_SCRATCH,
    Plan,
    merge_env,
)
from isobox.errors import (
    Conflict,
    IsoboxError,
    IsolationUnavailable,
    StoreError,
    ToolMissing,
    VmError,
    from_oserror,
)

if TYPE_CHECKING:
    from isobox.agent.client import AgentClient, ProcessStream
    from isobox.jobs.cgroup import Cgroup
    from isobox.uvm.template import Template
    from isobox.uvm.vm import ExitInfo, UtilityVM, VmConfig

SCRATCH_SIZE = 1 << 30  # sparse: only what the container writes is allocated
BOOT_TIMEOUT = 120.0  # TCG is slow; a healthy boot takes ~4 s here
SHUTDOWN_TIMEOUT = 10.0
VM_ID_PREFIX = "c-"


def vm_id(container_id: str) -> str:
    """The utility VM's id: short, so ``$ISOBOX_RUN/uvm/<id>/qmp.sock`` fits sun_path."""
    return VM_ID_PREFIX + container_id[:20]


def wait_status(exit_code: int, sig: int | None) -> int:
    """The wait status the monitor decodes (``exit_status``) for a guest process's end."""
    if sig:
        return sig & 0x7F
    return (exit_code & 0xFF) << 8


# ---- disks --------------------------------------------------------------------------------


def _erofs_tool() -> str:
    found = shutil.which("mkfs.erofs") or shutil.which("mkfs.erofs", path="/usr/sbin:/sbin")
    if not found:
        raise ToolMissing("mkfs.erofs is not installed (Debian package erofs-utils)")
    return found


def layer_disk(layer_dir: Path) -> Path:
    """The erofs image of one unpacked layer (``<layer>/../layer.erofs``, where the store's
    ``ImageStore.layer_erofs`` keeps it), built once (temp file + rename, so concurrent
    builders never expose a partial image). Fallback for a store without ``layer_erofs``."""
    target = layer_dir.parent / "layer.erofs"
    if target.is_file():
        return target
    tmp = target.with_name(f".layer.erofs.{os.getpid()}.{threading.get_ident()}")
    try:
        proc = subprocess.run([_erofs_tool(), "--quiet", str(tmp), str(layer_dir)],
                              capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            raise StoreError(f"mkfs.erofs {layer_dir}: {proc.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _mkfs_ext4() -> str:
    for name in ("mkfs.ext4", "mke2fs"):
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if found:
            return found
    raise ToolMissing("mkfs.ext4 is not installed (Debian package e2fsprogs)")


def ensure_scratch_disk(path: Path, seed: Path | None) -> bool:
    """The container's writable layer as an ext4 file with ``upper/`` and ``work/`` at its
    root. Made on the first vm run with ``mkfs.ext4 -d <seed>`` (the host scratch layer),
    so what the container changed under process isolation is there under vm isolation.
    Returns True when it was made now."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, SCRATCH_SIZE)
        finally:
            os.close(fd)
        argv = [_mkfs_ext4(), "-q", "-F", "-t", "ext4", "-m", "0", "-L", "scratch",
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
        if seed is not None and (seed / "upper").is_dir():
            argv += ["-d", str(seed)]
        proc = subprocess.run([*argv, str(tmp)], capture_output=True, text=True,
                              check=False, timeout=120)
        if proc.returncode != 0:
            raise StoreError(f"mkfs.ext4 {path}: {proc.stderr.strip()[-300:]}")
        os.replace(tmp, path)
    except OSError as exc:
        raise from_oserror("make scratch disk", str(path), exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


def copy_scratch_back(disk: Path, upper: Path) -> None:
    """A vm run's changes back into the host scratch layer (the container goes back to
    process or host isolation): the disk's ``upper/`` loop-mounted read-only and copied
    over ``upper`` with ``cp -a`` (whiteouts, xattrs, owners kept); then the disk is removed,
    so the host layer is again the only one (the next vm run seeds a new disk from it)."""
    import tempfile

    from isobox._sys import linux as L

    mnt = Path(tempfile.mkdtemp(prefix="isobox-scratch-"))
    try:
        proc = subprocess.run(["mount", "-t", "ext4", "-o", "ro,loop,noload", str(disk),
                               str(mnt)], capture_output=True, text=True, check=False,
                              timeout=60)
        if proc.returncode != 0:
            raise StoreError(f"mount {disk}: {proc.stderr.strip()[-300:]}")
        try:
            src = mnt / "upper"
            if src.is_dir():
                for child in list(upper.iterdir()):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
                cp = subprocess.run(["cp", "-a", f"{src}/.", f"{upper}/"],
                                    capture_output=True, text=True, check=False, timeout=600)
                if cp.returncode != 0:
                    raise StoreError(f"copy {disk} back: {cp.stderr.strip()[-300:]}")
        finally:
            L.umount2(str(mnt), L.MNT_DETACH)
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()
    disk.unlink()


# ---- the backend --------------------------------------------------------------------------


class _Live:
    """One guest process the monitor knows: its stream and the host ends it writes to."""

    def __init__(self, stream: ProcessStream, outs: dict[int, int], stdin: int | None,
                 slave: int | None) -> None:
        self.stream = stream
        self.outs = outs  # agent channel -> host fd (pipe write end or pty slave)
        self.stdin = stdin  # host fd the stdin thread reads (pipe read end or pty slave)
        self.slave = slave
        self.stop = threading.Event()


class VmBackend:
    reaps_children = False  # QEMU is the monitor's child; UtilityVM's watcher reaps it

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.pid = 0
        self.vm: UtilityVM | None = None
        self.agent: AgentClient | None = None
        self.error: str | None = None
        self._exits: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._live: dict[int, _Live] = {}
        self._lock = threading.Lock()
        self._created = False
        self.cold_reason: str | None = None  # why this run's VM was not a clone

    # -- monitor hooks -----------------------------------------------------------------------

    def events_fd(self) -> int:
        return self._wake_r

    def take_exits(self) -> list[tuple[int, int]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        out = []
        while True:
            try:
                out.append(self._exits.get_nowait())
            except queue.Empty:
                return out

    def _post_exit(self, pid: int, status: int) -> None:
        self._exits.put((pid, status))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- create --------------------------------------------------------------------------------

    def create(self, io: ChildIO) -> int | None:
        from isobox.uvm.assets import load_assets
        from isobox.uvm.vm import Disk, Share, VmConfig

        v = self.plan.vm
        t0 = time.monotonic()
        marks: dict[str, float] = {}

        def mark(step: str) -> None:
            marks[step] = round(time.monotonic() - t0 - sum(marks.values()), 4)

        assets = load_assets()
        if assets is None:
            raise IsolationUnavailable("vm isolation: the utility-VM assets are not built "
                                       "(run `isobox uvm build`)")
        layers = [Path(p) for p in v.get("layerDisks") or
                  [layer_disk(Path(d)) for d in v["layers"]]]
        scratch = Path(v["scratch"])
        ensure_scratch_disk(scratch, Path(v["scratchSeed"]) if v.get("scratchSeed") else None)
        disks = [Disk(p, f"layer{i}") for i, p in enumerate(layers)]
        disks.append(Disk(scratch, "scratch", False))
        tpl = self._template(assets, layers)
        shares = []
        for s in v.get("shares") or []:
            if not os.path.exists(s["source"]):
                raise IsoboxError(f"mount source {s['source']!r} does not exist")
            # security_model=none: files are created with QEMU's (root's) credentials and
            # the guest cannot chown host files; passthrough would let guest root do so.
            shares.append(Share(s["tag"], Path(s["source"]), bool(s["readOnly"]),
                                "passthrough"))
        mark("prepare")  # assets, layer disks, scratch disk, the template (a build: seconds)
        started = time.monotonic()
        hostname = (v.get("silo") or {}).get("hostname") or None
        cold = VmConfig(memory_mib=int(v["memoryMib"]), cpus=int(v["cpus"]), disks=disks,
                        shares=shares, tap=v.get("tap"), mac=v.get("mac"))
        if tpl is not None:
            from isobox.uvm.template import pad_layer

            for p in layers:
                pad_layer(p)
            self._launch(assets, tpl.clone_config(disks=disks, shares=shares,
                                                  tap=v.get("tap"), mac=v.get("mac")))
        else:
            self._launch(assets, cold)
        mark("qemu")  # spawn until QEMU connected the agent channel and QMP answers
        assert self.vm is not None and self.agent is not None
        if tpl is not None:
            try:
                self.vm.restore(tpl.state, BOOT_TIMEOUT)
            except IsoboxError as exc:
                # A template QEMU cannot load is no template: dropped (the next start
                # builds it again) and this run boots cold, saying why.
                from isobox.uvm.template import discard_template

                discard_template(tpl)
                self.agent.closed = True
                self.vm.kill()
                self.cold_reason = f"restoring template {tpl.key} failed: {exc}"[:2000]
                tpl = None
                self._launch(assets, cold)
        if tpl is not None:
            self.agent.adopt(tpl.protocol_version)
            mark("restore")
        else:
            self.agent.connect(BOOT_TIMEOUT)
            mark("boot")
        # A clone's clock, CRNG and hostname are its template's until here.
        hello = self.agent.hello(time_ns=time.time_ns(), entropy=os.urandom(64),
                                 reseed=tpl is not None, hostname=hostname)
        mark("hello")
        seconds = time.monotonic() - started
        if v.get("network"):
            self._network(v["network"])
            mark("network")
        mounts = []
        if tpl is not None:  # a template never mounts the scratch slot: the agent does
            # (noinit_itable: no kernel thread zeroing inode tables behind the container)
            mounts.append({"source": "serial:scratch", "target": GUEST_SCRATCH,
                           "fstype": "ext4", "options": ["noatime", "noinit_itable"]})
        mounts += [{"source": f"serial:layer{i}", "target": f"{GUEST_LAYERS}/{i}",
                    "fstype": "erofs", "options": ["ro"]} for i in range(len(layers))]
        mounts += [{"source": s["tag"], "target": s["guest"], "fstype": "9p",
                    "options": ["trans=virtio", "version=9p2000.L", "msize=262144",
                                *(["ro"] if s["readOnly"] else [])]}
                   for s in v.get("shares") or []]
        rootfs = {"lower": [f"{GUEST_LAYERS}/{i}" for i in range(len(layers))],
                  "upper": f"{GUEST_SCRATCH}/upper", "work": f"{GUEST_SCRATCH}/work"}
        stream = self.agent.create(self.plan.id, v["silo"], rootfs=rootfs, disks=mounts,
                                   tty=self.plan.tty, stdin=self.plan.stdin)
        mark("create")
        marks.update({f"guest.{k}": secs for k, secs in stream.steps.items()})
        self._record_boot(tpl, seconds, hello, marks)
        self._created = True
        self.pid = stream.pid
        return self._bridge(stream, io)

    def _launch(self, assets: Any, cfg: VmConfig) -> None:
        """Spawn QEMU for ``cfg`` and attach the agent client (not yet spoken to)."""
        from isobox.agent.client import AgentClient
        from isobox.uvm.vm import UtilityVM

        self.vm = UtilityVM(vm_id(self.plan.id), assets, cfg)
        self.vm.start(BOOT_TIMEOUT)
        assert self.vm.agent is not None
        self.agent = AgentClient(self.vm.agent, timeout=BOOT_TIMEOUT)
        self.vm.on_exit(self._vm_ended)

    def _template(self, assets: Any, layers: list[Path]) -> Template | None:
        """The template this run clones, or None for a cold boot: asked for
        (``template: false``, ``--no-template``), or the container does not fit a clone's
        slots (the reason is kept in ``vm.json``)."""
        from isobox.uvm.template import ensure_template, fits

        v = self.plan.vm
        self.cold_reason = None
        if v.get("template") is False:
            self.cold_reason = "asked for (--no-template)"
            return None
        why = fits([p.stat().st_size for p in layers], len(v.get("shares") or []))
        if why is None and Path(v["scratch"]).stat().st_size != SCRATCH_SIZE:
            why = "its scratch disk is not of the template's size"
        if why is not None:
            self.cold_reason = why
            return None
        seccomp = ((v.get("silo") or {}).get("process") or {}).get("seccomp")
        try:
            return ensure_template(assets, int(v["memoryMib"]), int(v["cpus"]),
                                   warm_seccomp=[seccomp] if seccomp else None)
        except IsoboxError as exc:
            # The container still runs, booted cold; vm.json says why.
            self.cold_reason = f"no template: {exc}"[:2000]
            return None

    def _record_boot(self, tpl: Template | None, seconds: float,
                     hello: dict[str, Any], steps: dict[str, float]) -> None:
        """``vm.json`` in the container's folder: how its VM started (clone of which
        template, or cold and why), the accelerator, and how long it took to answer."""
        import json

        assert self.vm is not None
        info = {"mode": "clone" if tpl is not None else "cold",
                "template": tpl.key if tpl is not None else None,
                "coldReason": self.cold_reason,
                "accel": self.vm.accel_name, "qemuPid": self.vm.pid,
                "secondsToAgent": round(seconds, 4), "bootId": hello.get("bootId"),
                "steps": steps}
        path = Path(self.plan.container_dir) / "vm.json"
        with contextlib.suppress(OSError):
            tmp = path.with_name(".vm.json.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)

    def _network(self, net: dict[str, Any]) -> None:
        """The guest's NIC (the endpoint's tap, found by its MAC) configured by the agent,
        with the container's ``hosts`` and ``resolv.conf`` from its folder on the host."""
        assert self.agent is not None
        cdir = Path(self.plan.container_dir)
        files = {}
        for name in ("hosts", "resolv.conf"):
            with contextlib.suppress(FileNotFoundError):
                files[name] = (cdir / name).read_text()
        self.agent.call("network", ip=net["ip"], prefixLen=int(net["prefixLen"]),
                        gateway=net["gateway"], mac=net["mac"], files=files)

    def _vm_ended(self, info: ExitInfo) -> None:
        """QEMU ended (watcher thread). Live processes end with the agent channel; this
        records why, unless the end was asked for."""
        if not info.requested:
            with self._lock:
                self.error = f"the utility VM ended: {info.reason}"

    # -- stdio bridge --------------------------------------------------------------------------

    def _bridge(self, stream: ProcessStream, io: ChildIO) -> int | None:
        import isobox.agent.protocol as P

        master: int | None = None
        if io.tty:
            master, slave = os.openpty()
            tty_mod.setraw(slave)
            os.set_blocking(master, False)
            live = _Live(stream, {P.STDOUT: slave, P.STDERR: slave}, os.dup(slave), slave)
        else:
            outs = {}
            for ch, fd in ((P.STDOUT, io.stdout), (P.STDERR, io.stderr)):
                if fd is not None:
                    outs[ch] = os.dup(fd)
            live = _Live(stream, outs, os.dup(io.stdin) if io.stdin is not None else None,
                         None)
        with self._lock:
            self._live[stream.pid] = live
        threading.Thread(target=self._pump_out, args=(live,), daemon=True,
                         name=f"vm-out-{stream.pid}").start()
        if live.stdin is not None:
            threading.Thread(target=self._pump_in, args=(live,), daemon=True,
                             name=f"vm-in-{stream.pid}").start()
        return master

    def _pump_out(self, live: _Live) -> None:
        """Agent output → the host fds; the exit → the monitor (after the output ended)."""
        status: int | None = None
        try:
            for ev in live.stream.iter(timeout=None):
                if ev.exit is not None:
                    status = wait_status(ev.exit.exit_code, ev.exit.signal)
                    break
                fd = live.outs.get(ev.channel)
                if fd is None:
                    continue
                if not ev.data:
                    if live.slave is None:
                        self._close_out(live, ev.channel)
                    continue
                with contextlib.suppress(OSError):
                    _write_all(fd, ev.data)
        except Exception as exc:  # the channel closed: the VM is gone
            with self._lock:
                if self.error is None:
                    self.error = f"the utility VM's agent channel closed: {exc}"
        if status is None:
            # Give the VM watcher a moment to say why (kill -9, panic) before reporting.
            if self.vm is not None:
                with contextlib.suppress(Exception):
                    self.vm.wait(5.0)
            status = 9  # killed with the VM
        live.stop.set()
        for ch in list(live.outs):
            self._close_out(live, ch)
        if live.slave is not None:
            with contextlib.suppress(OSError):
                os.close(live.slave)
            live.slave = None
        with self._lock:
            self._live.pop(live.stream.pid, None)
        self._post_exit(live.stream.pid, status)

    def _close_out(self, live: _Live, channel: int) -> None:
        fd = live.outs.pop(channel, None)
        if fd is not None and fd != live.slave:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _pump_in(self, live: _Live) -> None:
        """What the monitor writes to the process's stdin → the agent; EOF closes it."""
        fd = live.stdin
        assert fd is not None
        winsize = b""
        try:
            while not live.stop.is_set():
                r, _, _ = select.select([fd], [], [], 0.25)
                if live.slave is not None:
                    winsize = self._forward_resize(live, winsize)
                if not r:
                    continue
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    if live.slave is None:
                        live.stream.close_stdin()
                    return
                live.stream.write(data)
        except Exception:
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    @staticmethod
    def _forward_resize(live: _Live, last: bytes) -> bytes:
        """The monitor sets the size on the pty's master; the guest's pty follows."""
        assert live.slave is not None
        try:
            now = fcntl.ioctl(live.slave, termios.TIOCGWINSZ, b"\0" * 8)
        except OSError:
            return last
        if now != last:
            rows, cols = struct.unpack("HHHH", now)[:2]
            if rows and cols:
                with contextlib.suppress(Exception):
                    live.stream.resize(rows, cols)
        return now

    # -- operations ------------------------------------------------------------------------------

    def _a(self) -> AgentClient:
        if self.agent is None or not self._created:
            raise Conflict(f"container {self.plan.id} is not created")
        return self.agent

    def start(self) -> int:
        return self._a().start(self.plan.id)

    def signal(self, sig: int, all_processes: bool) -> None:
        try:
            self._a().signal(self.plan.id, sig, all_processes=all_processes)
        except IsoboxError:
            if sig == 9 and self.vm is not None:
                self.vm.kill()  # the agent cannot: the VM goes, and the container with it
                return
            raise

    def pause(self) -> None:
        self._a().pause(self.plan.id)

    def resume(self) -> None:
        self._a().resume(self.plan.id)

    def cgroup(self) -> Cgroup:
        raise VmError("vm isolation: the container's cgroup is inside the utility VM")

    def pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.top()]

    def total_processes(self) -> int | None:
        return None

    def reaped(self, pid: int, status: int) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return self._a().stats(self.plan.id)

    def top(self) -> list[dict[str, Any]]:
        return self._a().top(self.plan.id)

    def exec(self, spec: dict[str, Any], io: ChildIO) -> tuple[int, int | None]:
        base = self.plan.vm["silo"]["process"]
        env = merge_env(list(base.get("env") or []), list(spec.get("env") or []))
        uid = gid = None
        extra: list[int] | None = None
        if spec.get("user"):
            ident = _exec_identity(self.plan, spec["user"])
            uid, gid, extra = ident.uid, ident.gid, ident.additional_gids
        stream = self._a().exec(self.plan.id, list(spec["args"]), env=env,
                                cwd=spec.get("cwd") or None, uid=uid, gid=gid,
                                additional_gids=extra, tty=bool(spec.get("tty")),
                                stdin=bool(spec.get("stdin")))
        master = self._bridge(stream, io)
        return stream.pid, master

    def release(self) -> None:
        """The container deleted in the guest and its disks synced (the agent's
        ``shutdown``), then QEMU ended (QMP ``quit``; an agent that did not sync powers
        the guest off itself); SIGKILL when it does not go."""
        agent, vm = self.agent, self.vm
        self.agent = None
        self._created = False
        if vm is not None and vm.running and self.plan.vm.get("autoRemove"):
            # ``run --rm``: the container is removed next, its scratch disk with it; the
            # guest has nothing to tidy or write down that anyone will read.
            with contextlib.suppress(Exception):
                vm.kill()
        if agent is not None and vm is not None and vm.running:
            synced = False
            with contextlib.suppress(Exception):
                synced = bool(agent.call("shutdown", timeout=SHUTDOWN_TIMEOUT).get("synced"))
            if synced:
                # The guest unmounted and synced its disks: nothing left for its own
                # power-off to do but cost time (a kernel shutdown under TCG).
                with contextlib.suppress(Exception):
                    vm.quit(SHUTDOWN_TIMEOUT)
            with contextlib.suppress(Exception):
                vm.wait(SHUTDOWN_TIMEOUT)
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.close()
        if vm is not None:
            vm.close()
            self.vm = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _exec_identity(plan: Plan, user: str) -> Any:
    """``user`` of an exec against the image's files (the host scratch layer, then the
    layers: a vm run's own changes to /etc/passwd are inside its disk, not read here)."""
    from isobox.compute.plan import _layer_file, resolve_user

    layers = [Path(plan.upper), *[Path(p) for p in plan.lower]]
    return resolve_user(user, _layer_file(layers, "etc/passwd"),
                        _layer_file(layers, "etc/group"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


__all__ = ["GUEST_BUNDLE", "VmBackend", "copy_scratch_back", "ensure_scratch_disk",
           "layer_disk", "vm_id", "wait_status"]
