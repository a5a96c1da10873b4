"""The compute-system document (wire version 1) and the API's request bodies, as pydantic models.

One ``POST /v1/compute-systems`` with a :class:`ComputeSystem` creates a container (the seeds'
HcsCreateComputeSystem with its JSON document). Field names on the wire are camelCase; every
model refuses unknown fields (``extra="forbid"``), so a typo is a 400 that names the field
instead of a setting silently ignored. :func:`parse_document` is the one entry point the
daemon uses; its errors name the JSON path of the first bad field
(``process.env[2]: must be KEY=VALUE``).

The response shapes are plain ``TypedDict``\\ s in :mod:`isobox.spec.wire`: the SDK and the
CLI read them without importing pydantic (CLI start time).
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from isobox.errors import InvalidDocument

SCHEMA_VERSION = "1.0"
#: Document versions this engine reads; a newer one is refused, never misread.
SUPPORTED_VERSIONS = ("1.0",)

Isolation = Literal["process", "vm", "host"]
ISOLATIONS: tuple[Isolation, ...] = ("process", "vm", "host")

# Used with fullmatch: ``$`` alone would accept a trailing newline ("id\n" made a folder
# and a cgroup name with a newline in it).
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_ID_RE = re.compile(r"^[a-f0-9]{64}$")
_ENV_RE = re.compile(r"^[^=\x00]+=[^\x00]*$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,254}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_CAP_RE = re.compile(r"CAP_[A-Z_]{2,32}")
_CPUSET_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def _invalid(reason: str) -> PydanticCustomError:
    return PydanticCustomError("isobox_invalid", "{reason}", {"reason": reason})


def _absolute(value: str, what: str) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise _invalid(f"{what} must be an absolute path, got {value!r}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class ProcessSpec(_Model):
    """What to run. ``args`` None: the image's Entrypoint + Cmd; ``entrypoint`` replaces the
    image's entrypoint (``[]`` clears it)."""

    args: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = Field(default_factory=list)
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    stdin: bool = False  # keep stdin open (``-i``)
    # docker's --cap-add: capabilities beyond Docker's default 14 (``ALL``: every one); the
    # bounding, effective and permitted sets get them. Ignored by host isolation (the host's
    # root already has them all).
    cap_add: list[str] = Field(default_factory=list)

    @field_validator("cap_add")
    @classmethod
    def _cap_add(cls, v: list[str]) -> list[str]:
        out = []
        for i, name in enumerate(v):
            norm = name.upper()
            norm = norm if norm == "ALL" or norm.startswith("CAP_") else "CAP_" + norm
            if norm != "ALL" and not _CAP_RE.fullmatch(norm):
                raise _invalid(f"capAdd[{i}]: not a capability name: {name!r}")
            out.append(norm)
        return out

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for i, item in enumerate(v):
            if not _ENV_RE.fullmatch(item):
                raise _invalid(f"env[{i}] must be KEY=VALUE, got {item!r}")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        return None if v is None else _absolute(v, "cwd")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER_RE.fullmatch(v):
            raise _invalid(f"user must be NAME|UID[:GROUP|GID], got {v!r}")
        return v

    @field_validator("args", "entrypoint")
    @classmethod
    def _no_nul(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any("\x00" in a for a in v):
            raise _invalid("arguments may not contain NUL bytes")
        return v


class MountSpec(_Model):
    """A mapped directory: a host folder bind-mounted into the container."""

    source: str
    destination: str
    read_only: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _absolute(v, "source")

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        v = _absolute(v, "destination")
        if posixpath.normpath(v) == "/":
            raise _invalid("destination may not be the container's root")
        return v


class PortSpec(_Model):
    """``-p [IP:]HOSTPORT:CTRPORT[/tcp|udp]``."""

    host_ip: str = ""
    host_port: Annotated[int, Field(ge=1, le=65535)]
    container_port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, v: str) -> str:
        if v:
            import ipaddress

            try:
                if ipaddress.ip_address(v).version != 4:
                    raise _invalid(f"hostIp must be an IPv4 address, got {v!r}")
            except ValueError as exc:
                raise _invalid(f"hostIp must be an IPv4 address, got {v!r}") from exc
        return v


_NET_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")


