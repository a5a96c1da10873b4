"""Pydantic models of the OCI runtime-spec ``config.json`` (runtime-spec 1.0.x through 1.2).

Only the Linux (and POSIX) parts of the document are typed. Every model keeps unknown fields
(``extra="allow"``): the spec requires runtimes to ignore properties they do not know, and
other tools (podman, containerd, CDI hooks) put their own keys in the document, so they
survive a :func:`parse_config` / :func:`dump_config` round trip. Where the spec enumerates
the valid values of a field (namespace types, seccomp actions and operators, rlimit types,
device types, propagation modes, ...) the field is a closed ``Literal``: the spec says an
invalid or unsupported value MUST be an error, so a typo fails at load time rather than being
silently ignored at run time.

Validation goes no further than the document itself: whether a path exists, a namespace file
is of the right type or a capability is known to the running kernel is for the runtime.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from isobox.errors import InvalidDocument, NotFound, from_oserror

SPEC_VERSION = "1.2.0"
"""The ``ociVersion`` isobox writes."""

MAX_CONFIG_SIZE = 4 * 1024 * 1024
"""The largest ``config.json`` :func:`load_config` reads (seccomp profiles make them ~100 KiB)."""

# --- scalar types ----------------------------------------------------------------------------

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Uint16 = Annotated[int, Field(ge=0, le=2**16 - 1)]
Uint32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Uint64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

Capability = Annotated[str, StringConstraints(pattern=r"^CAP_[A-Z_]+$")]
# The spec lists the libseccomp architectures of its day; libseccomp keeps adding more
# (SCMP_ARCH_LOONGARCH64, SCMP_ARCH_M68K, ...), so only the shape of the name is checked.
SeccompArch = Annotated[str, StringConstraints(pattern=r"^SCMP_ARCH_[A-Z0-9_]+$")]
AnnotationKey = Annotated[str, StringConstraints(min_length=1)]

# --- values the spec enumerates ----------------------------------------------------------------

NamespaceType = Literal["pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"]
SeccompAction = Literal[
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
]
SeccompOperator = Literal[
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
]
SeccompFlag = Literal[
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
]
# The resources of getrlimit(2) on Linux.
RlimitType = Literal[
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
]
DeviceType = Literal["c", "b", "u", "p"]  # linux.devices: mknod(1) types
CgroupDeviceType = Literal["a", "c", "b"]  # linux.resources.devices: the allow/deny list
# The spec names shared, slave, private and unbindable. runc also accepts the recursive
# spellings, and containerd's CRI plugin and moby write "rslave"/"rshared", so a config
# from either would not load without them.
RootfsPropagation = Literal[
    "shared", "slave", "private", "unbindable", "rshared", "rslave", "rprivate", "runbindable"
]
IOPriorityClass = Literal["IOPRIO_CLASS_RT", "IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE"]
SchedulerPolicy = Literal[
    "SCHED_OTHER",
    "SCHED_FIFO",
    "SCHED_RR",
    "SCHED_BATCH",
    "SCHED_ISO",
    "SCHED_IDLE",
    "SCHED_DEADLINE",
]
SchedulerFlag = Literal[
    "SCHED_FLAG_RESET_ON_FORK",
    "SCHED_FLAG_RECLAIM",
    "SCHED_FLAG_DL_OVERRUN",
    "SCHED_FLAG_KEEP_POLICY",
    "SCHED_FLAG_KEEP_PARAMS",
    "SCHED_FLAG_UTIL_CLAMP_MIN",
    "SCHED_FLAG_UTIL_CLAMP_MAX",
]
PersonalityDomain = Literal["LINUX", "LINUX32"]

_OCI_VERSION_RE = re.compile(r"^1\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)([-+].*)?$")
_UID_LIMIT = 2**32 - 1  # (u32)-1 is "no id"; the kernel refuses ranges that reach it


def _invalid(reason: str) -> PydanticCustomError:
    """A validation error whose message is ``reason`` as is (no "Value error, " prefix)."""
    return PydanticCustomError("oci_invalid", "{reason}", {"reason": reason})


def _absolute(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise _invalid(f"{what} must be an absolute path, got {value!r}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- root, mounts, hooks -------------------------------------------------------------------------


class Root(_Model):
    path: str = Field(min_length=1)
    readonly: bool | None = None


class IDMapping(_Model):
    container_id: Uint32 = Field(alias="containerID")
    host_id: Uint32 = Field(alias="hostID")
    # The kernel refuses a zero-length extent, so a zero size can never be realised.
    size: Annotated[int, Field(ge=1, le=2**32 - 1)]


def check_id_mappings(mappings: Sequence[IDMapping]) -> None:
    """Reject what the kernel would refuse in ``uid_map``/``gid_map``: ranges that wrap past
    the last id, and ranges that overlap on either side (container or host)."""
    for i, m in enumerate(mappings):
        for side, start in (("containerID", m.container_id), ("hostID", m.host_id)):
            if start + m.size > _UID_LIMIT:
                raise _invalid(
                    f"entry {i}: {side} {start} + size {m.size} runs past the last id"
                )
    for side, key in (("container", "container_id"), ("host", "host_id")):
        spans = sorted(
            (getattr(m, key), getattr(m, key) + m.size, i) for i, m in enumerate(mappings)
        )
        for (_, end, i), (start, _, j) in pairwise(spans):
            if start < end:
                first, second = sorted((i, j))
                raise _invalid(f"entries {first} and {second} overlap in {side} ids")


class Mount(_Model):
    # Destination: runtime-spec 1.0 required an absolute path, but tools wrote relative ones
    # anyway and runc always accepted them as relative to "/". Since 1.2 the spec permits
    # them on Linux, with that same meaning, while marking them deprecated (runtime-spec
    # PR #1225). We accept them and normalise to the absolute path runc would use:
    # "/" joined with the value and cleaned, so "dev/x" -> "/dev/x" and "../etc" -> "/etc"
    # (a relative value cannot climb above the container root). The dumped document then
    # carries the absolute form. Absolute values are kept exactly as written.
    destination: str
    type: str | None = None
    source: str | None = None
    options: list[str] | None = None
    uid_mappings: list[IDMapping] | None = Field(default=None, alias="uidMappings")
    gid_mappings: list[IDMapping] | None = Field(default=None, alias="gidMappings")

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        if not v:
            raise _invalid("mount destination must not be empty")
        if v.startswith("/"):
            return v
        return posixpath.normpath("/" + v)

    @field_validator("uid_mappings", "gid_mappings")
    @classmethod
    def _mappings(cls, v: list[IDMapping] | None) -> list[IDMapping] | None:
        if v:
            check_id_mappings(v)
        return v

    @model_validator(mode="after")
    def _mappings_pair(self) -> Mount:
        if (self.uid_mappings is None) != (self.gid_mappings is None):
            raise _invalid("uidMappings and gidMappings must be given together")
        return self


class Hook(_Model):
    path: str
    args: list[str] | None = None
    env: list[str] | None = None
    timeout: int | None = Field(default=None, gt=0)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _absolute(v, "hook path")


class Hooks(_Model):
    prestart: list[Hook] | None = None  # deprecated by the spec, still written by tools
    create_runtime: list[Hook] | None = Field(default=None, alias="createRuntime")
    create_container: list[Hook] | None = Field(default=None, alias="createContainer")
    start_container: list[Hook] | None = Field(default=None, alias="startContainer")
    poststart: list[Hook] | None = None
    poststop: list[Hook] | None = None


# --- process -------------------------------------------------------------------------------------


class ConsoleSize(_Model):
    height: Uint64
    width: Uint64


class User(_Model):
    uid: Uint32
    gid: Uint32
    umask: Uint32 | None = None
    additional_gids: list[Uint32] | None = Field(default=None, alias="additionalGids")
    username: str | None = None  # Windows only; kept for completeness


class Capabilities(_Model):
    bounding: list[Capability] | None = None
    effective: list[Capability] | None = None
    inheritable: list[Capability] | None = None
    permitted: list[Capability] | None = None
    ambient: list[Capability] | None = None


class Rlimit(_Model):
    type: RlimitType
    hard: Uint64
    soft: Uint64

    @model_validator(mode="after")
    def _soft_le_hard(self) -> Rlimit:
        if self.soft > self.hard:  # setrlimit(2) fails with EINVAL
            raise _invalid(f"soft limit {self.soft} is above hard limit {self.hard}")
        return self


class IOPriority(_Model):
    class_: IOPriorityClass = Field(alias="class")
    priority: int = Field(ge=0, le=7)


class Scheduler(_Model):
    policy: SchedulerPolicy
    nice: Int32 | None = None
    priority: Int32 | None = None
    flags: list[SchedulerFlag] | None = None
    runtime: Uint64 | None = None
    deadline: Uint64 | None = None
    period: Uint64 | None = None


class ExecCPUAffinity(_Model):
    initial: str | None = None
    final: str | None = None


class Process(_Model):
    terminal: bool | None = None
    console_size: ConsoleSize | None = Field(default=None, alias="consoleSize")
    # Go writers always emit "user"; when it is absent the process runs as uid 0, gid 0.
    user: User | None = None
    # Optional on Windows only; on Linux at least one entry is required.
    args: list[str] = Field(min_length=1)
    command_line: str | None = Field(default=None, alias="commandLine")
    env: list[str] | None = None
    cwd: str
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] | None = None
    no_new_privileges: bool | None = Field(default=None, alias="noNewPrivileges")
    apparmor_profile: str | None = Field(default=None, alias="apparmorProfile")
    oom_score_adj: int | None = Field(default=None, alias="oomScoreAdj", ge=-1000, le=1000)
    selinux_label: str | None = Field(default=None, alias="selinuxLabel")
    io_priority: IOPriority | None = Field(default=None, alias="ioPriority")
    scheduler: Scheduler | None = None
    exec_cpu_affinity: ExecCPUAffinity | None = Field(default=None, alias="execCPUAffinity")

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str) -> str:
        return _absolute(v, "cwd")

    @field_validator("rlimits")
    @classmethod
    def _rlimits(cls, v: list[Rlimit] | None) -> list[Rlimit] | None:
        seen: dict[str, int] = {}
        for i, r in enumerate(v or ()):
            if r.type in seen:
                raise _invalid(f"entries {seen[r.type]} and {i} both set {r.type}")
            seen[r.type] = i
        return v


# --- linux: namespaces, devices ------------------------------------------------------------------


class Namespace(_Model):
    type: NamespaceType
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else _absolute(v, "namespace path")


class TimeOffset(_Model):
    secs: Int64 | None = None
    nanosecs: Uint32 | None = None


class Device(_Model):
    type: DeviceType
    path: str
    major: Int64 | None = None
    minor: Int64 | None = None
    file_mode: Uint32 | None = Field(default=None, alias="fileMode")
    uid: Uint32 | None = None
    gid: Uint32 | None = None

    @model_validator(mode="after")
    def _numbers(self) -> Device:
        if self.type != "p" and (self.major is None or self.minor is None):
            raise _invalid(f"a device of type {self.type!r} needs major and minor")
        return self


# --- linux: resources ----------------------------------------------------------------------------


class DeviceCgroup(_Model):
    allow: bool
    type: CgroupDeviceType | None = None
    major: Int64 | None = None
    minor: Int64 | None = None
    access: str | None = None

    @field_validator("access")
    @classmethod
    def _access(cls, v: str | None) -> str | None:
        if v is not None and not set(v) <= set("rwm"):
            raise _invalid(f"access must combine r, w and m, got {v!r}")
        return v


class Memory(_Model):
    # Byte counts, -1 meaning unlimited.
    limit: Int64 | None = None
    reservation: Int64 | None = None
    swap: Int64 | None = None
    kernel: Int64 | None = None  # deprecated by the spec; ignored on cgroup v2
    kernel_tcp: Int64 | None = Field(default=None, alias="kernelTCP")
    swappiness: Uint64 | None = None
    disable_oom_killer: bool | None = Field(default=None, alias="disableOOMKiller")
    use_hierarchy: bool | None = Field(default=None, alias="useHierarchy")
    check_before_update: bool | None = Field(default=None, alias="checkBeforeUpdate")


class CPU(_Model):
    shares: Uint64 | None = None
    quota: Int64 | None = None
    burst: Uint64 | None = None
    period: Uint64 | None = None
    realtime_runtime: Int64 | None = Field(default=None, alias="realtimeRuntime")
    realtime_period: Uint64 | None = Field(default=None, alias="realtimePeriod")
    cpus: str | None = None
    mems: str | None = None
    idle: Int64 | None = None


class WeightDevice(_Model):
    major: Int64
    minor: Int64
    weight: Uint16 | None = None
    leaf_weight: Uint16 | None = Field(default=None, alias="leafWeight")

    @model_validator(mode="after")
    def _some_weight(self) -> WeightDevice:
        if self.weight is None and self.leaf_weight is None:
            raise _invalid("give weight, leafWeight or both")
        return self


class ThrottleDevice(_Model):
    major: Int64
    minor: Int64
    rate: Uint64


class BlockIO(_Model):
    weight: Uint16 | None = None
    leaf_weight: Uint16 | None = Field(default=None, alias="leafWeight")
    weight_device: list[WeightDevice] | None = Field(default=None, alias="weightDevice")
    throttle_read_bps_device: list[ThrottleDevice] | None = Field(
        default=None, alias="throttleReadBpsDevice"
    )
    throttle_write_bps_device: list[ThrottleDevice] | None = Field(
        default=None, alias="throttleWriteBpsDevice"
    )
    throttle_read_iops_device: list[ThrottleDevice] | None = Field(
        default=None, alias="throttleReadIOPSDevice"
    )
    throttle_write_iops_device: list[ThrottleDevice] | None = Field(
        default=None, alias="throttleWriteIOPSDevice"
    )


class HugepageLimit(_Model):
    page_size: str = Field(alias="pageSize")
    limit: Uint64


class InterfacePriority(_Model):
    name: str
    priority: Uint32


class Network(_Model):
    class_id: Uint32 | None = Field(default=None, alias="classID")
    priorities: list[InterfacePriority] | None = None


class Pids(_Model):
    limit: Int64


class Rdma(_Model):
    hca_handles: Uint32 | None = Field(default=None, alias="hcaHandles")
    hca_objects: Uint32 | None = Field(default=None, alias="hcaObjects")

    @model_validator(mode="after")
    def _some_limit(self) -> Rdma:
        if self.hca_handles is None and self.hca_objects is None:
            raise _invalid("give hcaHandles, hcaObjects or both")
        return self


class Resources(_Model):
    devices: list[DeviceCgroup] | None = None
    memory: Memory | None = None
    cpu: CPU | None = None
    pids: Pids | None = None
    block_io: BlockIO | None = Field(default=None, alias="blockIO")
    hugepage_limits: list[HugepageLimit] | None = Field(default=None, alias="hugepageLimits")
    network: Network | None = None
    rdma: dict[str, Rdma] | None = None
    unified: dict[str, str] | None = None


class IntelRdt(_Model):
    clos_id: str | None = Field(default=None, alias="closID")
    schemata: str | None = None
    l3_cache_schema: str | None = Field(default=None, alias="l3CacheSchema")
    mem_bw_schema: str | None = Field(default=None, alias="memBwSchema")
    enable_cmt: bool | None = Field(default=None, alias="enableCMT")
    enable_mbm: bool | None = Field(default=None, alias="enableMBM")


# --- linux: seccomp, personality -----------------------------------------------------------------


class SeccompArg(_Model):
    index: Uint32
    value: Uint64
    value_two: Uint64 | None = Field(default=None, alias="valueTwo")
    op: SeccompOperator


class Syscall(_Model):
    names: list[str] = Field(min_length=1)
    action: SeccompAction
    errno_ret: Uint32 | None = Field(default=None, alias="errnoRet")
    args: list[SeccompArg] | None = None


class Seccomp(_Model):
    default_action: SeccompAction = Field(alias="defaultAction")
    default_errno_ret: Uint32 | None = Field(default=None, alias="defaultErrnoRet")
    architectures: list[SeccompArch] | None = None
    flags: list[SeccompFlag] | None = None
    listener_path: str | None = Field(default=None, alias="listenerPath")
    listener_metadata: str | None = Field(default=None, alias="listenerMetadata")
    syscalls: list[Syscall] | None = None

    @model_validator(mode="after")
    def _listener(self) -> Seccomp:
        if self.listener_metadata is not None and not self.listener_path:
            raise _invalid("listenerMetadata is set but listenerPath is not")
        return self


class Personality(_Model):
    domain: PersonalityDomain
    flags: list[str] | None = None


class Linux(_Model):
    namespaces: list[Namespace] | None = None
    uid_mappings: list[IDMapping] | None = Field(default=None, alias="uidMappings")
    gid_mappings: list[IDMapping] | None = Field(default=None, alias="gidMappings")
    time_offsets: dict[str, TimeOffset] | None = Field(default=None, alias="timeOffsets")
    devices: list[Device] | None = None
    cgroups_path: str | None = Field(default=None, alias="cgroupsPath")
    resources: Resources | None = None
    intel_rdt: IntelRdt | None = Field(default=None, alias="intelRdt")
    sysctl: dict[str, str] | None = None
    seccomp: Seccomp | None = None
    rootfs_propagation: RootfsPropagation | None = Field(default=None, alias="rootfsPropagation")
    masked_paths: list[str] | None = Field(default=None, alias="maskedPaths")
    readonly_paths: list[str] | None = Field(default=None, alias="readonlyPaths")
    mount_label: str | None = Field(default=None, alias="mountLabel")
    personality: Personality | None = None

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: list[Namespace] | None) -> list[Namespace] | None:
        seen: dict[str, int] = {}
        for i, ns in enumerate(v or ()):
            if ns.type in seen:
                raise _invalid(f"entries {seen[ns.type]} and {i} are both of type {ns.type!r}")
            seen[ns.type] = i
        return v

    @field_validator("uid_mappings", "gid_mappings")
    @classmethod
    def _mappings(cls, v: list[IDMapping] | None) -> list[IDMapping] | None:
        if v:
            check_id_mappings(v)
        return v

    @field_validator("masked_paths", "readonly_paths")
    @classmethod
    def _paths(cls, v: list[str] | None) -> list[str] | None:
        for p in v or ():
            _absolute(p, "path")
        return v

    def namespace(self, kind: NamespaceType) -> Namespace | None:
        """The entry of type ``kind``, or None when the runtime's namespace is inherited."""
        return next((ns for ns in self.namespaces or () if ns.type == kind), None)


