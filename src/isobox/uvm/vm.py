"""One utility VM: a QEMU ``microvm`` child process, its QMP control, its agent channel.

The command line is docs/uvm-design.md section 4, built from the assets and a
:class:`VmConfig`. Choices that matter:

- **The engine listens on the agent socket and QEMU connects** (``server=off``): the host
  end is connected 20-40 ms after spawn, before the guest opens its port, so nothing the
  guest writes is lost and no connect-retry loop races the guest. (A restored clone
  reconnects the same way.)
- **QMP through ``qemu.qmp``** (asyncio) on a private event loop in a daemon thread, so the
  engine's threads call it synchronously; QEMU serves QMP, the engine connects.
- **QEMU in its own session/process group**, stdio and the guest's serial console to
  ``console.log`` in the VM's run folder, signalled through a pidfd (never a pid that
  may have been reused).
- **A watcher thread reaps QEMU** whatever ends it (``quit``, kill -9 from outside, a guest
  panic with ``panic=-1`` + ``-no-reboot``), records an :class:`ExitInfo` with the console
  tail, and removes every file and socket the VM made; ``on_exit`` callbacks then run.

Run folder: ``$ISOBOX_RUN/uvm/<id>/`` with ``agent.sock``, ``qmp.sock``, ``console.log``
and ``qemu.pid`` (so a restarted engine can tell whose QEMU is still running).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from isobox.errors import (
    Conflict,
    InvalidArgument,
    VmError,
    WaitTimeout,
    from_oserror,
)
from isobox.paths import run_dir
from isobox.uvm.accel import AccelName, AccelResult, accel_args, probe, qemu_binary

IMAGE_SERIAL = "uvm"  # the utility-VM image disk; the initramfs finds it by this serial
AGENT_PORT = "agent"  # the virtserialport name the guest agent looks up in sysfs
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SERIAL = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")  # virtio-blk serials are 20 bytes
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")  # 9p mount_tag limit
_SUN_PATH_MAX = 107
_CONSOLE_TAIL = 4096


class BootAssets(Protocol):
    """What a VM boots (``isobox.uvm.assets.Assets`` fits this)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def image(self) -> Path: ...
    @property
    def cmdline_base(self) -> str: ...


class Disk(NamedTuple):
    """A raw disk file as ``virtio-blk-device,serial=<serial>``; the guest finds it by
    serial (``/sys/block/vd*/serial``), never by its ``vdX`` name."""

    path: Path
    serial: str
    readonly: bool = True


class Share(NamedTuple):
    """A host folder as virtio-9p with ``mount_tag=<tag>``. ``security``: QEMU's
    ``security_model`` — ``none`` (QEMU's own credentials; ownership changes ignored),
    ``passthrough`` (guest root chowns host files), ``mapped-xattr`` (ownership in xattrs)."""

    tag: str
    path: Path
    readonly: bool = True
    security: str = "none"


@dataclass(frozen=True)
class Layout:
    """The fixed device slots of a VM made from a template (docs/uvm-design.md, "Templates
    and clones"). A clone must have exactly its template's devices, so every templated VM
    has ``ro_disks`` read-only disk slots, one writable disk slot, ``shares`` 9p slots
    (tags ``m0``..) and one NIC; an unused disk slot is a ``null-co`` drive reading
    zeros, an unused share an empty read-only folder, an unplugged NIC a hub port with
    nothing else on it. Sizes are part of the layout: the guest reads a disk's size once,
    when the template probes it, so every disk in a slot must have exactly that size."""

    ro_disks: int = 14
    ro_disk_bytes: int = 4 << 30
    rw_disk_bytes: int = 1 << 30
    shares: int = 4
    version: int = 2

    @property
    def share_tags(self) -> list[str]:
        return [f"m{i}" for i in range(self.shares)]


# 3 fixed devices + 1 NIC + 14 + 1 + 4 shares = 23 of microvm's 24 virtio-mmio transports:
# a device on the 24th received nothing here (a NIC there sent frames but never got one).
LAYOUT = Layout()


