"""Review of issue 6 (networking), on the Host Networking Service with real kernel objects.

Each test shows one defect found in review and fails until it is fixed. "Containers" are
processes alone in a network namespace (tests/netkit.py); a "LAN neighbour" is one more
namespace joined to the host by a veth pair the test makes (addresses of 198.18.0.0/15,
the benchmarking range, never routed anywhere), standing for another machine on the
host's link. Traffic the neighbour sends is crafted with a packet socket, as anyone on a
LAN can.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from isobox._sys import linux
from isobox.errors import Conflict, InvalidArgument
from isobox.network import links
from isobox.network.service import NetworkService
from isobox.spec.wire import PortMap
from netkit import SERVER, Netns, host_state

pytestmark = [pytest.mark.root, pytest.mark.net]

T = TypeVar("T")


# --- packets ------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int(w) for w in struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int,
              payload: bytes) -> bytes:
    """An Ethernet frame with one IPv4/UDP datagram from ``src`` to ``dst`` (each a MAC and
    an address; UDP checksum 0: allowed on IPv4)."""
    (src_mac, src_ip), (dst_mac, dst_ip) = src, dst
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return eth + b"\x08\x00" + hdr + udp


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that entered the network namespace ``netns`` (sockets made
    there stay in it)."""
    out: list[Any] = []

    def body() -> None:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWNET, netns)
            out.append(fn())
        except BaseException as exc:
            out.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=body, daemon=True)  # the thread dies with its namespace
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]  # type: ignore[no-any-return]


def send_raw(netns: str, ifname: str, frame: bytes) -> None:
    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((ifname, 0))
            for _ in range(3):
                s.send(frame)

    in_netns(netns, go)


def udp_socket(netns: str | None, ip: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        s.settimeout(1.5)
        return s

    return make() if netns is None else in_netns(netns, make)


def got(s: socket.socket) -> bytes | None:
    try:
        return s.recv(2048)
    except TimeoutError:
        return None


def mac_of(ifname: str, netns: str | None = None) -> str:
    if netns is None:
        return Path(f"/sys/class/net/{ifname}/address").read_text().strip()
    r = subprocess.run(["nsenter", f"--net={netns}", "cat", f"/sys/class/net/{ifname}/address"],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# --- kit ---------------------------------------------------------------------------------


class Kit:
    """Network services on the test's roots, stand-in containers, a LAN neighbour."""

    def __init__(self, root: Path, run: Path) -> None:
        self.root, self.run = root, run
        self.services: list[NetworkService] = []
        self.svc = self.service(root)
        self.ns: list[Netns] = []
        self.names: set[str] = set()
        self.owners: set[str] = set()
        self.lan: list[str] = []

    def service(self, root: Path) -> NetworkService:
        root.mkdir(parents=True, exist_ok=True)
        s = NetworkService(root / "state.db", self.run)
        self.services.append(s)
        return s

    def netns(self) -> Netns:
        n = Netns()
        self.ns.append(n)
        return n

    def create(self, name: str, svc: NetworkService | None = None, **kw: Any) -> dict[str, Any]:
        info = (svc or self.svc).create(name, **kw)
        self.names.add(info["bridge"])
        self.owners.add(f"net:{info['id']}")
        return dict(info)

    def up(self, network: str, *, ports: list[PortMap] | None = None,
           svc: NetworkService | None = None) -> tuple[Netns, dict[str, Any]]:
        s = svc or self.svc
        cid = secrets.token_hex(32)
        self.owners.add(f"ep:{cid}")
        ep = s.reserve(cid, f"c{cid[:6]}", network)
        n = self.netns()
        try:
            ep = s.attach(ep, n.path, ports=ports or [])
        finally:
            from isobox.network.ipam import veth_name

            self.names.add(veth_name(cid, ep["networkId"]))
        return n, dict(ep)

    def neighbour(self) -> tuple[Netns, str, str, str]:
        """A LAN neighbour: (its namespace, its address, the host's address on the link,
        the host side's link name). The neighbour's interface is ``eth0``."""
        n = self.netns()
        tag = secrets.token_hex(3)
        host_if = f"rvh{tag}"
        base = ipaddress.ip_network("198.18.0.0/15")
        sub = ipaddress.ip_network(
            f"{base.network_address + 4 * secrets.randbelow(2 ** 15)}/30")
        host_ip, peer_ip = (str(a) for a in list(sub.hosts())[:2])
        subprocess.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                        "netns", n.path], check=True)
        self.lan.append(host_if)
        subprocess.run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        n.run("ip", "addr", "add", f"{peer_ip}/30", "dev", "eth0")
        n.run("ip", "link", "set", "eth0", "up")
        n.run("ip", "link", "set", "lo", "up")
        return n, peer_ip, host_ip, host_if

    def close(self) -> None:
        for n in self.ns:
            n.close()
        for name in self.lan:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        for s in self.services:
            for info in s.list():
                for cid in info["endpoints"]:
                    s.release(cid)
                s.remove(info["id"])
            s.close()


