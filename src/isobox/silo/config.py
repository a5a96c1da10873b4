"""The internal description of a silo: plain values, already resolved and checked.

A :class:`SiloConfig` is what the container init acts on. It is made from an OCI runtime
config (``from_oci``), by a pure conversion tested on its own: paths made absolute, mount
options turned into flags, capability names into masks, rlimit names into numbers. The init
then never parses anything.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isobox._sys import linux as L
from isobox.errors import InvalidDocument, IsoboxError
from isobox.jobs.cgroup import DEFAULT_DEVICE_RULES, DeviceRule
from isobox.jobs.limits import IoLimit, Limits

# mount option -> (flags to set, flags to clear); as mount(8) and runc understand them
_MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (L.MS_RDONLY, 0), "rw": (0, L.MS_RDONLY),
    "nosuid": (L.MS_NOSUID, 0), "suid": (0, L.MS_NOSUID),
    "nodev": (L.MS_NODEV, 0), "dev": (0, L.MS_NODEV),
    "noexec": (L.MS_NOEXEC, 0), "exec": (0, L.MS_NOEXEC),
    "sync": (L.MS_SYNCHRONOUS, 0), "async": (0, L.MS_SYNCHRONOUS),
    "dirsync": (L.MS_DIRSYNC, 0), "remount": (L.MS_REMOUNT, 0),
    "mand": (L.MS_MANDLOCK, 0), "nomand": (0, L.MS_MANDLOCK),
    "atime": (0, L.MS_NOATIME), "noatime": (L.MS_NOATIME, 0),
    "diratime": (0, L.MS_NODIRATIME), "nodiratime": (L.MS_NODIRATIME, 0),
    "relatime": (L.MS_RELATIME, 0), "norelatime": (0, L.MS_RELATIME),
    "strictatime": (L.MS_STRICTATIME, 0), "nostrictatime": (0, L.MS_STRICTATIME),
    "bind": (L.MS_BIND, 0), "rbind": (L.MS_BIND | L.MS_REC, 0),
    "nosymfollow": (L.MS_NOSYMFOLLOW, 0),
}
_PROPAGATION = {
    "private": L.MS_PRIVATE, "rprivate": L.MS_PRIVATE | L.MS_REC,
    "shared": L.MS_SHARED, "rshared": L.MS_SHARED | L.MS_REC,
    "slave": L.MS_SLAVE, "rslave": L.MS_SLAVE | L.MS_REC,
    "unbindable": L.MS_UNBINDABLE, "runbindable": L.MS_UNBINDABLE | L.MS_REC,
}
_RLIMITS = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}

# Docker's default capability set, which the engine gives a container unless told otherwise.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


@dataclass
class Mount:
    destination: str
    type: str
    source: str
    flags: int = 0
    propagation: int = 0
    data: str = ""

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & L.MS_BIND)


@dataclass
class Device:
    path: str
    type: str  # "c" | "b" | "p"
    major: int
    minor: int
    mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclass
class Process:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    umask: int | None = None
    terminal: bool = False
    bounding: int = 0
    effective: int = 0
    permitted: int = 0
    inheritable: int = 0
    ambient: int = 0
    no_new_privileges: bool = True
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)
    oom_score_adj: int | None = None
    seccomp: dict[str, Any] | None = None


@dataclass
class Hook:
    path: str
    args: list[str]
    env: list[str]
    timeout: int | None = None


@dataclass
class SiloConfig:
    root: str
    process: Process
    readonly_root: bool = False
    hostname: str | None = None
    domainname: str | None = None
    namespaces: list[tuple[str, str | None]] = field(default_factory=list)
    uid_map: list[tuple[int, int, int]] = field(default_factory=list)
    gid_map: list[tuple[int, int, int]] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    rootfs_propagation: int = L.MS_PRIVATE | L.MS_REC
    hooks: dict[str, list[Hook]] = field(default_factory=dict)
    cgroups_path: str | None = None
    limits: Limits = field(default_factory=Limits)
    device_rules: list[DeviceRule] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)

    def new_namespace(self, kind: str) -> bool:
        return any(t == kind and p is None for t, p in self.namespaces)

    def has_namespace(self, kind: str) -> bool:
        return any(t == kind for t, _ in self.namespaces)


def mount_flags(options: list[str]) -> tuple[int, int, str]:
    """(flags, propagation, data) from mount(8)-style options."""
    flags = 0
    prop = 0
    data: list[str] = []
    for opt in options:
        if opt in _MOUNT_FLAGS:
            on, off = _MOUNT_FLAGS[opt]
            flags = (flags | on) & ~off
        elif opt in _PROPAGATION:
            prop |= _PROPAGATION[opt]
        elif opt in ("defaults", ""):
            continue
        else:
            data.append(opt)
    return flags, prop, ",".join(data)


def rlimit_number(name: str) -> int:
    num = _RLIMITS.get(name.upper())
    if num is None:
        raise InvalidDocument(f"process.rlimits: unknown rlimit {name!r}")
    return int(num)


def cap_masks(caps: dict[str, list[str]] | None) -> dict[str, int]:
    caps = caps or {}
    return {k: L.cap_mask(caps.get(k) or []) for k in
            ("bounding", "effective", "permitted", "inheritable", "ambient")}


def from_oci(cfg: Any, bundle: Path) -> SiloConfig:
    """Convert a parsed OCI runtime config (``isobox.spec.runtime``) for the init."""
    if cfg.process is None:
        raise InvalidDocument("config.json: process is required to create a container")
    root = Path(cfg.root.path if cfg.root else "rootfs")
    root = root if root.is_absolute() else (bundle / root)
    p = cfg.process
    caps = cap_masks(p.capabilities.model_dump(exclude_none=True) if p.capabilities else None)
    user = p.user
    proc = Process(
        args=list(p.args or []),
        env=list(p.env or []),
        cwd=p.cwd or "/",
        uid=user.uid if user else 0,
        gid=user.gid if user else 0,
        additional_gids=list(user.additional_gids or []) if user else [],
        umask=user.umask if user else None,
        terminal=bool(p.terminal),
        rlimits=[(rlimit_number(r.type), r.soft, r.hard) for r in (p.rlimits or [])],
        no_new_privileges=bool(p.no_new_privileges),
        oom_score_adj=p.oom_score_adj,
        bounding=caps["bounding"], effective=caps["effective"], permitted=caps["permitted"],
        inheritable=caps["inheritable"], ambient=caps["ambient"],
    )
    linux = cfg.linux
    mounts: list[Mount] = []
    for m in cfg.mounts or []:
        flags, prop, data = mount_flags(list(m.options or []))
        mtype = m.type or ("bind" if flags & L.MS_BIND else "")
        if mtype == "bind":
            flags |= L.MS_BIND
        dest = m.destination if m.destination.startswith("/") else "/" + m.destination
        src = m.source or mtype
        if flags & L.MS_BIND and not os.path.isabs(src):
            src = str(bundle / src)
        mounts.append(Mount(dest, mtype, src, flags, prop, data))
    silo = SiloConfig(
        root=str(os.path.realpath(root)),
        process=proc,
        readonly_root=bool(cfg.root.readonly) if cfg.root else False,
        hostname=cfg.hostname,
        domainname=getattr(cfg, "domainname", None),
        mounts=mounts,
        annotations=dict(cfg.annotations or {}),
    )
    if linux is not None:
        silo.namespaces = [(ns.type, ns.path) for ns in linux.namespaces or []]
        silo.uid_map = [(m.container_id, m.host_id, m.size) for m in linux.uid_mappings or []]
        silo.gid_map = [(m.container_id, m.host_id, m.size) for m in linux.gid_mappings or []]
        silo.devices = [
            Device(d.path, d.type, d.major or 0, d.minor or 0,
                   d.file_mode if d.file_mode is not None else 0o666, d.uid or 0, d.gid or 0)
            for d in linux.devices or []
        ]
        silo.masked_paths = list(linux.masked_paths or [])
        silo.readonly_paths = list(linux.readonly_paths or [])
        silo.sysctl = dict(linux.sysctl or {})
        check_sysctls(silo)
        if linux.rootfs_propagation:
            silo.rootfs_propagation = _PROPAGATION[linux.rootfs_propagation]
        silo.cgroups_path = linux.cgroups_path
        if linux.seccomp is not None:
            proc.seccomp = linux.seccomp.model_dump(by_alias=True, exclude_none=True)
        silo.limits = limits_from_oci(linux.resources)
        silo.device_rules = device_rules_from_oci(linux.resources, silo.devices)
    if cfg.hooks is not None:
        for kind in ("prestart", "create_runtime", "create_container", "start_container",
                     "poststart", "poststop"):
            hooks = getattr(cfg.hooks, kind, None) or []
            silo.hooks[kind] = [Hook(h.path, list(h.args or [h.path]), list(h.env or []),
                                     h.timeout) for h in hooks]
    return silo


# Namespaced sysctls, as runc's validation accepts them: the IPC ones (and fs.mqueue.*) need
# the container's own IPC namespace, kernel.hostname/domainname its own UTS namespace, net.*
# its own network namespace. Anything else (vm.*, kernel.core_pattern, ...) is host-global:
# the init writes it as root, so it would change the host.
_IPC_SYSCTLS = frozenset({
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
    "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
})
_UTS_SYSCTLS = frozenset({"kernel.hostname", "kernel.domainname"})


def _own_namespace(silo: SiloConfig, kind: str) -> bool:
    """The container gets a namespace of ``kind`` that is not the runtime's (the host's)."""
    for t, path in silo.namespaces:
        if t != kind:
            continue
        if path is None:
            return True
        try:
            theirs = os.stat(path)
            ours = os.stat(f"/proc/self/ns/{L.NAMESPACE_FILES[kind]}")
        except OSError:
            return True  # checked again (and refused) when the init joins it
        return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
    return False


def check_sysctls(silo: SiloConfig) -> None:
    """Refuse a sysctl that is not namespaced, or whose namespace is the host's."""
    for raw in silo.sysctl:
        key = raw.replace("/", ".")
        if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
            need = "ipc"
        elif key in _UTS_SYSCTLS:
            need = "uts"
        elif key.startswith("net."):
            need = "network"
        else:
            raise InvalidDocument(f"linux.sysctl: {raw!r} is not a namespaced sysctl: it "
                                  "would change the host")
        if not _own_namespace(silo, need):
            raise InvalidDocument(f"linux.sysctl: {raw!r} needs the container's own {need} "
                                  "namespace (it would change the host's)")