@dataclass(frozen=True)
class VmConfig:
    """The shape of one VM. Socket paths default to the VM's run folder. ``tap``: an
    existing tap device for a ``virtio-net-device`` (networking). ``cmdline``: appended
    to the assets' kernel command line."""

    memory_mib: int = 512
    cpus: int = 1
    disks: Sequence[Disk] = ()
    shares: Sequence[Share] = ()
    agent_socket: Path | None = None
    qmp_socket: Path | None = None
    tap: str | None = None
    mac: str | None = None
    cmdline: str = ""
    # Templates and clones: ``layout`` gives the fixed slots; ``memory_file`` backs guest
    # RAM with a file (``share=on``: the template writes its RAM there; off: a clone maps
    # it copy-on-write); ``incoming`` starts QEMU waiting for a device state (restore()).
    layout: Layout | None = None
    memory_file: Path | None = None
    memory_shared: bool = False
    incoming: bool = False
    empty_share: Path | None = None  # what an unused share slot exports (an empty folder)

    def __post_init__(self) -> None:
        # Plain ``(path, serial, readonly)`` / ``(tag, path, readonly)`` tuples are welcome.
        object.__setattr__(self, "disks", tuple(
            Disk(Path(d[0]), *d[1:]) for d in self.disks))
        object.__setattr__(self, "shares", tuple(
            Share(s[0], Path(s[1]), *s[2:]) for s in self.shares))

    def validate(self) -> None:
        if not 64 <= self.memory_mib <= 1024 * 1024:
            raise InvalidArgument(f"VM memory {self.memory_mib} MiB: at least 64 MiB")
        if not 1 <= self.cpus <= 255:
            raise InvalidArgument(f"VM vCPUs {self.cpus}: 1 to 255")
        serials = [IMAGE_SERIAL]
        for d in self.disks:
            if not _SERIAL.match(d.serial) or d.serial in serials:
                raise InvalidArgument(f"disk serial {d.serial!r}: unique, [A-Za-z0-9_.-]{{1,20}}"
                                      f" and not {IMAGE_SERIAL!r}")
            serials.append(d.serial)
        tags: list[str] = []
        for s in self.shares:
            if not _TAG.match(s.tag) or s.tag in tags:
                raise InvalidArgument(f"9p share tag {s.tag!r}: unique, [A-Za-z0-9_.-]{{1,31}}")
            if s.security not in ("none", "passthrough", "mapped-xattr", "mapped-file"):
                raise InvalidArgument(f"9p share {s.tag}: security model {s.security!r}")
            tags.append(s.tag)
        if self.tap is not None and not re.match(r"^[A-Za-z0-9_.-]{1,15}$", self.tap):
            raise InvalidArgument(f"tap device name {self.tap!r}")
        if self.incoming and self.memory_file is None:
            raise InvalidArgument("a restored VM needs the template's memory file")
        lay = self.layout
        if lay is not None:
            ro = [d for d in self.disks if d.readonly]
            rw = [d for d in self.disks if not d.readonly]
            if len(ro) > lay.ro_disks or len(rw) > 1 or len(self.shares) > lay.shares:
                raise InvalidArgument(
                    f"a templated VM has {lay.ro_disks} read-only disks, 1 writable disk "
                    f"and {lay.shares} shares; asked for {len(ro)}, {len(rw)}, "
                    f"{len(self.shares)}")
            if self.disks[:len(ro)] != tuple(ro):
                raise InvalidArgument("a templated VM's read-only disks come first")
            for d in self.disks:
                want = lay.ro_disk_bytes if d.readonly else lay.rw_disk_bytes
                try:
                    size = d.path.stat().st_size
                except OSError as exc:
                    raise InvalidArgument(f"disk {d.serial}: {d.path}: {exc.strerror}") from None
                if size != want:
                    raise InvalidArgument(f"disk {d.serial}: {d.path} is {size} bytes; its "
                                          f"slot in a templated VM takes exactly {want}")
            for i, sh in enumerate(self.shares):
                if sh.tag != lay.share_tags[i]:
                    raise InvalidArgument(f"share {i} of a templated VM has the tag "
                                          f"{lay.share_tags[i]!r}, not {sh.tag!r}")
            if len(self.shares) < lay.shares and self.empty_share is None:
                raise InvalidArgument("a templated VM needs an empty folder for unused shares")


