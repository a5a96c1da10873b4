"""What a monitor runs: the plan of one start of one container (``plan.json``, version 1).

The service resolves everything before a start — the image's defaults under the document's
settings, users by name, limits in the units each backend takes — and writes the result
here; the monitor only acts on it (as silo's init acts on a ``SiloConfig``). So a plan can be
read, tested and compared without running anything, and a monitor started by a new daemon
version still reads what an older one wrote (the file is versioned).

Docker's rules for the command: the document's ``entrypoint`` replaces the image's (and then
drops the image's ``Cmd``), its ``args`` replace the image's ``Cmd``. The environment is the
image's, overlaid key by key by the document's. The working directory is the document's, or
the image's ``WorkingDir``, or ``/``.

Process isolation gets a complete OCI runtime config (``oci``): the engine's defaults
(:func:`isobox.spec.runtime.default_config`: namespaces, Docker's 14 capabilities, masked
paths), the engine's default seccomp profile, mapped directories as recursive binds, and
``linux.resources`` from the document. Host isolation gets ``host`` (argv, environment,
working directory, identity) and ``limits`` (the fields of :class:`isobox.jobs.Limits`):
the image's files (with the mapped folders bound below them, and read-only with
``readOnly``) are reached at the root's mount point, named by
``ISOBOX_SANDBOX_MOUNT_POINT`` (Windows' ``CONTAINER_SANDBOX_MOUNT_POINT``), and the image's
``PATH`` entries are prefixed with it, ahead of the host's ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isobox.errors import InvalidArgument, InvalidDocument, IsoboxError, NotFound

if TYPE_CHECKING:
    from isobox.spec.compute import ComputeSystem
    from isobox.spec.image import ImageConfig
    from isobox.storage.store import Mounts

PLAN_VERSION = 1
ISOLATIONS = ("process", "host", "vm")
MOUNT_POINT_ENV = "ISOBOX_SANDBOX_MOUNT_POINT"
CPU_PERIOD_US = 100_000
#: VM isolation: the VM's memory is the container's limit plus this (guest kernel, agent,
#: page cache), and never less than VM_MIN_MIB.
VM_OVERHEAD_MIB = 192
VM_MIN_MIB = 256
VM_DEFAULT_MIB = 512  # no --memory: the container may use what the guest has
#: Where things are inside the utility VM (the guest's paths, never the host's).
GUEST_BUNDLE = "/run/isobox/c"
GUEST_LAYERS = "/run/isobox/layers"
GUEST_SHARES = "/run/isobox/shares"
GUEST_NET = "/run/isobox/net"  # the agent's ``network`` op writes hosts, resolv.conf here
GUEST_SCRATCH = "/scratch"  # the guest's init mounts the disk with serial "scratch" here
SCRATCH_DISK = "scratch.ext4"


@dataclass
class Plan:
    id: str
    name: str
    isolation: str  # "process" | "host" | "vm"
    container_dir: str  # $ISOBOX_ROOT/containers/<id>
    run_dir: str  # $ISOBOX_RUN/containers/<id>
    lower: list[str]  # the image's layers, top first
    upper: str
    work: str
    rootfs: str  # the overlay's mount point: container_dir/rootfs
    oci: dict[str, Any] = field(default_factory=dict)  # process isolation
    host: dict[str, Any] = field(default_factory=dict)  # host isolation: args env cwd uid gid
    limits: dict[str, Any] = field(default_factory=dict)  # host isolation: Limits fields
    tty: bool = False
    stdin: bool = False
    vm: dict[str, Any] = field(default_factory=dict)  # vm isolation: see :func:`vm_plan`

    @property
    def log_path(self) -> Path:
        return Path(self.container_dir) / "log.jsonl"

    @property
    def status_path(self) -> Path:
        return Path(self.container_dir) / "status.json"

    @property
    def socket_path(self) -> Path:
        return Path(self.run_dir) / "monitor.sock"

    @property
    def monitor_log(self) -> Path:
        return Path(self.container_dir) / "monitor.log"


def write_plan(plan: Plan, path: Path) -> None:
    """Complete or not at all (temp file + rename), 0600: the plan holds the process's
    environment.

    Cheap, as it runs at every create and start: one C ``json.dumps`` of the fields as they
    are (``asdict`` would deep-copy the whole OCI config, and ``json.dump`` encodes in
    Python: ~3 ms); a plan equal to the one in place is not written again; and a changed one
    is renamed to a free name, the old one removed first, because ext4 flushes the new
    file's data to disk when a rename *replaces* a file (``auto_da_alloc``: ~1.3 ms). A
    crash in between leaves no plan, never a partial one; the next start writes it anew,
    and nothing but the monitor spawned after this call reads it."""
    data = {"version": PLAN_VERSION, **{f.name: getattr(plan, f.name) for f in fields(plan)}}
    raw = json.dumps(data).encode()
    try:
        with open(path, "rb") as fh:
            if fh.read(len(raw) + 1) == raw:
                return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_plan(path: Path) -> Plan:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NotFound(f"no plan at {path}") from exc
    except ValueError as exc:
        raise IsoboxError(f"plan {path} is damaged: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise IsoboxError(f"plan {path}: version {version!r}, this engine reads "
                          f"{PLAN_VERSION}")
    known = {f.name for f in fields(Plan)}
    return Plan(**{k: v for k, v in data.items() if k in known})


# ---- building ------------------------------------------------------------------------------


def command(doc: ComputeSystem, image: ImageConfig) -> list[str]:
    """Docker's rules: entrypoint + cmd, each from the document or else the image."""
    cfg = image.config
    p = doc.process
    entry = p.entrypoint if p.entrypoint is not None else list(cfg.entrypoint or []) if cfg \
        else []
    if p.args is not None:
        cmd = list(p.args)
    elif p.entrypoint is not None:
        cmd = []  # a new entrypoint drops the image's Cmd (docker run --entrypoint)
    else:
        cmd = list(cfg.cmd or []) if cfg else []
    argv = [*entry, *cmd]
    if not argv:
        raise InvalidArgument("no command: the image has no Entrypoint or Cmd and the "
                              "document gives no process.args")
    return argv


