"""Response shapes of the compute API (version 1), as ``TypedDict``\\ s.

They cost nothing to import (no pydantic): the SDK and the CLI read responses through them;
the daemon builds them; ``scripts/gen_openapi.py`` turns them into the OpenAPI document's
schemas. Keys are camelCase as on the wire. Times are RFC 3339 UTC strings with a ``Z``.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

API_VERSION = "v1"
#: The ``Upgrade`` token of a raw stream (attach, exec): frames of :mod:`isobox.spec.stream`.
STREAM_PROTOCOL = "isobox-stream/1"

State = Literal["created", "running", "paused", "stopped", "removing"]
STATES: tuple[State, ...] = ("created", "running", "paused", "stopped", "removing")


class ErrorDetail(TypedDict):
    kind: str  # the class name in isobox.errors (``NotFound``, ``InvalidDocument``, ...)
    message: str
    field: NotRequired[str]  # the JSON path of the bad field (InvalidDocument)


class ErrorBody(TypedDict):
    error: ErrorDetail


class ComputeSystemInfo(TypedDict):
    """``GET /v1/compute-systems/{ref}``: what the engine knows about one container."""

    id: str
    name: str
    image: str  # the reference as given
    imageId: str  # sha256:... of the image config
    isolation: str  # of the current (or last) run
    state: State
    pid: int  # host pid of the container's first process (0 when none or inside a VM)
    exitCode: int | None
    error: str | None  # why the last run failed, when it did
    createdAt: str
    startedAt: str | None
    finishedAt: str | None
    labels: dict[str, str]
    document: dict[str, Any]  # the compute-system document (camelCase, defaults filled)
    rootfs: str  # host path where the container's root is mounted while it runs
    scratch: str  # host folder of the writable scratch layer


class CreateResult(TypedDict):
    id: str
    name: str
    warnings: list[str]


class WaitResult(TypedDict):
    exitCode: int
    signal: int | None  # the terminating signal, when killed by one
    error: str | None


class ExecResult(TypedDict):
    exitCode: int
    signal: int | None


class StatsSample(TypedDict):
    """One sample of a container's job accounting (exited processes included)."""

    read: str  # when sampled
    cpuUsageNs: int  # total CPU time of every process the job ever ran
    cpuPercent: float  # of one CPU, since the previous sample of this stream (0 at first)
    memoryBytes: int
    memoryLimit: int | None
    memoryPeakBytes: int | None
    pids: int  # processes alive now
    pidsLimit: int | None
    totalProcesses: int | None  # started over the container's life (None: not counted)
    ioReadBytes: int
    ioWriteBytes: int


class ProcessEntry(TypedDict):
    pid: int  # as the host sees it (0 inside a VM)
    containerPid: int  # as the container sees it
    ppid: int
    uid: int
    state: str
    cpuTimeNs: int
    rssBytes: int
    command: str


class ProcessList(TypedDict):
    processes: list[ProcessEntry]


class LogEntry(TypedDict):
    time: str
    stream: Literal["stdout", "stderr"]
    line: str  # one line with its newline; the last of a run may lack it


class Event(TypedDict):
    time: str
    type: Literal["container", "image", "daemon"]
    action: str  # create start die destroy kill pause unpause oom limit ...
    id: str
    name: str
    attributes: dict[str, str]


class PortMap(TypedDict):
    """A published port: ``hostIp:hostPort`` on the host → ``containerPort`` inside."""

    hostIp: str  # "" or "0.0.0.0": every host address, 127.0.0.1 included
    hostPort: int
    containerPort: int
    protocol: Literal["tcp", "udp"]


class Endpoint(TypedDict):
    """One container on one network."""

    containerId: str
    network: str  # name
    networkId: str
    ip: str
    prefixLen: int
    gateway: str
    mac: str
    hostVeth: str  # host side of the veth pair ("" until attached)
    ports: list[PortMap]
    rate: int | None  # egress bytes/s


class NetworkInfo(TypedDict):
    id: str
    name: str
    subnet: str  # CIDR
    gateway: str
    bridge: str
    internal: bool
    labels: dict[str, str]
    createdAt: str
    endpoints: dict[str, str]  # container id -> ip


class ImageInfo(TypedDict):
    id: str  # sha256:... of the config
    tags: list[str]
    digest: str  # manifest digest
    size: int
    created: str | None
    layers: int


class DaemonInfo(TypedDict):
    version: str
    apiVersion: str
    pid: int
    root: str
    run: str
    cgroupVersion: int
    isolations: dict[str, str]  # isolation -> "available" or why not
    accelerator: str | None  # kvm / tcg for vm isolation, with the reason in isolations
    containers: dict[str, int]  # per state
    images: int
    networks: NotRequired[int]  # networks made (the default one once used)
