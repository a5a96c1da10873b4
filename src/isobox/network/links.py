"""Links, addresses, routes and qdiscs, through netlink (pyroute2), never by parsing ``ip``.

pyroute2 has no type hints; every use of it stays in this module behind small typed
functions, so the rest of the package is checked by ``mypy --strict``.

Work inside a container's network namespace goes through a netlink socket *opened in* that
namespace: a short-lived thread enters the namespace with ``setns(CLONE_NEWNET)`` (which
changes only the calling thread), opens the socket, and goes back. A socket keeps the
namespace it was made in, so the daemon never forks from its threads for this (pyroute2's
own ``netns=`` does fork a helper process per socket).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from isobox._sys import linux
from isobox.errors import SystemError_

NETLINK_ROUTE = 0


def _err(op: str, what: str, exc: NetlinkError | OSError) -> SystemError_:
    code = exc.code if isinstance(exc, NetlinkError) else (exc.errno or 0)
    return SystemError_(op, what, code)


def _netns_socket(netns: str) -> socket.socket:
    """A NETLINK_ROUTE socket living in the network namespace at path ``netns``."""
    out: list[socket.socket | BaseException] = []

    def enter() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(target, linux.CLONE_NEWNET, netns)
                try:
                    out.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                             NETLINK_ROUTE))
                finally:
                    linux.setns(home, linux.CLONE_NEWNET, "/proc/thread-self/ns/net")
            finally:
                os.close(target)
        except BaseException as exc:  # carried to the caller's thread
            out.append(exc)
        finally:
            os.close(home)

    t = threading.Thread(target=enter, name="isobox-netns", daemon=True)
    t.start()
    t.join()
    res = out[0]
    if isinstance(res, BaseException):
        if isinstance(res, OSError):
            raise SystemError_("open netns", netns, res.errno or 0) from res
        raise res
    return res


@contextmanager
def rtnl(netns: str | None = None) -> Iterator[Any]:
    """An ``IPRoute`` on the host, or inside the network namespace at path ``netns``."""
    if netns is None:
        ipr = IPRoute()
    else:
        sock = _netns_socket(netns)
        try:
            ipr = IPRoute(fileno=sock.detach())
        except BaseException:
            sock.close()
            raise
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_names(prefix: str) -> list[str]:
    """Names of the host's links that start with ``prefix``."""
    with rtnl() as ipr:
        names = [str(m.get_attr("IFLA_IFNAME")) for m in ipr.link("dump")]
    return sorted(n for n in names if n.startswith(prefix))