def merge_env(base: list[str], over: list[str]) -> list[str]:
    """``base`` with each KEY of ``over`` replaced (or added), order kept."""
    out: dict[str, str] = {}
    for item in [*base, *over]:
        key, _, _ = item.partition("=")
        out[key] = item
    return list(out.values())


def _env_value(env: list[str], key: str) -> str | None:
    for item in env:
        k, _, v = item.partition("=")
        if k == key:
            return v
    return None


def _layer_file(layers: list[Path], rel: str) -> str | None:
    """A regular file of the union of ``layers`` (top first), as overlayfs would show it;
    a symlink or a whiteout hides it (never followed: it could point at the host)."""
    for layer in layers:
        path = layer / rel
        # No component may be a symlink: /etc -> / in a layer would read the host's file.
        if os.path.realpath(path.parent) != os.path.join(os.path.realpath(layer),
                                                         os.path.dirname(rel)):
            if os.path.lexists(path.parent):
                return None
            continue
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size > (4 << 20):
            return None
        return path.read_text(errors="replace")
    return None


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str


def _entries(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines()
            if line and not line.startswith("#")]


def resolve_user(user: str | None, passwd: str | None, group: str | None) -> Identity:
    """``NAME|UID[:GROUP|GID]`` against an image's ``/etc/passwd`` and ``/etc/group``
    (docker's rules: a numeric uid needs no entry; a user's groups are its supplementary
    groups)."""
    spec = user or ""
    name, _, grp = spec.partition(":")
    users = [e for e in _entries(passwd) if len(e) >= 6]
    groups = [e for e in _entries(group) if len(e) >= 3]
    uid, gid, home, uname = 0, 0, "/root", "root"
    if name:
        match = [e for e in users if e[0] == name or (name.isdigit() and e[2] == name)]
        if match:
            e = match[0]
            try:
                uname, uid, gid, home = e[0], int(e[2]), int(e[3]), e[5] or "/"
            except ValueError as exc:
                raise InvalidArgument(f"user {name!r}: damaged passwd entry") from exc
        elif name.isdigit():
            uid, gid, home, uname = int(name), 0, "/", ""
        else:
            raise InvalidArgument(f"user {name!r} is not in the image's /etc/passwd")
    elif users and users[0][0] == "root":
        home = users[0][5] or "/root"
    if grp:
        gmatch = [e for e in groups if e[0] == grp]
        if gmatch:
            gid = int(gmatch[0][2])
        elif grp.isdigit():
            gid = int(grp)
        else:
            raise InvalidArgument(f"group {grp!r} is not in the image's /etc/group")
    extra = sorted({int(e[2]) for e in groups
                    if len(e) > 3 and uname in e[3].split(",") and e[2].isdigit()} - {gid}) \
        if uname else []
    return Identity(uid, gid, extra, home)