@pytest.fixture
def kit(isobox_env: Path, tmp_path: Path) -> Iterator[Kit]:
    k = Kit(isobox_env, tmp_path / "isobox-run")
    try:
        yield k
    finally:
        k.close()
    left = host_state(k.owners, k.names)
    assert left == {"links": [], "addresses": [], "rules": []}, left


# --- defects ---------------------------------------------------------------------------------


def test_port_published_on_127_0_0_1_is_not_reachable_from_the_lan(kit: Kit) -> None:
    """``-p 127.0.0.1:P:P`` means "this host only" (docker's meaning, and the point of
    giving an address). The DNAT rule matches ``ip daddr 127.0.0.1`` in *prerouting*, which
    runs before the routing decision that would drop a martian 127.0.0.1 arriving from a
    wire: a neighbour on the LAN that sends a frame to the host's MAC with destination
    127.0.0.1 gets DNATed into the container (docker's GHSA-x84c-p2g9-rqv9, fixed there
    with a raw-prerouting drop of 127.0.0.0/8 not from lo)."""
    kit.create("rvlo")
    loop_port, open_port = free_udp_port(), free_udp_port()
    ctr, ep = kit.up("rvlo", ports=[
        PortMap(hostIp="127.0.0.1", hostPort=loop_port, containerPort=loop_port,
                protocol="udp"),
        PortMap(hostIp="", hostPort=open_port, containerPort=open_port, protocol="udp"),
    ])
    inside_loop = udp_socket(ctr.path, "", loop_port)
    inside_open = udp_socket(ctr.path, "", open_port)
    try:
        lan, lan_ip, host_ip, host_if = kit.neighbour()
        lan_mac, host_mac = mac_of("eth0", lan.path), mac_of(host_if)
        # Control: the neighbour reaches a port published on every address (the harness
        # works, and the LAN is meant to reach that one).
        send_raw(lan.path, "eth0", udp_frame((lan_mac, lan_ip), (host_mac, host_ip), 40000,
                                             open_port, b"open"))
        assert got(inside_open) == b"open", "harness: the LAN does not reach a published port"
        # The defect: the loopback-only port is reached from the LAN.
        send_raw(lan.path, "eth0", udp_frame((lan_mac, lan_ip), (host_mac, "127.0.0.1"), 40001,
                                             loop_port, b"loopback-only"))
        leaked = got(inside_loop)
        assert leaked is None, (
            f"a LAN neighbour reached {ep['ip']}:{loop_port}, published on 127.0.0.1 only")
    finally:
        inside_loop.close()
        inside_open.close()


def test_a_container_cannot_reach_a_service_bound_to_the_hosts_loopback(kit: Kit) -> None:
    """``route_localnet=1`` on the bridge (set so the host's own 127.0.0.1 traffic can be
    DNATed to a container) also lets *containers* send to 127.0.0.1 of the host: a
    container with CAP_NET_RAW (in isobox's default set, as in docker's) addresses a frame
    to the gateway's MAC with destination 127.0.0.1 and reaches every host service bound to
    loopback only (CVE-2020-8558 of kube-proxy). Loopback-only services are exactly those a
    container must not reach; the gateway's address stays reachable."""
    kit.create("rvrl")
    ctr, ep = kit.up("rvrl")
    br = kit.svc.get("rvrl")["bridge"]
    port = free_udp_port()
    on_loopback = udp_socket(None, "127.0.0.1", port)
    on_gateway = udp_socket(None, ep["gateway"], port)
    try:
        ctr_mac, gw_mac = mac_of("eth0", ctr.path), mac_of(br)
        # Control: the gateway's address answers (allowed, and proves the frames go out).
        send_raw(ctr.path, "eth0", udp_frame((ctr_mac, ep["ip"]), (gw_mac, ep["gateway"]),
                                             40000, port, b"gateway"))
        assert got(on_gateway) == b"gateway", "harness: frames from the container get nowhere"
        send_raw(ctr.path, "eth0", udp_frame((ctr_mac, ep["ip"]), (gw_mac, "127.0.0.1"), 40001,
                                             port, b"loopback"))
        leaked = got(on_loopback)
        assert leaked is None, f"container {ep['ip']} reached 127.0.0.1:{port} of the host"
    finally:
        on_loopback.close()
        on_gateway.close()