# --- the document --------------------------------------------------------------------------------


class RuntimeConfig(_Model):
    """The whole ``config.json`` of an OCI bundle."""

    oci_version: str = Field(alias="ociVersion")
    root: Root  # optional only for Hyper-V containers on Windows
    mounts: list[Mount] | None = None
    process: Process | None = None  # required by ``start``, not by ``create``
    hostname: str | None = None
    domainname: str | None = None
    hooks: Hooks | None = None
    annotations: dict[AnnotationKey, str] | None = None
    linux: Linux | None = None

    @field_validator("oci_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _OCI_VERSION_RE.match(v):
            raise _invalid(f"unsupported version {v!r}: isobox reads runtime-spec 1.x")
        return v


# --- reading and writing -------------------------------------------------------------------------


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _format_loc(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path: ``linux.namespaces[1].type``; map keys that
    are not plain names are quoted: ``annotations["io.example.key"]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":  # the error is about the map key itself, not its value
            out += " (key)"
        elif _NAME_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def describe_validation_error(exc: ValidationError) -> str:
    """``<json path>: <message>`` for the first error of ``exc``."""
    first = exc.errors(include_url=False)[0]
    where = _format_loc(first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


_Doc = TypeVar("_Doc", bound=BaseModel)


def _parse(model: type[_Doc], data: bytes | str, what: str) -> _Doc:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidDocument(f"{what}: {describe_validation_error(exc)}") from exc


def parse_config(data: bytes | str, what: str = "config.json") -> RuntimeConfig:
    """Validate a ``config.json`` document; errors name ``what`` and the bad field's path."""
    return _parse(RuntimeConfig, data, what)


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise NotFound(f"{path}: no such file") from exc
    except OSError as exc:
        raise from_oserror("open", str(path), exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidDocument(f"{path.name}: not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise InvalidDocument(f"{path.name}: larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise from_oserror("read", str(path), exc) from exc
    finally:
        os.close(fd)


def load_config(path: Path) -> RuntimeConfig:
    """Read and validate a bundle's ``config.json`` (at most :data:`MAX_CONFIG_SIZE` bytes).

    Raises :class:`NotFound` when the file is missing and :class:`InvalidDocument` when it is
    too large, not a regular file, or fails validation; the message starts with the file's
    name and the JSON path of the first bad field, e.g.
    ``config.json: process.args: List should have at least 1 item``.
    """
    return parse_config(_read_limited(path, MAX_CONFIG_SIZE), what=path.name)


def load_process(path: Path) -> Process:
    """Read a ``process.json`` (one ``process`` object, as ``runc exec --process`` takes)."""
    return _parse(Process, _read_limited(path, MAX_CONFIG_SIZE), path.name)


def load_resources(data: bytes | str, what: str = "resources") -> Resources:
    """Validate a ``linux.resources`` object given on its own (``runc update --resources``)."""
    if len(data) > MAX_CONFIG_SIZE:
        raise InvalidDocument(f"{what}: larger than {MAX_CONFIG_SIZE} bytes")
    return _parse(Resources, data, what)


def dump_config(cfg: RuntimeConfig) -> bytes:
    """The JSON isobox writes: JSON names, unset (None) fields left out, unknown fields kept.

    ``parse_config(dump_config(cfg))`` gives back an equal model.
    """
    data: dict[str, Any] = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    return (json.dumps(data, indent=2) + "\n").encode()


# --- the default configuration -------------------------------------------------------------------

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    # Docker's default set.
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

DEFAULT_NAMESPACES: tuple[NamespaceType, ...] = ("pid", "network", "ipc", "uts", "mount", "cgroup")


def _default_mounts() -> list[Mount]:
    def m(dest: str, fstype: str, source: str, *options: str) -> Mount:
        return Mount(
            destination=dest, type=fstype, source=source, options=list(options) or None
        )

    return [
        m("/proc", "proc", "proc"),
        m("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        m(
            "/dev/pts", "devpts", "devpts",
            "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5",
        ),
        m("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        m("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        m("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        m("/sys/fs/cgroup", "cgroup", "cgroup", "nosuid", "noexec", "nodev", "relatime", "ro"),
    ]


def default_config(args: list[str]) -> RuntimeConfig:
    """A ``runc spec``-like configuration for a root (not rootless) container running ``args``.

    New pid, network, ipc, uts, mount and cgroup namespaces (no user namespace); the
    standard /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys and /sys/fs/cgroup mounts;
    Docker's 14 default capabilities in the bounding, effective and permitted sets;
    ``RLIMIT_NOFILE`` 1024; ``noNewPrivileges``; Docker's masked and read-only paths; a
    device cgroup that denies everything (the runtime adds the default devices); no seccomp
    profile. The root filesystem is ``rootfs`` in the bundle, writable as under Docker.
    """
    caps = list(DEFAULT_CAPABILITIES)
    return RuntimeConfig(
        oci_version=SPEC_VERSION,
        root=Root(path="rootfs"),
        mounts=_default_mounts(),
        process=Process(
            user=User(uid=0, gid=0),
            args=list(args),
            env=[f"PATH={DEFAULT_PATH}", "TERM=xterm"],
            cwd="/",
            capabilities=Capabilities(bounding=caps, effective=list(caps), permitted=list(caps)),
            rlimits=[Rlimit(type="RLIMIT_NOFILE", hard=1024, soft=1024)],
            no_new_privileges=True,
        ),
        linux=Linux(
            namespaces=[Namespace(type=t) for t in DEFAULT_NAMESPACES],
            resources=Resources(devices=[DeviceCgroup(allow=False, access="rwm")]),
            masked_paths=list(DEFAULT_MASKED_PATHS),
            readonly_paths=list(DEFAULT_READONLY_PATHS),
        ),
    )