def _host_identity(user: str | None) -> Identity:
    """Host isolation runs as a host account: names are the host's."""
    import grp
    import pwd

    name, _, group = (user or "").partition(":")
    uid, gid, home = 0, 0, "/root"
    if name:
        try:
            pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
            uid, gid, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        except KeyError as exc:
            if not name.isdigit():
                raise InvalidArgument(f"user {name!r} does not exist on the host") from exc
            uid, home = int(name), "/"
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise InvalidArgument(f"group {group!r} does not exist on the host") from exc
    return Identity(uid, gid, [], home)


def _oci_resources(doc: ComputeSystem) -> dict[str, Any]:
    r = doc.resources
    out: dict[str, Any] = {}
    if r.memory is not None:
        out["memory"] = {"limit": r.memory}
    cpu: dict[str, Any] = {}
    if r.cpus is not None:
        cpu["quota"] = max(1000, round(r.cpus * CPU_PERIOD_US))
        cpu["period"] = CPU_PERIOD_US
    if r.cpu_shares is not None:
        cpu["shares"] = r.cpu_shares
    if r.cpuset is not None:
        cpu["cpus"] = r.cpuset
    if cpu:
        out["cpu"] = cpu
    if r.pids_limit is not None:
        out["pids"] = {"limit": r.pids_limit}
    return out