def device_rules_from_oci(res: Any, devices: list[Device]) -> list[DeviceRule]:
    """The config's device-cgroup rules, then access to the default nodes and to the
    devices the config creates (as runc does)."""
    rules: list[DeviceRule] = []
    for d in (res.devices if res is not None else None) or []:
        rules.append(DeviceRule(bool(d.allow), d.type or "a", d.major, d.minor,
                                d.access or "rwm"))
    rules.extend(DEFAULT_DEVICE_RULES)
    rules.extend(DeviceRule(True, d.type if d.type != "u" else "c", d.major, d.minor, "rwm")
                 for d in devices if d.type in ("c", "b", "u"))
    return rules


def limits_from_oci(res: Any) -> Limits:
    """``linux.resources`` as Job limits (what isobox.jobs can enforce)."""
    if res is None:
        return Limits()
    ncpu = os.cpu_count() or 1
    cpu_rate = weight = memory = pids = None
    cpuset = None
    if res.cpu is not None:
        if res.cpu.quota and res.cpu.quota > 0:
            period = res.cpu.period or 100_000
            cpu_rate = max(1, min(10000, round(res.cpu.quota / period / ncpu * 10000)))
        if res.cpu.shares:
            weight = max(1, min(10000, res.cpu.shares * 100 // 1024))
        cpuset = res.cpu.cpus or None
    if res.memory is not None and res.memory.limit and res.memory.limit > 0:
        memory = res.memory.limit
    if res.pids is not None and res.pids.limit and res.pids.limit > 0:
        pids = res.pids.limit
    io: list[IoLimit] = []
    if res.block_io is not None:
        for attr, key in (("throttle_read_bps_device", "read_bps"),
                          ("throttle_write_bps_device", "write_bps"),
                          ("throttle_read_iops_device", "read_iops"),
                          ("throttle_write_iops_device", "write_iops")):
            for dev in getattr(res.block_io, attr, None) or []:
                io.append(IoLimit(f"{dev.major}:{dev.minor}", **{key: dev.rate}))
    return Limits(cpu_rate=cpu_rate, cpu_weight=weight, memory=memory, pids=pids,
                  cpuset=cpuset, io=tuple(io))


# ---- plain JSON (the utility VM's agent receives a SiloConfig this way) --------------------

# Scalar annotations from_json checks; anything else has a converter below.
_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,), "str": (str,), "bool": (bool,), "int | None": (int, type(None)),
    "str | None": (str, type(None)), "list[str]": (list,), "list[int]": (list,),
    "dict[str, str]": (dict,), "dict[str, Any] | None": (dict, type(None)),
}