def host_networks() -> list[tuple[str, int]]:
    """(network address, prefix length) of every IPv4 route and address on the host, the
    default route excepted: a new network's subnet must overlap none of them."""
    out: list[tuple[str, int]] = []
    with rtnl() as ipr:
        for r in ipr.route("dump", family=socket.AF_INET):
            dst = r.get_attr("RTA_DST")
            plen = int(r["dst_len"])
            if dst and plen:
                out.append((str(dst), plen))
        for a in ipr.addr("dump", family=socket.AF_INET):
            out.append((str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"])))
    return out


def ensure_bridge(name: str, gateway: str, prefix: int) -> None:
    """The bridge ``name`` exists, has ``gateway/prefix`` and is up (idempotent)."""
    try:
        with rtnl() as ipr:
            idx = link_index(ipr, name)
            if idx is None:
                try:
                    ipr.link("add", ifname=name, kind="bridge")
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                idx = link_index(ipr, name)
                assert idx is not None
            have = {(str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
                    for a in ipr.addr("dump", index=idx, family=socket.AF_INET)}
            if (gateway, prefix) not in have:
                ipr.addr("add", index=idx, address=gateway, prefixlen=prefix)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise _err("create bridge", name, exc) from exc
    # 127.0.0.1 → container (published ports seen by the host itself) needs the bridge to
    # route loopback sources; forwarding makes NAT out and ports work at all.
    write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
    write_sysctl("net/ipv4/ip_forward", "1")


def delete_link(name: str) -> bool:
    """Delete the host link ``name``; False if it was not there (idempotent)."""
    try:
        with rtnl() as ipr:
            idx = link_index(ipr, name)
            if idx is None:
                return False
            ipr.link("del", index=idx)
            return True
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise _err("delete link", name, exc) from exc


def write_sysctl(key: str, value: str) -> None:
    path = f"/proc/sys/{key}"
    try:
        with open(path) as fh:
            if fh.read().strip() == value:
                return
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise SystemError_("write sysctl", path, exc.errno or 0) from exc


def attach_veth(*, host: str, bridge: str, netns: str, mac: str, ip: str, prefix: int,
                gateway: str, rate: int | None = None) -> None:
    """A veth pair: ``host`` on ``bridge`` (up), its peer made directly as ``eth0`` inside the
    namespace at ``netns`` with ``mac``, ``ip/prefix``, up, default route via ``gateway``, lo
    up, and a tbf qdisc of ``rate`` bytes/s when given. On failure the pair is deleted."""
    try:
        nsfd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemError_("open network namespace", netns, exc.errno or 0) from exc
    try:
        with rtnl() as ipr:
            br = link_index(ipr, bridge)
            if br is None:
                raise SystemError_("attach veth: no bridge", bridge, errno.ENODEV)
            try:
                ipr.link("add", ifname=host, kind="veth",
                         peer={"ifname": "eth0", "address": mac, "net_ns_fd": nsfd})
            except NetlinkError as exc:
                raise _err("create veth", host, exc) from exc
            try:
                idx = link_index(ipr, host)
                assert idx is not None
                ipr.link("set", index=idx, master=br, state="up")
                _inside(netns, ip=ip, prefix=prefix, gateway=gateway, rate=rate)
            except BaseException:
                with suppress(NetlinkError):
                    ipr.link("del", ifname=host)
                raise
    except NetlinkError as exc:
        raise _err("attach veth", host, exc) from exc
    finally:
        os.close(nsfd)


def tap_name(host_veth: str) -> str:
    """The tap of an endpoint whose veth would be ``host_veth`` (``ibv…`` → ``ibt…``): named
    from the same row, so the release path finds it whatever step a crash stopped."""
    return "ibt" + host_veth[3:]


def attach_tap(*, name: str, bridge: str) -> None:
    """A persistent tap ``name`` owned by root, on ``bridge``, up: a utility VM's network
    device (QEMU opens it by name). On failure the tap is deleted."""
    try:
        with rtnl() as ipr:
            br = link_index(ipr, bridge)
            if br is None:
                raise SystemError_("attach tap: no bridge", bridge, errno.ENODEV)
            try:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=0, gid=0)
            except NetlinkError as exc:
                raise _err("create tap", name, exc) from exc
            try:
                idx = link_index(ipr, name)
                if idx is None:
                    raise SystemError_("create tap", name, errno.ENODEV)
                ipr.link("set", index=idx, master=br, state="up")
            except BaseException:
                with suppress(NetlinkError):
                    ipr.link("del", ifname=name)
                raise
    except NetlinkError as exc:
        raise _err("attach tap", name, exc) from exc


def _inside(netns: str, *, ip: str, prefix: int, gateway: str, rate: int | None) -> None:
    with rtnl(netns) as ipr:
        lo = link_index(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        eth = link_index(ipr, "eth0")
        if eth is None:
            raise SystemError_("attach veth: no eth0 in", netns, errno.ENODEV)
        ipr.addr("add", index=eth, address=ip, prefixlen=prefix)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth)
        if rate:
            ipr.tc("add", "tbf", eth, handle=0x10000, **tbf_params(rate))


def tbf_params(rate: int) -> dict[str, int | str]:
    """A token bucket of ``rate`` bytes/s: a burst of 1/50 s of traffic (at least a few
    full frames, so one frame always fits) and 50 ms of queue."""
    rate = min(rate, 2**32 - 1)  # tbf's rate field is 32 bits
    return {"rate": rate, "burst": max(rate // 50, 16 * 1514), "latency": "50ms"}


def qdisc_kinds(netns: str, ifname: str = "eth0") -> list[str]:
    """The qdisc kinds on ``ifname`` inside ``netns`` (for tests and inspection)."""
    with rtnl(netns) as ipr:
        idx = link_index(ipr, ifname)
        if idx is None:
            return []
        return [str(q.get_attr("TCA_KIND")) for q in ipr.get_qdiscs(index=idx)]


def addresses(netns: str | None = None) -> list[tuple[str, str, int]]:
    """(link name, address, prefix length) of every IPv4 address, on the host or in ``netns``."""
    with rtnl(netns) as ipr:
        names = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.link("dump")}
        return [(names.get(int(a["index"]), "?"), str(a.get_attr("IFA_ADDRESS")),
                 int(a["prefixlen"])) for a in ipr.addr("dump", family=socket.AF_INET)]
