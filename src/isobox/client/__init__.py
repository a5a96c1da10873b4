"""The isobox SDK: ``from isobox.client import Client`` (see :mod:`isobox.client.api`).

It talks to ``isoboxd`` over HTTP on its unix socket and imports no engine code and no
pydantic, so it starts fast and works against a daemon on another machine's socket. The
daemon's errors arrive as the classes of :mod:`isobox.errors` (re-exported here), named by
the error body's ``kind``.
"""

from isobox.client.api import (
    Client,
    Container,
    ContainerCollection,
    ExecResult,
    Image,
    ImageCollection,
    Network,
    NetworkCollection,
)
from isobox.client.errors import ContainerError, DaemonUnavailable
from isobox.errors import (
    Conflict,
    ImageInUse,
    ImageNotFound,
    InvalidArgument,
    InvalidDocument,
    InvalidReference,
    IsoboxError,
    NotFound,
)

__all__ = [
    "Client",
    "Conflict",
    "Container",
    "ContainerCollection",
    "ContainerError",
    "DaemonUnavailable",
    "ExecResult",
    "Image",
    "ImageCollection",
    "ImageInUse",
    "ImageNotFound",
    "InvalidArgument",
    "InvalidDocument",
    "InvalidReference",
    "IsoboxError",
    "Network",
    "NetworkCollection",
    "NotFound",
]
