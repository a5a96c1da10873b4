"""The routes of the API, each a thin call into the compute service.

A handler parses the query and body (the request models of :mod:`isobox.spec.compute`),
makes one service call and wraps the result; it holds no state and no engine logic. The
one exception is the stream routes (attach, exec, ``start?attach=1``): they check what can
fail (the container exists, is in a state that allows the call) *before* the
``101 Switching Protocols``, because after it an error is only an error frame.

The service is typed as the :class:`Service` protocol (what the API needs of
:class:`isobox.compute.service.ComputeService`), so the daemon passes the real one and a
unit test may pass a small fake.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from isobox.errors import Conflict, InvalidArgument
from isobox.spec import wire
from isobox.spec.compute import (
    ComputeSystem,
    ExecSpec,
    KillRequest,
    StartRequest,
    StopRequest,
    parse_document,
)
from isobox.spec.wire import STREAM_PROTOCOL

from .server import (
    STREAM,
    TEXT,
    Binary,
    BytesReply,
    HTTPError,
    JsonLines,
    LinesReply,
    Param,
    Reply,
    Request,
    Response,
    RouteDoc,
    Router,
    TextReply,
    UpgradeReply,
)

#: Largest image archive accepted by ``POST /v1/images/import`` (spooled to disk first).
MAX_IMAGE_UPLOAD = 16 << 30
WAIT_CONDITIONS = ("not-running", "removed")
EXPORT_FORMATS = ("oci", "docker")


class ImageServiceAPI(Protocol):
    """What the API calls on :class:`isobox.compute.images.ImageService`."""

    def list(self) -> list[wire.ImageInfo]: ...
    def inspect(self, ref: str) -> dict[str, Any]: ...
    def remove(self, ref: str, force: bool = False) -> dict[str, Any]: ...
    def tag(self, ref: str, new: str) -> None: ...
    def prune(self) -> dict[str, Any]: ...
    def import_stream(self, stream: BinaryIO, tag: str | None) -> wire.ImageInfo: ...
    def export(self, ref: str, fmt: str = "oci") -> Iterator[bytes]: ...
    def bootstrap(self, kind: str = "busybox") -> wire.ImageInfo: ...


class NetworkServiceAPI(Protocol):
    """What the API calls on :class:`isobox.network.NetworkService`."""

    def create(self, name: str, *, subnet: str | None = None, internal: bool = False,
               labels: dict[str, str] | None = None) -> wire.NetworkInfo: ...
    def get(self, ref: str) -> wire.NetworkInfo: ...
    def list(self) -> list[wire.NetworkInfo]: ...
    def remove(self, ref: str) -> None: ...


class Service(Protocol):
    """What the API calls on :class:`isobox.compute.service.ComputeService`."""

    @property
    def images(self) -> ImageServiceAPI: ...
    @property
    def networks(self) -> NetworkServiceAPI: ...
    def info(self) -> wire.DaemonInfo: ...
    def create(self, doc: ComputeSystem) -> wire.CreateResult: ...
    def start(self, ref: str, *, isolation: str | None = None,
              attach: socket.socket | None = None, stdin: bool = False) -> None: ...
    def attach(self, ref: str, sock: socket.socket, *, stdin: bool = False,
               stdout: bool = True, stderr: bool = True) -> None: ...
    def exec(self, ref: str, spec: ExecSpec, sock: socket.socket) -> None: ...
    def wait(self, ref: str, *, condition: str = "not-running",
             timeout: float | None = None) -> wire.WaitResult: ...
    def kill(self, ref: str, signal: int | str = "SIGKILL") -> None: ...
    def stop(self, ref: str, *, timeout: float = 10.0) -> None: ...
    def pause(self, ref: str) -> None: ...
    def resume(self, ref: str) -> None: ...
    def remove(self, ref: str, *, force: bool = False) -> None: ...
    def inspect(self, ref: str) -> wire.ComputeSystemInfo: ...
    def enumerate(self, *, states: list[str] | None = None, isolation: str | None = None,
                  labels: dict[str, str | None] | None = None,
                  name: str | None = None) -> list[wire.ComputeSystemInfo]: ...
    def top(self, ref: str) -> wire.ProcessList: ...
    def stats(self, ref: str) -> wire.StatsSample: ...
    def stats_stream(self, ref: str, interval: float = 1.0) -> Iterator[wire.StatsSample]: ...
    def logs(self, ref: str, *, follow: bool = False, since: str | None = None,
             until: str | None = None, tail: int | None = None, stdout: bool = True,
             stderr: bool = True) -> Iterator[wire.LogEntry]: ...
    def events(self, *, since: str | None = None, until: str | None = None,
               filters: dict[str, list[str]] | None = None,
               follow: bool = True) -> Iterator[wire.Event]: ...
    def archive_get(self, ref: str, path: str) -> Iterator[bytes]: ...
    def archive_put(self, ref: str, path: str, stream: BinaryIO) -> None: ...


class TagRequest(BaseModel):
    """``POST /v1/images/{ref}/tag``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str