@dataclass(frozen=True)
class ExitInfo:
    """How QEMU ended. ``returncode`` as subprocess gives it (negative: killed by that
    signal). ``requested``: the engine asked for it (``quit``/``kill``); an exit nobody
    asked for (kill -9 from outside, a crash) is a failure of the VM."""

    returncode: int
    requested: bool
    console_tail: str
    shutdown: str | None = None  # QMP SHUTDOWN reason: guest-shutdown, guest-reset (a
    #                              panic, with panic=-1 -no-reboot), host-qmp-quit, ...

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def reason(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"QEMU killed by {name}"
        why = f" ({self.shutdown})" if self.shutdown else ""
        return f"QEMU exited {self.returncode}{why}"

    @property
    def failed(self) -> bool:
        """An end the engine must report as an error: QEMU crashed or was killed from
        outside, or the guest panicked (``guest-reset``). A guest that powered itself off
        (``guest-shutdown``) or a quit/kill the engine asked for is not a failure."""
        if self.returncode not in (0, -signal.SIGKILL):
            return True
        return not self.requested and self.shutdown != "guest-shutdown"


def _opt(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


class _Qmp:
    """A synchronous face on ``qemu.qmp.QMPClient``: a private event loop in a daemon
    thread; each call is one coroutine submitted to it. Events are collected from the
    client's default listener into a list that :meth:`wait_event` searches."""

    def __init__(self, nickname: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                         name=f"qmp-{nickname}")
        self._thread.start()
        self._nickname = nickname
        self._client: Any = None
        self._pump: Any = None
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def _call(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def connect(self, path: Path, timeout: float) -> None:
        async def go() -> None:
            from qemu.qmp import QMPClient

            self._client = QMPClient(self._nickname)
            await self._client.connect(str(path))
            self._pump = asyncio.ensure_future(self._pump_events())

        self._call(go(), timeout)

    async def _pump_events(self) -> None:
        async for event in self._client.events:
            with self._cond:
                self._events.append(dict(event))
                self._cond.notify_all()

    def execute(self, cmd: str, args: dict[str, Any] | None, timeout: float) -> Any:
        return self._call(self._client.execute(cmd, args), timeout)

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                   alive: Callable[[], bool]) -> dict[str, Any] | None:
        """The first event (seen since connect) for which ``pred`` holds; None when
        ``timeout`` passes or ``alive()`` turns false."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for ev in self._events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self._events)
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return None
                self._cond.wait(min(left, 0.1))

    def shutdown_reason(self) -> str | None:
        """The reason of the last SHUTDOWN event QEMU sent, if any."""
        with self._cond:
            for ev in reversed(self._events):
                if ev.get("event") == "SHUTDOWN":
                    return str(ev.get("data", {}).get("reason", "")) or None
        return None

    def close(self) -> None:
        async def go() -> None:
            if self._pump is not None:
                self._pump.cancel()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.disconnect()

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(go(), 5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(5.0)
        if not self._loop.is_running():
            self._loop.close()


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    exited: threading.Event = field(default_factory=threading.Event)
    exit: ExitInfo | None = None
    requested: bool = False
    cleaned: bool = False
    callbacks: list[Callable[[ExitInfo], None]] = field(default_factory=list)


class UtilityVM:
    """One utility VM. ``start()`` spawns QEMU and returns once QEMU's agent channel is
    connected and QMP answers; ``quit()``/``kill()``/``close()`` end it; a death from
    outside is noticed by the watcher thread (``exit_info``, ``on_exit``). Every file the
    VM made is gone once it has ended. Use as a context manager to never leak one."""

    def __init__(self, vm_id: str, assets: BootAssets, config: VmConfig | None = None, *,
                 accel: AccelResult | AccelName | None = None,
                 run_root: Path | None = None) -> None:
        if not _ID.match(vm_id):
            raise InvalidArgument(f"VM id {vm_id!r}: [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}")
        self.id = vm_id
        self.assets = assets
        self.config = config or VmConfig()
        self.config.validate()
        self._accel = accel
        self.run_dir = (run_root or run_dir() / "uvm") / vm_id
        self.agent_socket_path = self.config.agent_socket or self.run_dir / "agent.sock"
        self.qmp_socket_path = self.config.qmp_socket or self.run_dir / "qmp.sock"
        self.console_path = self.run_dir / "console.log"
        self.pid_path = self.run_dir / "qemu.pid"  # for crash recovery: whose VM is this
        # A run folder too deep for sun_path (108 bytes) is reached through a descriptor of
        # it, by its number in /proc/self/fd, which QEMU inherits with the same number.
        self._long = any(len(os.fsencode(p)) > _SUN_PATH_MAX
                         for p in (self.agent_socket_path, self.qmp_socket_path))
        if self._long and not all(p.parent == self.run_dir for p in (
                self.agent_socket_path, self.qmp_socket_path)):
            raise InvalidArgument("socket path too long for a unix socket: "
                                  f"{self.agent_socket_path}, {self.qmp_socket_path}")
        self._dirfd = -1
        self.agent: socket.socket | None = None  # the connected agent channel, after start()
        self.connect_seconds: float | None = None  # spawn -> QEMU connected the agent socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._listener: socket.socket | None = None
        self._qmp: _Qmp | None = None
        self._made: list[Path] = []
        self._made_dir = False
        self._st = _State()
        self._watcher: threading.Thread | None = None
        self.started_at = 0.0

    # -- command line ---------------------------------------------------------------

    @property
    def accel_name(self) -> AccelName:
        if self._accel is None:
            self._accel = probe(assets=self.assets)
        return self._accel if isinstance(self._accel, str) else self._accel.name

    def _sock(self, path: Path) -> str:
        """The name to bind or connect ``path`` by (in this process and in QEMU)."""
        if self._dirfd >= 0:
            return f"/proc/self/fd/{self._dirfd}/{path.name}"
        return str(path)

    def argv(self) -> list[str]:
        """The full QEMU command line (docs/uvm-design.md section 4)."""
        c = self.config
        cmdline = " ".join(x for x in (self.assets.cmdline_base, c.cmdline) if x)
        machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
        mem: list[str] = []
        if c.memory_file is not None:
            machine += ",memory-backend=ram0"
            share = "on" if c.memory_shared else "off"
            mem = ["-object", f"memory-backend-file,id=ram0,size={c.memory_mib}M,"
                              f"mem-path={_opt(c.memory_file)},share={share}"]
        argv = [
            qemu_binary(), "-name", _opt(f"isobox-{self.id}"),
            "-M", machine, *mem,
            *accel_args(self.accel_name),
            "-m", str(c.memory_mib), "-smp", str(c.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-pidfile", str(self.pid_path),
            "-kernel", str(self.assets.kernel), "-initrd", str(self.assets.initrd),
            "-append", cmdline,
            "-chardev", f"file,id=console,path={_opt(self.console_path)},append=on",
            "-serial", "chardev:console",
            "-qmp", f"unix:{_opt(self._sock(self.qmp_socket_path))},server=on,wait=off",
            "-drive", f"id=img,file={_opt(self.assets.image)},format=raw,if=none,"
                      "readonly=on,cache=unsafe",
            "-device", f"virtio-blk-device,drive=img,serial={IMAGE_SERIAL}",
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=agent,path={_opt(self._sock(self.agent_socket_path))},"
                        "server=off",
            "-device", f"virtserialport,id={AGENT_PORT},chardev=agent,name={AGENT_PORT}",
            "-device", "virtio-rng-device",
        ]
        disks: list[Disk | None] = list(c.disks)
        shares: list[Share | None] = list(c.shares)
        lay = c.layout
        if lay is not None:  # every slot, in a fixed order: see Layout
            ro_disks = [d for d in c.disks if d.readonly]
            rw_disks = [d for d in c.disks if not d.readonly]
            disks = [*ro_disks, *[None] * (lay.ro_disks - len(ro_disks)),
                     rw_disks[0] if rw_disks else None]
            shares = [*c.shares, *[None] * (lay.shares - len(c.shares))]
        # The NIC right after the fixed devices: on microvm the last of its 24 virtio-mmio
        # transports never delivered a received frame here (measured: a NIC in slot 24
        # sent but received nothing; in slot 4 it works).
        mac = f",mac={c.mac}" if c.mac else ""
        if c.tap is not None:
            # A templated NIC speaks no vnet header: the template's NIC had a hub port
            # behind it (none), and a clone's device state says so whatever its peer.
            hdr = ",vnet_hdr=off" if lay is not None else ""
            argv += ["-netdev", f"tap,id=net0,ifname={c.tap},script=no,downscript=no{hdr}",
                     "-device", f"virtio-net-device,netdev=net0{mac}"]
        elif lay is not None:  # the NIC slot unplugged: a hub port that leads nowhere
            argv += ["-netdev", "hubport,id=net0,hubid=0",
                     "-device", f"virtio-net-device,netdev=net0{mac}"]
        for i, d in enumerate(disks):
            if d is None:  # an unused slot: zeros, nothing on the host behind it
                assert lay is not None
                last = i == len(disks) - 1
                size = lay.rw_disk_bytes if last else lay.ro_disk_bytes
                ro = "" if last else ",readonly=on"
                argv += ["-drive", f"id=disk{i},driver=null-co,size={size},read-zeroes=on,"
                                   f"if=none{ro}",
                         "-device", f"virtio-blk-device,drive=disk{i},serial=empty{i}"]
                continue
            # A read-only disk is shared content (layers): no cache coherence to keep. A
            # writable one (scratch) honours the guest's flushes: it outlives the VM.
            cache = "unsafe" if d.readonly else "writeback,discard=unmap"
            ro = ",readonly=on" if d.readonly else ""
            argv += ["-drive", f"id=disk{i},file={_opt(d.path)},format=raw,if=none,"
                               f"cache={cache}{ro}",
                     "-device", f"virtio-blk-device,drive=disk{i},serial={d.serial}"]
        for i, slot in enumerate(shares):
            if slot is None:
                assert lay is not None and c.empty_share is not None
            sh = slot or Share(lay.share_tags[i] if lay else "", c.empty_share or Path("/"),
                               True, "none")
            ro = ",readonly=on" if sh.readonly else ""
            argv += ["-fsdev", f"local,id=fs{i},path={_opt(sh.path)},"
                               f"security_model={sh.security}{ro}",
                     "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={sh.tag}"]
        if c.incoming:
            argv += ["-incoming", "defer"]
        return argv

    # -- life cycle -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VmError(f"VM {self.id} was not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._st.exited.is_set()

    @property
    def exit_info(self) -> ExitInfo | None:
        return self._st.exit

    def on_exit(self, callback: Callable[[ExitInfo], None]) -> None:
        """Call ``callback(exit_info)`` (from the watcher thread) once QEMU has ended and
        the VM's files are gone; at once if that already happened."""
        with self._st.lock:
            if self._st.exit is None:
                self._st.callbacks.append(callback)
                return
            info = self._st.exit
        callback(info)

    def start(self, timeout: float = 30.0) -> float:
        """Spawn QEMU; return once it has connected the agent channel and QMP answers.
        Returns the seconds from spawn to the agent channel connected. On any failure
        QEMU is killed, everything is removed, and :class:`VmError` says why."""
        if self._proc is not None:
            raise Conflict(f"VM {self.id} was already started")
        self._make_run_dir()
        if self._long:
            self._dirfd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            argv = self.argv()
            for p in (self.agent_socket_path, self.qmp_socket_path):
                if p.exists() or p.is_symlink():
                    raise Conflict(f"VM {self.id}: {p} exists (another VM's socket?)")
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._listener.bind(self._sock(self.agent_socket_path))
            self._made.append(self.agent_socket_path)
            self._listener.listen(1)
            self._made += [self.qmp_socket_path, self.console_path, self.pid_path]
            console = os.open(self.console_path,
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                self.started_at = time.monotonic()
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                    start_new_session=True, pass_fds=(self._dirfd,) if self._dirfd >= 0 else ())
            finally:
                os.close(console)
        except OSError as exc:
            self._cleanup_files()
            raise from_oserror("start utility VM", self.id, exc) from exc
        except BaseException:
            self._cleanup_files()
            raise
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name=f"uvm-{self.id}")
        self._watcher.start()
        try:
            self._accept_agent(timeout)
            self._connect_qmp(self.started_at + timeout - time.monotonic())
        except BaseException as exc:
            self._kill(requested=True)
            self._st.exited.wait(10.0)
            info = self._st.exit
            if isinstance(exc, VmError | WaitTimeout):
                raise
            tail = info.console_tail[-600:] if info else ""
            raise VmError(f"VM {self.id} failed to start: {exc}\n{tail}") from exc
        assert self.connect_seconds is not None
        return self.connect_seconds

    def _make_run_dir(self) -> None:
        for _ in range(5):
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.run_dir.mkdir(mode=0o700)
            except FileNotFoundError:
                continue  # a VM ending just now removed the empty parent: again
            except FileExistsError:
                raise Conflict(f"VM {self.id}: run folder {self.run_dir} exists") from None
            self._made_dir = True
            return
        raise VmError(f"VM {self.id}: cannot make {self.run_dir}")

    def _dead(self, what: str) -> VmError:
        self._st.exited.wait(10.0)
        info = self._st.exit
        if info is None:
            return VmError(f"VM {self.id}: {what}")
        return VmError(f"VM {self.id}: {what}: {info.reason}\n{info.console_tail[-800:]}")

    def _accept_agent(self, timeout: float) -> None:
        assert self._listener is not None
        deadline = self.started_at + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"VM {self.id}: QEMU did not connect the agent channel "
                                  f"within {timeout:g} s")
            lfd = self._listener.fileno()
            ready, _, _ = select.select([lfd, self._pidfd], [], [], left)
            if self._pidfd in ready or self._st.exited.is_set():
                raise self._dead("QEMU exited before connecting the agent channel")
            if lfd in ready:
                conn, _ = self._listener.accept()
                self.connect_seconds = time.monotonic() - self.started_at
                conn.set_inheritable(False)
                self.agent = conn
                # One connection, ever: QEMU's; the listening socket can go.
                self._listener.close()
                self._listener = None
                return

    def _connect_qmp(self, timeout: float) -> None:
        deadline = time.monotonic() + max(timeout, 1.0)
        qmp = _Qmp(f"isobox-{self.id}")
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._st.exited.is_set():
                qmp.close()
                raise self._dead("QEMU exited before QMP answered")
            if self.qmp_socket_path.exists():
                try:
                    qmp.connect(Path(self._sock(self.qmp_socket_path)),
                                max(deadline - time.monotonic(), 0.1))
                    self._qmp = qmp
                    return
                except Exception as exc:
                    last = exc
            time.sleep(0.01)
        qmp.close()
        raise WaitTimeout(f"VM {self.id}: QMP did not answer: {last}")

    def _watch(self) -> None:
        """Reap QEMU whatever ends it, then clean up and tell whoever listens."""
        proc = self._proc
        assert proc is not None
        rc = proc.wait()
        tail = ""
        with contextlib.suppress(OSError), open(self.console_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - _CONSOLE_TAIL, 0))
            tail = fh.read().decode(errors="replace")
        with self._st.lock:
            qmp = self._qmp
            info = ExitInfo(rc, self._st.requested, tail,
                            qmp.shutdown_reason() if qmp is not None else None)
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
        self._cleanup_files()
        with self._st.lock:
            self._st.exit = info
            callbacks, self._st.callbacks = self._st.callbacks, []
        self._st.exited.set()
        for cb in callbacks:
            with contextlib.suppress(Exception):
                cb(info)

    def _cleanup_files(self) -> None:
        with self._st.lock:
            if self._st.cleaned:
                return
            self._st.cleaned = True
            qmp, self._qmp = self._qmp, None
            agent, self.agent = self.agent, None
            listener, self._listener = self._listener, None
        if qmp is not None:
            qmp.close()
        for s in (agent, listener):
            if s is not None:
                s.close()
        for p in self._made:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self._dirfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dirfd)
            self._dirfd = -1
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
            with contextlib.suppress(OSError):
                self.run_dir.parent.rmdir()  # only if no other VM's folder is in it

    def _kill(self, requested: bool, sig: int = signal.SIGKILL) -> None:
        with self._st.lock:
            if requested:
                self._st.requested = True
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)

    def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait for QEMU to end (and the clean-up to finish)."""
        if self._proc is None:
            raise VmError(f"VM {self.id} was not started")
        if not self._st.exited.wait(timeout):
            raise WaitTimeout(f"VM {self.id}: QEMU still running after {timeout} s")
        assert self._st.exit is not None
        return self._st.exit

    def kill(self) -> ExitInfo:
        """SIGKILL QEMU and wait for the clean-up."""
        self._kill(requested=True)
        return self.wait(30.0)

    def quit(self, timeout: float = 10.0) -> ExitInfo:
        """QMP ``quit`` (QEMU exits 0 at once; the guest is not asked). SIGKILL if QEMU is
        still there after ``timeout``."""
        if not self.running:
            return self.wait(30.0)
        with self._st.lock:
            self._st.requested = True
        with contextlib.suppress(Exception):
            self.qmp("quit", timeout=timeout)
        try:
            return self.wait(timeout)
        except WaitTimeout:
            return self.kill()

    def close(self) -> None:
        """End the VM if it runs (SIGKILL) and remove what it made; idempotent."""
        if self.running:
            self.kill()
        elif self._proc is None:
            self._cleanup_files()

    def __enter__(self) -> UtilityVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control --------------------------------------------------------------------

    def qmp(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command; its ``return`` value. QEMU's refusals raise VmError."""
        qmp = self._qmp
        if qmp is None or not self.running:
            raise self._dead(f"QMP {cmd}: the VM is not running")
        from qemu.qmp import QMPError

        try:
            return qmp.execute(cmd, args, timeout)
        except TimeoutError:
            raise WaitTimeout(f"VM {self.id}: QMP {cmd} took over {timeout} s") from None
        except QMPError as exc:
            if not self.running or cmd == "quit":
                raise self._dead(f"QMP {cmd}") from exc
            raise VmError(f"VM {self.id}: QMP {cmd}: {exc}") from exc

    def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``shutdown``, ..."""
        return str(self.qmp("query-status")["status"])

    def pause(self) -> None:
        """Freeze every vCPU (QMP ``stop``): the guest sees time jump, nothing else."""
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    def wait_event(self, name: str, timeout: float,
                   match: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The first QMP event ``name`` since start (optionally matching ``match``)."""
        qmp = self._qmp
        if qmp is None:
            raise self._dead(f"wait for {name}: the VM is not running")

        def pred(ev: dict[str, Any]) -> bool:
            return bool(ev.get("event") == name and (match is None or match(ev)))

        ev = qmp.wait_event(pred, timeout, lambda: self.running)
        if ev is None:
            if not self.running:
                raise self._dead(f"waiting for {name}")
            raise WaitTimeout(f"VM {self.id}: no {name} event within {timeout:g} s")
        return ev

    def wait_port_open(self, timeout: float = 60.0) -> float:
        """Wait until the guest opens the agent port (QMP ``VSERPORT_CHANGE`` open=true):
        the guest is up and its agent listening, whatever protocol it speaks. Returns the
        seconds since spawn."""
        self.wait_event("VSERPORT_CHANGE", timeout,
                        lambda ev: bool(ev.get("data", {}).get("open")))
        return time.monotonic() - self.started_at

    # -- templates and clones ---------------------------------------------------------

    def _migration_done(self, what: str, timeout: float) -> float:
        """Poll ``query-migrate`` until it completes (a destination sends no event).
        Returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            info = self.qmp("query-migrate", timeout=timeout)
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return time.monotonic() - started
            if status in ("failed", "cancelled"):
                raise VmError(f"VM {self.id}: {what} {status}: "
                              f"{info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise WaitTimeout(f"VM {self.id}: {what} not done within {timeout:g} s "
                                  f"({status})")
            time.sleep(0.002)

    def save_state(self, path: Path, timeout: float = 60.0) -> float:
        """Pause the guest and write its device state to ``path`` (QMP ``stop`` +
        ``migrate`` with ``x-ignore-shared``: RAM in a shared memory file is not copied,
        it *is* the file). The VM stays paused. Returns the seconds it took."""
        if self.config.memory_file is None or not self.config.memory_shared:
            raise InvalidArgument(f"VM {self.id}: only a VM with shared file memory can "
                                  "be saved as a template")
        if "'" in str(path):
            raise InvalidArgument(f"state file path {path!r}: no quote allowed")
        started = time.monotonic()
        self.qmp("stop")
        self.qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        self.qmp("migrate", {"uri": f"exec:cat > '{path}'"})
        self._migration_done("saving the device state", timeout)
        return time.monotonic() - started

    def restore(self, state: Path, timeout: float = 60.0) -> float:
        """A VM started with ``incoming``: load the template's device state (its RAM is
        the memory file, mapped copy-on-write) and let it run. Returns the seconds."""
        if not self.config.incoming:
            raise InvalidArgument(f"VM {self.id} was not started to restore a state")
        if "'" in str(state):
            raise InvalidArgument(f"state file path {state!r}: no quote allowed")
        started = time.monotonic()
        self.qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        self.qmp("migrate-incoming", {"uri": f"exec:cat '{state}'"})
        self._migration_done("restoring the template", timeout)
        self.qmp("cont")  # the template was saved paused
        return time.monotonic() - started