def to_json(cfg: SiloConfig) -> dict[str, Any]:
    """``cfg`` as plain JSON values (tuples become lists), for :func:`from_json`.

    Why: the guest agent in a utility VM has no pydantic and no OCI parser; the host
    converts the OCI config (``from_oci``) and sends the result as this document."""
    from dataclasses import asdict

    out = asdict(cfg)
    out["limits"]["clamped"] = list(cfg.limits.clamped)
    return out


def _scalar(value: Any, annotation: str, path: str) -> Any:
    kinds = _SCALARS.get(annotation)
    if kinds is None:
        raise InvalidDocument(f"{path}: cannot read a field of type {annotation}", path)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise InvalidDocument(f"{path}: expected {annotation}, got {type(value).__name__}",
                              path)
    if annotation in ("list[str]", "list[int]", "dict[str, str]"):
        inner = (int,) if annotation == "list[int]" else (str,)
        items = value.values() if isinstance(value, dict) else value
        if not all(isinstance(v, inner) and not isinstance(v, bool) for v in items):
            raise InvalidDocument(f"{path}: expected {annotation}", path)
        return dict(value) if isinstance(value, dict) else list(value)
    return value


def _tuples(value: Any, path: str, shape: tuple[tuple[type, ...], ...]) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidDocument(f"{path}: expected a list", path)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != len(shape) or not all(
                isinstance(v, k) and not (isinstance(v, bool) and bool not in k)
                for v, k in zip(item, shape, strict=True)):
            raise InvalidDocument(f"{path}[{i}]: expected a list of {len(shape)} values",
                                  f"{path}[{i}]")
        out.append(tuple(item))
    return out