class BootstrapRequest(BaseModel):
    """``POST /v1/images/bootstrap``: build a small image from what the host has."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = "busybox"


_NET_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
#: Names a network may not have: network modes of the document, and the name of the
#: engine's default network (made by the engine on first use, never by a user).
RESERVED_NETWORK_NAMES = ("none", "host", "default", "bridge", "isobox")


class NetworkCreateRequest(BaseModel):
    """``POST /v1/networks``: a NAT network (``internal``: no route out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    subnet: str | None = None  # IPv4 CIDR; none: a free /24 of the pool
    internal: bool = False
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NET_NAME_RE.fullmatch(v):
            raise PydanticCustomError(
                "isobox_invalid", "{reason}",
                {"reason": f"invalid network name {v!r}: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 64"})
        if v in RESERVED_NETWORK_NAMES:
            raise PydanticCustomError(
                "isobox_invalid", "{reason}",
                {"reason": f"{v!r} is reserved (a network mode, or the default network's "
                           "name)"})
        return v


def _need_upgrade(req: Request) -> None:
    if not req.wants_upgrade:
        raise HTTPError(400, f"this call streams: send Upgrade: {STREAM_PROTOCOL} and "
                             "Connection: Upgrade")


def _need_state(info: wire.ComputeSystemInfo, allowed: tuple[str, ...], what: str) -> None:
    if info["state"] not in allowed:
        raise Conflict(f"cannot {what} container {info['name']} ({info['id'][:12]}): it is "
                       f"{info['state']}")


def _need_arg(req: Request, name: str) -> str:
    value = req.arg(name)
    if not value:
        raise InvalidArgument(f"query parameter {name} is required")
    return value


def _spool(body: io.RawIOBase, tmp_dir: Path, limit: int) -> BinaryIO:
    """The request body copied to an unlinked temp file (rewound): an image import reads
    its archive more than once and must not hold the connection's pace."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", dir=tmp_dir)
    os.unlink(name)
    fh = os.fdopen(fd, "w+b")
    try:
        total = 0
        while chunk := body.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise HTTPError(413, f"upload larger than {limit} bytes")
            fh.write(chunk)
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh


_REF = "the container: a full id, a unique id prefix, or a name"
_CS = ("compute-systems",)
_IMG = ("images",)
_NET = ("networks",)


def build_router(service: Service, *, tmp_dir: Path | None = None) -> Router:
    """Every route of API v1 over ``service``. ``tmp_dir``: where uploads are spooled
    (``$ISOBOX_ROOT/tmp``)."""
    from isobox.paths import root_dir

    spool_dir = tmp_dir if tmp_dir is not None else root_dir() / "tmp"
    r = Router()
    document: dict[str, Any] = {}

    # --- the daemon

    @r.route("GET", "/v1/_ping", RouteDoc("Is the daemon up", responses={200: TEXT},
                                          tags=("system",)))
    def ping(req: Request) -> Response:
        return TextReply("OK")

    @r.route("GET", "/v1/info", RouteDoc("The daemon, the host and what they can run",
                                         responses={200: wire.DaemonInfo}, tags=("system",)))
    def info(req: Request) -> Response:
        return Reply(service.info())

    @r.route("GET", "/v1/openapi.json", RouteDoc(
        "This document", responses={200: dict[str, Any]}, tags=("system",)))
    def openapi(req: Request) -> Response:
        if not document:
            from .openapi import build_document

            document.update(build_document(r))
        return Reply(document)

    @r.route("GET", "/v1/events", RouteDoc(
        "Events of containers, images and the daemon",
        query=(Param("since", description="RFC 3339 time or unix seconds"),
               Param("until", description="RFC 3339 time or unix seconds"),
               Param("follow", "boolean", "keep streaming new events (default 1)"),
               Param("filter", description="key=value (type, action, id, name, label)",
                     repeatable=True)),
        responses={200: JsonLines(wire.Event)}, tags=("system",)))
    def events(req: Request) -> Response:
        filters: dict[str, list[str]] = {}
        for item in req.args("filter"):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"filter must be key=value, got {item!r}")
            filters.setdefault(key, []).append(value)
        return LinesReply(service.events(
            since=req.arg("since") or None, until=req.arg("until") or None,
            filters=filters or None, follow=req.flag("follow", True)))

    # --- compute systems

    @r.route("POST", "/v1/compute-systems", RouteDoc(
        "Create a compute system from its document", body=ComputeSystem,
        responses={201: wire.CreateResult}, tags=_CS))
    def create(req: Request) -> Response:
        doc = parse_document(req.raw_json())
        return Reply(service.create(doc), 201)

    @r.route("GET", "/v1/compute-systems", RouteDoc(
        "Enumerate compute systems",
        query=(Param("state", description="created|running|paused|stopped|removing",
                     repeatable=True),
               Param("isolation", description="process|vm|host"),
               Param("label", description="k or k=v", repeatable=True),
               Param("name", description="exact name")),
        responses={200: list[wire.ComputeSystemInfo]}, tags=_CS))
    def enumerate_(req: Request) -> Response:
        states = [s for v in req.args("state") for s in v.split(",") if s]
        for s in states:
            if s not in wire.STATES:
                raise InvalidArgument(f"unknown state {s!r} (one of {', '.join(wire.STATES)})")
        labels: dict[str, str | None] = {}
        for item in req.args("label"):
            key, sep, value = item.partition("=")
            if not key:
                raise InvalidArgument(f"label filter must be k or k=v, got {item!r}")
            labels[key] = value if sep else None
        return Reply(service.enumerate(
            states=states or None, isolation=req.arg("isolation") or None,
            labels=labels or None, name=req.arg("name") or None))

    @r.route("GET", "/v1/compute-systems/{ref}", RouteDoc(
        "Inspect a compute system", responses={200: wire.ComputeSystemInfo}, tags=_CS))
    def inspect(req: Request) -> Response:
        return Reply(service.inspect(req.params["ref"]))

    @r.route("DELETE", "/v1/compute-systems/{ref}", RouteDoc(
        "Remove a compute system (force: stop it first)",
        query=(Param("force", "boolean", "kill and remove a running one"),),
        responses={204: None}, tags=_CS))
    def remove(req: Request) -> Response:
        service.remove(req.params["ref"], force=req.flag("force"))
        return Reply(status=204)

    @r.route("POST", "/v1/compute-systems/{ref}/start", RouteDoc(
        "Start (or restart) a compute system, optionally attached",
        query=(Param("attach", "boolean", f"stream its stdio (needs Upgrade: {STREAM_PROTOCOL})"),
               Param("stdin", "boolean", "with attach: send stdin")),
        body=StartRequest, responses={204: None, 101: STREAM}, tags=_CS))
    def start(req: Request) -> Response:
        body = req.model(StartRequest, "start request")
        ref = req.params["ref"]
        if not req.flag("attach"):
            service.start(ref, isolation=body.isolation)
            return Reply(status=204)
        _need_upgrade(req)
        cid = service.inspect(ref)
        _need_state(cid, ("created", "stopped"), "start")
        stdin = req.flag("stdin")
        return UpgradeReply(lambda sock: service.start(
            cid["id"], isolation=body.isolation, attach=sock, stdin=stdin))

    @r.route("POST", "/v1/compute-systems/{ref}/attach", RouteDoc(
        "Attach to the stdio of a running compute system",
        query=(Param("stdin", "boolean", "send stdin (default 0)"),
               Param("stdout", "boolean", "receive stdout (default 1)"),
               Param("stderr", "boolean", "receive stderr (default 1)")),
        responses={101: STREAM}, tags=_CS))
    def attach(req: Request) -> Response:
        _need_upgrade(req)
        cid = service.inspect(req.params["ref"])
        _need_state(cid, ("running", "paused"), "attach to")
        stdin, stdout, stderr = req.flag("stdin"), req.flag("stdout", True), req.flag(
            "stderr", True)
        return UpgradeReply(lambda sock: service.attach(
            cid["id"], sock, stdin=stdin, stdout=stdout, stderr=stderr))

    @r.route("POST", "/v1/compute-systems/{ref}/exec", RouteDoc(
        "Run another process in a running compute system", body=ExecSpec,
        responses={101: STREAM}, tags=_CS))
    def exec_(req: Request) -> Response:
        spec = req.model(ExecSpec, "exec")
        _need_upgrade(req)
        cid = service.inspect(req.params["ref"])
        _need_state(cid, ("running",), "exec in")
        return UpgradeReply(lambda sock: service.exec(cid["id"], spec, sock))

    @r.route("POST", "/v1/compute-systems/{ref}/wait", RouteDoc(
        "Wait until a compute system stops (or is removed)",
        query=(Param("condition", description="not-running (default) | removed"),
               Param("timeout", "number", "seconds; none: no limit")),
        responses={200: wire.WaitResult}, tags=_CS))
    def wait(req: Request) -> Response:
        condition = req.arg("condition") or "not-running"
        if condition not in WAIT_CONDITIONS:
            raise InvalidArgument(f"condition must be one of {', '.join(WAIT_CONDITIONS)}, "
                                  f"got {condition!r}")
        timeout = req.float_arg("timeout")
        if timeout is not None and timeout < 0:
            raise InvalidArgument("timeout may not be negative")
        return Reply(service.wait(req.params["ref"], condition=condition, timeout=timeout))

    @r.route("POST", "/v1/compute-systems/{ref}/kill", RouteDoc(
        "Send a signal to the compute system's process", body=KillRequest,
        responses={204: None}, tags=_CS))
    def kill(req: Request) -> Response:
        body = req.model(KillRequest, "kill request")
        service.kill(req.params["ref"], body.signal)
        return Reply(status=204)

    @r.route("POST", "/v1/compute-systems/{ref}/stop", RouteDoc(
        "Stop: SIGTERM, then SIGKILL after the timeout", body=StopRequest,
        responses={204: None}, tags=_CS))
    def stop(req: Request) -> Response:
        body = req.model(StopRequest, "stop request")
        service.stop(req.params["ref"], timeout=body.timeout)
        return Reply(status=204)

    @r.route("POST", "/v1/compute-systems/{ref}/pause", RouteDoc(
        "Freeze every process of the compute system", responses={204: None}, tags=_CS))
    def pause(req: Request) -> Response:
        service.pause(req.params["ref"])
        return Reply(status=204)

    @r.route("POST", "/v1/compute-systems/{ref}/resume", RouteDoc(
        "Thaw a paused compute system", responses={204: None}, tags=_CS))
    def resume(req: Request) -> Response:
        service.resume(req.params["ref"])
        return Reply(status=204)

    @r.route("GET", "/v1/compute-systems/{ref}/logs", RouteDoc(
        "The compute system's output, as recorded",
        query=(Param("follow", "boolean", "keep streaming until it stops"),
               Param("since", description="RFC 3339 time or unix seconds"),
               Param("until", description="RFC 3339 time or unix seconds"),
               Param("tail", "integer", "only the last n lines"),
               Param("stdout", "boolean", "default 1"), Param("stderr", "boolean", "default 1")),
        responses={200: JsonLines(wire.LogEntry)}, tags=_CS))
    def logs(req: Request) -> Response:
        ref = req.params["ref"]
        tail = req.int_arg("tail")
        if tail is not None and tail < 0:
            raise InvalidArgument("tail may not be negative")
        follow, out, err = req.flag("follow"), req.flag("stdout", True), req.flag("stderr", True)
        cid = service.inspect(ref)  # a 404 before the stream starts
        return LinesReply(service.logs(
            cid["id"], follow=follow, since=req.arg("since") or None,
            until=req.arg("until") or None, tail=tail, stdout=out, stderr=err))

    @r.route("GET", "/v1/compute-systems/{ref}/stats", RouteDoc(
        "Resource usage: one sample, or a stream of them",
        query=(Param("stream", "boolean", "a sample every interval, as JSON lines"),
               Param("interval", "number", "seconds between samples (default 1)")),
        responses={200: wire.StatsSample}, tags=_CS))
    def stats(req: Request) -> Response:
        ref = req.params["ref"]
        if not req.flag("stream"):
            return Reply(service.stats(ref))
        interval = req.float_arg("interval", 1.0)
        assert interval is not None
        if not 0.05 <= interval <= 3600:
            raise InvalidArgument("interval must be between 0.05 and 3600 seconds")
        cid = service.inspect(ref)
        return LinesReply(service.stats_stream(cid["id"], interval=interval))

    @r.route("GET", "/v1/compute-systems/{ref}/top", RouteDoc(
        "The compute system's processes", responses={200: wire.ProcessList}, tags=_CS))
    def top(req: Request) -> Response:
        return Reply(service.top(req.params["ref"]))

    @r.route("GET", "/v1/compute-systems/{ref}/archive", RouteDoc(
        "A tar of a path inside the compute system (copy out)",
        query=(Param("path", description="absolute path in the container (required)"),),
        responses={200: Binary(description="a tar")}, tags=_CS))
    def archive_get(req: Request) -> Response:
        return BytesReply(service.archive_get(req.params["ref"], _need_arg(req, "path")))

    @r.route("PUT", "/v1/compute-systems/{ref}/archive", RouteDoc(
        "Extract a tar into a folder inside the compute system (copy in)",
        query=(Param("path", description="absolute folder in the container (required)"),),
        body=Binary(description="a tar"), responses={204: None}, tags=_CS))
    def archive_put(req: Request) -> Response:
        service.archive_put(req.params["ref"], _need_arg(req, "path"),
                            cast(BinaryIO, req.body))
        return Reply(status=204)

    # --- images

    @r.route("GET", "/v1/images", RouteDoc(
        "List images", responses={200: list[wire.ImageInfo]}, tags=_IMG))
    def images_list(req: Request) -> Response:
        return Reply(service.images.list())

    @r.route("POST", "/v1/images/import", RouteDoc(
        "Import an image archive (OCI layout/archive, docker save, or a rootfs tar)",
        query=(Param("tag", description="name:tag to give it"),),
        body=Binary(description="an image archive"), responses={201: wire.ImageInfo},
        tags=_IMG))
    def images_import(req: Request) -> Response:
        tag = req.arg("tag") or None
        fh = _spool(req.body, spool_dir, MAX_IMAGE_UPLOAD)
        with contextlib.closing(fh):
            return Reply(service.images.import_stream(fh, tag), 201)

    @r.route("POST", "/v1/images/prune", RouteDoc(
        "Remove untagged images no container uses", responses={200: dict[str, Any]},
        tags=_IMG))
    def images_prune(req: Request) -> Response:
        return Reply(service.images.prune())

    @r.route("POST", "/v1/images/bootstrap", RouteDoc(
        "Build a small image (busybox) from the host's packages", body=BootstrapRequest,
        responses={201: wire.ImageInfo}, tags=_IMG))
    def images_bootstrap(req: Request) -> Response:
        body = req.model(BootstrapRequest, "bootstrap request")
        return Reply(service.images.bootstrap(body.kind), 201)

    @r.route("GET", "/v1/images/{ref}", RouteDoc(
        "Inspect an image (its reference percent-encoded)", responses={200: dict[str, Any]},
        tags=_IMG))
    def images_inspect(req: Request) -> Response:
        return Reply(service.images.inspect(req.params["ref"]))

    @r.route("DELETE", "/v1/images/{ref}", RouteDoc(
        "Remove an image (untag; delete when no tag is left)",
        query=(Param("force", "boolean", "also when containers use it"),),
        responses={200: dict[str, Any]}, tags=_IMG))
    def images_remove(req: Request) -> Response:
        return Reply(service.images.remove(req.params["ref"], force=req.flag("force")))

    @r.route("GET", "/v1/images/{ref}/export", RouteDoc(
        "Export an image as a tar", query=(Param("format", description="oci (default)|docker"),),
        responses={200: Binary(description="an OCI or docker-save archive")}, tags=_IMG))
    def images_export(req: Request) -> Response:
        fmt = req.arg("format") or "oci"
        if fmt not in EXPORT_FORMATS:
            raise InvalidArgument(f"format must be oci or docker, got {fmt!r}")
        return BytesReply(service.images.export(req.params["ref"], fmt))

    @r.route("POST", "/v1/images/{ref}/tag", RouteDoc(
        "Give an image another name", body=TagRequest, responses={204: None}, tags=_IMG))
    def images_tag(req: Request) -> Response:
        body = req.model(TagRequest, "tag request")
        service.images.tag(req.params["ref"], body.tag)
        return Reply(status=204)

    # --- networks

    @r.route("POST", "/v1/networks", RouteDoc(
        "Create a NAT network", body=NetworkCreateRequest, responses={201: wire.NetworkInfo},
        tags=_NET))
    def networks_create(req: Request) -> Response:
        body = req.model(NetworkCreateRequest, "network")
        return Reply(service.networks.create(body.name, subnet=body.subnet,
                                             internal=body.internal,
                                             labels=dict(body.labels)), 201)

    @r.route("GET", "/v1/networks", RouteDoc(
        "List networks (the default one once it was used)",
        responses={200: list[wire.NetworkInfo]}, tags=_NET))
    def networks_list(req: Request) -> Response:
        return Reply(service.networks.list())

    @r.route("GET", "/v1/networks/{ref}", RouteDoc(
        "Inspect a network (id, id prefix or name): its endpoints by container",
        responses={200: wire.NetworkInfo}, tags=_NET))
    def networks_inspect(req: Request) -> Response:
        return Reply(service.networks.get(req.params["ref"]))

    @r.route("DELETE", "/v1/networks/{ref}", RouteDoc(
        "Remove a network (409 while a container is on it)", responses={204: None},
        tags=_NET))
    def networks_remove(req: Request) -> Response:
        service.networks.remove(req.params["ref"])
        return Reply(status=204)

    return r