def test_an_unpublished_container_port_is_not_reachable_from_the_lan(kit: Kit) -> None:
    """Only published ports are meant to be open to other machines (docs/network.md:
    "NAT out", "published ports"). The forward chain accepts everything that is not
    between two isobox bridges, so a LAN neighbour that routes the network's subnet via
    this host connects straight to any port of any container (docker closed this in 28.0:
    direct routing to unpublished ports is dropped). Internal networks are shut; NAT ones
    are not."""
    info = kit.create("rvdr")
    hp = free_tcp_port()
    ctr, ep = kit.up("rvdr", ports=[PortMap(hostIp="", hostPort=hp, containerPort=7778,
                                            protocol="tcp")])
    ctr.serve(SERVER, "7777")
    ctr.serve(SERVER, "7778")
    lan, _lan_ip, host_ip, _ = kit.neighbour()
    lan.run("ip", "route", "add", info["subnet"], "via", host_ip)
    # Control: the published port answers the LAN (the harness routes both ways).
    assert lan.connect(host_ip, hp).endswith("ping"), "harness: the LAN reaches nothing"
    out = lan.connect(ep["ip"], 7777, timeout=2)
    assert out.startswith("ERR"), f"the LAN reached unpublished {ep['ip']}:7777: {out!r}"


def test_the_same_host_port_twice_in_one_attach_is_refused(kit: Kit) -> None:
    """``-p P:80 -p P:81``: claim_ports compares the new ports with the *other* endpoints
    only, so one container publishing one host port twice is accepted; two DNAT rules then
    race and the second mapping silently never answers. Docker refuses it."""
    kit.create("rvdup")
    p = free_tcp_port()
    cid = secrets.token_hex(32)
    kit.owners.add(f"ep:{cid}")
    ep = kit.svc.reserve(cid, "dup", "rvdup")
    n = kit.netns()
    from isobox.network.ipam import veth_name

    kit.names.add(veth_name(cid, ep["networkId"]))
    ports = [PortMap(hostIp="", hostPort=p, containerPort=80, protocol="tcp"),
             PortMap(hostIp="", hostPort=p, containerPort=81, protocol="tcp")]
    with pytest.raises((Conflict, InvalidArgument)):
        kit.svc.attach(ep, n.path, ports=ports)


def test_two_roots_cannot_publish_the_same_host_port(kit: Kit, tmp_path: Path) -> None:
    """The nft tables are host-wide and shared by every isobox root on the host (the
    contract says so, and takes a host-wide lock for them), but the port clash check reads
    only this root's IPAM rows: a second daemon publishes a host port the first one already
    publishes, both DNAT rules sit in ``isobox_nat``, and the second container's port
    silently leads to the first container."""
    other = kit.service(tmp_path / "other-root")
    kit.create("rvra")
    kit.create("rvrb", svc=other)
    p = free_tcp_port()
    a, _ = kit.up("rvra", ports=[PortMap(hostIp="", hostPort=p, containerPort=7000,
                                         protocol="tcp")])
    a.serve(SERVER, "7000")
    with pytest.raises(Conflict):
        kit.up("rvrb", svc=other, ports=[PortMap(hostIp="", hostPort=p, containerPort=7000,
                                                 protocol="tcp")])


@pytest.mark.parametrize("subnet", ["224.1.0.0/24", "240.0.0.0/24", "0.0.0.0/8",
                                    "255.255.255.0/24"])
def test_a_subnet_no_host_can_use_is_refused_and_nothing_is_made(kit: Kit,
                                                                 subnet: str) -> None:
    """``parse_subnet`` checks only "IPv4, /29 or larger, no host bits": a multicast,
    reserved (240/4), "this network" (0/8) or limited-broadcast subnet is accepted, a
    bridge is made with e.g. 224.1.0.1 as its gateway, and every container on it is
    unreachable. Such input should be a 400 (InvalidArgument) that makes nothing."""
    bridges = set(links.link_names("ibx-"))
    try:
        with pytest.raises(InvalidArgument):
            kit.create("rvbad", subnet=subnet)
    finally:
        kit.names |= set(links.link_names("ibx-")) - bridges
    assert kit.svc.list() == []
    assert set(links.link_names("ibx-")) - bridges == set()