class NetworkSpec(_Model):
    """``mode``: ``default`` (the engine's default NAT network, as docker's bridge; the
    default), ``none`` (loopback only), ``host`` (the host's network), the name of a
    network, or ``container:<ref>`` (join that running container's network namespace)."""

    mode: str = "default"
    hostname: str | None = None
    ports: list[PortSpec] = Field(default_factory=list)
    rate: Annotated[int, Field(ge=1024)] | None = None  # egress bytes/s
    aliases: list[str] = Field(default_factory=list)

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v.startswith("container:"):
            if not v[len("container:"):]:
                raise _invalid("network mode container: needs a container")
            return v
        if not _NET_NAME_RE.fullmatch(v):
            raise _invalid(f"invalid network mode {v!r}: none, host, default, a network "
                           "name or container:<ref>")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _HOSTNAME_RE.fullmatch(a):
                raise _invalid(f"invalid alias {a!r}")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and not _HOSTNAME_RE.fullmatch(v):
            raise _invalid(f"invalid hostname {v!r}")
        return v


class ResourcesSpec(_Model):
    """The container's Job limits (see :class:`isobox.jobs.limits.Limits`)."""

    memory: Annotated[int, Field(ge=4 * 1024 * 1024)] | None = None  # bytes
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None  # docker's --cpus
    cpu_shares: Annotated[int, Field(ge=2, le=262144)] | None = None  # docker's --cpu-shares
    pids_limit: Annotated[int, Field(ge=1)] | None = None
    cpuset: str | None = None  # "0-1,3"

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _CPUSET_RE.fullmatch(v):
            raise _invalid(f"cpuset must be a list of CPUs like 0-1,3, got {v!r}")
        for part in v.split(","):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise _invalid(f"cpuset range {part!r} runs backwards")
            if int(hi or lo) >= 4096:
                raise _invalid(f"cpuset CPU {hi or lo} is out of range")
        return v


class VmSpec(_Model):
    """Options of ``isolation: vm`` (ignored by the others)."""

    # Start the utility VM as a clone of a pre-booted template (the fast path); false
    # boots it cold (``--no-template``). A container that does not fit a clone's slots
    # (more than 14 layers or 4 mapped folders) boots cold either way.
    template: bool = True


class ComputeSystem(_Model):
    """The versioned document that creates a container in one call."""

    schema_version: str
    id: str | None = None
    name: str | None = None
    image: str
    isolation: Isolation = "process"
    process: ProcessSpec = Field(default_factory=ProcessSpec)
    mounts: list[MountSpec] = Field(default_factory=list)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    labels: dict[str, str] = Field(default_factory=dict)
    vm: VmSpec = Field(default_factory=VmSpec)
    read_only: bool = False  # the root filesystem
    auto_remove: bool = False  # removed by the daemon when it stops (``run --rm``)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v not in SUPPORTED_VERSIONS:
            known = ", ".join(SUPPORTED_VERSIONS)
            raise _invalid(f"unsupported schemaVersion {v!r} (this engine reads {known})")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.fullmatch(v):
            raise _invalid("id must be 64 lowercase hex characters")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.fullmatch(v):
            raise _invalid(f"invalid name {v!r}: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v or len(v) > 512 or any(c.isspace() or c == "\x00" for c in v):
            raise _invalid(f"invalid image reference {v!r}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not _LABEL_KEY_RE.fullmatch(k):
                raise _invalid(f"invalid label key {k!r}")
        return v


class ExecSpec(_Model):
    """``POST /v1/compute-systems/{id}/exec``: another process in a running container."""

    args: Annotated[list[str], Field(min_length=1)]
    env: list[str] = Field(default_factory=list)
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    stdin: bool = False

    _env = field_validator("env")(ProcessSpec._env.__func__)  # type: ignore[attr-defined]
    _cwd = field_validator("cwd")(ProcessSpec._cwd.__func__)  # type: ignore[attr-defined]
    _user = field_validator("user")(ProcessSpec._user.__func__)  # type: ignore[attr-defined]


class StartRequest(_Model):
    """``POST /v1/compute-systems/{id}/start``: optionally under another isolation."""

    isolation: Isolation | None = None


class KillRequest(_Model):
    signal: str | int = "SIGKILL"


class StopRequest(_Model):
    timeout: Annotated[float, Field(ge=0, le=3600)] = 10.0


_M = TypeVar("_M", bound=BaseModel)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_model(model: type[_M], data: bytes | str | dict[str, Any], what: str) -> _M:
    """Validate a request body; :class:`InvalidDocument` names ``what`` and the field."""
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = _format_loc(tuple(first["loc"]))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        text = f"{what}: {where}: {msg}" if where else f"{what}: {msg}"
        raise InvalidDocument(text, field=where or None) from exc


def parse_document(data: bytes | str | dict[str, Any]) -> ComputeSystem:
    """The compute-system document of a create call."""
    return parse_model(ComputeSystem, data, "compute system")


def dump_document(doc: ComputeSystem) -> dict[str, Any]:
    """The document as it travels (camelCase keys, defaults included)."""
    return doc.model_dump(mode="json", by_alias=True)