def host_limits(doc: ComputeSystem) -> dict[str, Any]:
    """The document's resources as :class:`isobox.jobs.Limits` fields."""
    from isobox.jobs.limits import cpu_rate_from_cpus, parse_cpuset

    r = doc.resources
    out: dict[str, Any] = {}
    if r.memory is not None:
        out["memory"] = r.memory
    if r.cpus is not None:
        out["cpu_rate"] = cpu_rate_from_cpus(r.cpus)
    if r.cpu_shares is not None:
        out["cpu_weight"] = max(1, min(10000, r.cpu_shares * 100 // 1024))
    if r.pids_limit is not None:
        out["pids"] = r.pids_limit
    if r.cpuset is not None:
        parse_cpuset(r.cpuset)
        out["cpuset"] = r.cpuset
    return out


def build_plan(
    doc: ComputeSystem, image: ImageConfig, mounts: Mounts, *, container_id: str,
    name: str, isolation: str, container_dir: Path, run_dir: Path,
) -> Plan:
    """The plan of one start of ``doc`` on ``image`` with the root ``mounts``."""
    if isolation not in ISOLATIONS:
        raise InvalidArgument(f"isolation {isolation!r} is not available here "
                              f"(this monitor runs {', '.join(ISOLATIONS)})")
    cfg = image.config
    rootfs = container_dir / "rootfs"
    argv = command(doc, image)
    p = doc.process
    cwd = p.cwd or (cfg.working_dir if cfg and cfg.working_dir else None) or "/"
    if not cwd.startswith("/"):
        cwd = "/" + cwd
    env = merge_env(list(cfg.env or []) if cfg else [], list(p.env))
    user = p.user if p.user is not None else (cfg.user if cfg and cfg.user else None)
    plan = Plan(
        id=container_id, name=name, isolation=isolation,
        container_dir=str(container_dir), run_dir=str(run_dir),
        lower=[str(x) for x in mounts.lower], upper=str(mounts.upper), work=str(mounts.work),
        rootfs=str(rootfs), tty=p.tty, stdin=p.stdin,
    )
    if isolation == "process":
        layers = [mounts.upper, *mounts.lower]
        ident = resolve_user(user, _layer_file(layers, "etc/passwd"),
                             _layer_file(layers, "etc/group"))
        plan.oci = _oci_config(doc, argv, env, cwd, ident=ident, container_id=container_id,
                               rootfs=rootfs)
    elif isolation == "vm":
        layers = [mounts.upper, *mounts.lower]
        ident = resolve_user(user, _layer_file(layers, "etc/passwd"),
                             _layer_file(layers, "etc/group"))
        plan.vm = vm_plan(doc, argv, env, cwd, ident=ident, container_id=container_id,
                          mounts=mounts, container_dir=container_dir)
    else:
        ident = _host_identity(user)
        plan.host = _host_process(argv, env, cwd, ident=ident, rootfs=rootfs, tty=p.tty)
        # Mapped folders below the sandbox mount point (as Windows' HostProcess containers
        # have them), and a read-only root: the host backend makes both.
        plan.host["mounts"] = [{"source": m.source, "destination": m.destination,
                                "readOnly": m.read_only} for m in doc.mounts]
        plan.host["readOnly"] = doc.read_only
        plan.limits = host_limits(doc)
    return plan


def _oci_config(doc: ComputeSystem, argv: list[str], env: list[str], cwd: str, *,
                ident: Identity, container_id: str, rootfs: Path) -> dict[str, Any]:
    from isobox._sys.seccomp import default_profile
    from isobox.spec.runtime import DEFAULT_CAPABILITIES, DEFAULT_PATH, default_config

    hostname = doc.network.hostname or container_id[:12]
    if _env_value(env, "PATH") is None:
        env = [f"PATH={DEFAULT_PATH}", *env]
    extra = [f"HOSTNAME={hostname}"]
    if doc.process.tty:
        extra.append("TERM=xterm")
    if _env_value(env, "HOME") is None:
        extra.append(f"HOME={ident.home}")
    env = merge_env(extra, env)
    cfg: dict[str, Any] = default_config(argv).model_dump(
        mode="json", by_alias=True, exclude_none=True)
    cfg["root"] = {"path": str(rootfs), "readonly": doc.read_only}
    cfg["hostname"] = hostname
    proc = cfg["process"]
    proc.update(args=argv, env=env, cwd=cwd, terminal=doc.process.tty)
    proc["user"] = {"uid": ident.uid, "gid": ident.gid}
    if ident.additional_gids:
        proc["user"]["additionalGids"] = ident.additional_gids
    linux = cfg["linux"]
    if doc.network.mode == "host":
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    linux["resources"].update(_oci_resources(doc))
    caps = _capabilities(DEFAULT_CAPABILITIES, doc.process.cap_add)
    proc["capabilities"] = {"bounding": caps, "effective": list(caps),
                            "permitted": list(caps)}
    # The profile follows the capabilities, as Docker's does (CAP_SYS_ADMIN allows mount...).
    linux["seccomp"] = default_profile(caps)
    for m in doc.mounts:
        cfg["mounts"].append({
            "destination": m.destination, "type": "bind", "source": m.source,
            "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"],
        })
    return cfg


def _capabilities(default: Sequence[str], add: list[str]) -> list[str]:
    """Docker's default set plus ``add`` (``ALL``: every capability the kernel knows);
    an unknown name is a 400 naming ``process.capAdd``."""
    from isobox._sys.linux import CAP_NUMBER, last_cap

    known = [c for c, n in sorted(CAP_NUMBER.items(), key=lambda kv: kv[1]) if n <= last_cap()]
    caps = list(default)
    for name in add:
        if name == "ALL":
            return known
        if name not in CAP_NUMBER:
            raise InvalidDocument(f"compute system: process.capAdd: unknown capability {name}",
                                  field="process.capAdd")
        if name not in caps:
            caps.append(name)
    return caps


def _host_process(argv: list[str], env: list[str], cwd: str, *, ident: Identity,
                  rootfs: Path, tty: bool) -> dict[str, Any]:
    image_path = _env_value(env, "PATH") or ""
    paths = [str(rootfs) + p for p in image_path.split(":") if p.startswith("/")]
    host_path = os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:" \
        "/usr/bin:/sbin:/bin"
    env = merge_env(env, [f"{MOUNT_POINT_ENV}={rootfs}",
                          "PATH=" + ":".join([*paths, host_path])])
    if tty:
        env = merge_env(["TERM=xterm"], env)
    if _env_value(env, "HOME") is None:
        env = merge_env(env, [f"HOME={ident.home}"])
    return {"args": argv, "env": env, "cwd": str(rootfs) + (cwd if cwd != "/" else ""),
            "uid": ident.uid, "gid": ident.gid, "additionalGids": ident.additional_gids}


# ---- vm isolation ----------------------------------------------------------------------------


def vm_size(doc: ComputeSystem) -> tuple[int, int]:
    """(memory MiB, vCPUs) of the utility VM of ``doc``: the container's memory limit plus
    :data:`VM_OVERHEAD_MIB` (at least :data:`VM_MIN_MIB`; :data:`VM_DEFAULT_MIB` without a
    limit), and ``ceil(cpus)`` vCPUs (1 without ``--cpus``), at most the host's CPUs."""
    import math

    r = doc.resources
    if r.memory is None:
        mib = VM_DEFAULT_MIB
    else:
        mib = max(VM_MIN_MIB, -(-r.memory // (1 << 20)) + VM_OVERHEAD_MIB)
    cpus = max(1, math.ceil(r.cpus)) if r.cpus is not None else 1
    return mib, min(cpus, os.cpu_count() or 1)


def vm_networked(doc: ComputeSystem) -> bool:
    """A vm run of ``doc`` is on a network (a tap on its bridge), not ``none``."""
    mode = doc.network.mode
    return mode not in ("none", "host") and not mode.startswith("container:")


def vm_plan(doc: ComputeSystem, argv: list[str], env: list[str], cwd: str, *,
            ident: Identity, container_id: str, mounts: Mounts,
            container_dir: Path) -> dict[str, Any]:
    """What the vm backend needs: the VM's shape, its disks and shares (host paths), and
    the container's ``SiloConfig`` as the guest agent takes it (guest paths only).

    The OCI config is the very one process isolation gets (same defaults, capabilities,
    seccomp, masked paths, limits), converted here on the host (pydantic stays out of the
    guest), with the root at :data:`GUEST_BUNDLE` and each mapped directory's source
    replaced by the guest path its 9p share is mounted at."""
    from isobox.silo.config import from_oci, to_json
    from isobox.spec.runtime import parse_config

    rootfs = Path(GUEST_BUNDLE) / "rootfs"
    oci = _oci_config(doc, argv, env, cwd, ident=ident, container_id=container_id,
                      rootfs=rootfs)
    shares: list[dict[str, Any]] = []
    for m in oci["mounts"]:
        if m.get("type") != "bind":
            continue
        tag = f"m{len(shares)}"
        ro = "ro" in m.get("options", [])
        shares.append({"tag": tag, "source": m["source"], "readOnly": ro,
                       "guest": f"{GUEST_SHARES}/{tag}"})
        m["source"] = f"{GUEST_SHARES}/{tag}"
    if vm_networked(doc):
        # The guest's eth0 is the endpoint (the VM is the isolation boundary): the container
        # stays in the guest's network namespace, with the names the agent wrote there.
        linux = oci["linux"]
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
        oci["mounts"] += [{"destination": f"/etc/{f}", "type": "bind",
                           "source": f"{GUEST_NET}/{f}", "options": ["rbind", "rprivate", "ro"]}
                          for f in ("hosts", "resolv.conf")]
    silo = to_json(from_oci(parse_config(json.dumps(oci), "plan.vm"), Path(GUEST_BUNDLE)))
    mib, cpus = vm_size(doc)
    return {
        "memoryMib": mib, "cpus": cpus, "template": doc.vm.template,
        # Removed when it stops: what is in the VM (its scratch disk too) is thrown away.
        "autoRemove": doc.auto_remove,
        # Top first, as overlayfs' lowerdir lists them; each is one read-only disk.
        "layers": [str(p) for p in mounts.lower],
        "scratch": str(container_dir / SCRATCH_DISK),
        "scratchSeed": str(Path(mounts.upper).parent),  # the host scratch layer (upper/work)
        "shares": shares,
        "silo": silo,
        "oci": {"resources": oci["linux"]["resources"]},
    }