def _object(cls: Any, data: Any, path: str, conv: dict[str, Any] | None = None) -> Any:
    """``cls(**data)``, each field checked (or converted by ``conv[name](value, path)``);
    unknown fields are refused, missing ones take their defaults."""
    from dataclasses import MISSING, fields

    if not isinstance(data, dict):
        raise InvalidDocument(f"{path or 'config'}: expected an object", path or None)
    conv = conv or {}
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise InvalidDocument(f"{path}.{key}: unknown field".lstrip("."),
                                  f"{path}.{key}".lstrip("."))
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        where = f"{path}.{name}".lstrip(".")
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InvalidDocument(f"{where}: missing", where)
            continue
        fn = conv.get(name)
        kwargs[name] = fn(data[name], where) if fn else _scalar(data[name], str(f.type),
                                                                 where)
    try:
        return cls(**kwargs)
    except IsoboxError as exc:
        raise InvalidDocument(f"{path or 'config'}: {exc}", path or None) from exc


def _list_of(cls: Any, conv: dict[str, Any] | None = None) -> Any:
    def build(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise InvalidDocument(f"{path}: expected a list", path)
        return [_object(cls, v, f"{path}[{i}]", conv) for i, v in enumerate(value)]
    return build


def _limits(value: Any, path: str) -> Limits:
    io = _list_of(IoLimit)
    limits: Limits = _object(Limits, value, path, {
        "io": lambda v, p: tuple(io(v, p)),
        "clamped": lambda v, p: tuple(_scalar(v, "list[str]", p)),
        "cpuset": lambda v, p: _scalar(v, "str | None", p),
    })
    try:
        return limits.validate()
    except IsoboxError as exc:
        raise InvalidDocument(f"{path}: {exc}", path) from exc


def _hooks(value: Any, path: str) -> dict[str, list[Hook]]:
    if not isinstance(value, dict):
        raise InvalidDocument(f"{path}: expected an object", path)
    return {k: _list_of(Hook)(v, f"{path}.{k}") for k, v in value.items()}


def _namespaces(value: Any, path: str) -> list[tuple[str, str | None]]:
    return _tuples(value, path, ((str,), (str, type(None))))


_INT = (int,)


def from_json(data: Any) -> SiloConfig:
    """The :class:`SiloConfig` that :func:`to_json` wrote; every field is checked and an
    unknown one refused (:class:`InvalidDocument` names it), so a guest never acts on a
    half-understood document."""
    process = {"rlimits": lambda v, p: _tuples(v, p, (_INT, _INT, _INT))}
    idmap = lambda v, p: _tuples(v, p, (_INT, _INT, _INT))  # noqa: E731
    return _object(SiloConfig, data, "", {  # type: ignore[no-any-return]
        "process": lambda v, p: _object(Process, v, p, process),
        "namespaces": _namespaces,
        "uid_map": idmap, "gid_map": idmap,
        "mounts": _list_of(Mount),
        "devices": _list_of(Device),
        "hooks": _hooks,
        "limits": _limits,
        "device_rules": _list_of(DeviceRule),
    })
