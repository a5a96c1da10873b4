"""isobox.network on real kernel objects: bridges, veths in real network namespaces,
nftables, traffic between them (docs/network.md is the contract under test).

Each "container" is a process alone in its own network namespace (``unshare --net``);
traffic is real (busybox ping, python TCP servers and clients run with ``nsenter``).
Nothing is left behind: every test's networks are removed and checked gone, and an
unrelated nft table made before the tests must be byte-identical after them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isobox.errors import Conflict, InvalidArgument, NotFound
from isobox.network import links, nft
from isobox.network.ipam import pick_subnet, veth_name
from isobox.network.service import NetworkService
from isobox.spec.wire import PortMap
from netkit import (
    SERVER,
    SINK,
    SOURCE,
    Netns,
    connect,
    host_state,
    nft_json,
    sh,
    write_hosts,
)

pytestmark = [pytest.mark.root, pytest.mark.net]

UNRELATED = "ibx_unrelated_test"


@pytest.fixture(scope="module", autouse=True)
def unrelated_table() -> Iterator[None]:
    """A table isobox does not own, with a chain on the same hooks and rules: it must come
    out of the tests byte for byte as it went in."""
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=f"""
        table inet {UNRELATED} {{
            chain unrelated_forward {{
                type filter hook forward priority 10; policy accept;
                ip saddr 203.0.113.0/24 accept comment "net:not-isobox"
            }}
            chain unrelated_nat {{
                type nat hook postrouting priority 100; policy accept;
                oifname "ibx-*" ip saddr 203.0.113.0/24 masquerade comment "ep:not-isobox"
            }}
        }}
        """)
    before = nft_json("inet", UNRELATED)
    try:
        yield
        assert nft_json("inet", UNRELATED) == before
    finally:
        subprocess.run(["nft", "delete", "table", "inet", UNRELATED], check=False)


class Kit:
    """A NetworkService on the test's root, and everything the test makes, for cleanup."""

    def __init__(self, root: Path, run: Path) -> None:
        self.root = root
        self.svc = NetworkService(root / "state.db", run)
        self.ns: list[Netns] = []
        self.bridges: set[str] = set()
        self.veths: set[str] = set()
        self.owners: set[str] = set()

    def netns(self) -> Netns:
        n = Netns()
        self.ns.append(n)
        return n

    def create(self, name: str, **kw: object) -> dict[str, object]:
        info = self.svc.create(name, **kw)  # type: ignore[arg-type]
        self.bridges.add(info["bridge"])
        self.owners.add(f"net:{info['id']}")
        return dict(info)

    def up(self, network: str, *, name: str | None = None, ports: list[PortMap] | None = None,
           rate: int | None = None, aliases: list[str] | None = None) -> tuple[Netns, dict]:
        """A container on ``network``: reserve, make its netns, attach."""
        cid = secrets.token_hex(32)
        self.owners.add(f"ep:{cid}")
        ep = self.svc.reserve(cid, name or f"c{cid[:6]}", network, aliases=aliases or [])
        n = self.netns()
        ep = self.svc.attach(ep, n.path, ports=ports or [], rate=rate)
        self.veths.add(ep["hostVeth"])
        return n, dict(ep)

    def state(self) -> dict[str, object]:
        return host_state(self.owners, self.bridges | self.veths)

    def close(self) -> None:
        for n in self.ns:
            n.close()
        for info in self.svc.list():
            for cid in info["endpoints"]:
                self.svc.release(cid)
            self.svc.remove(info["id"])
        self.svc.close()


@pytest.fixture
def kit(isobox_env: Path, tmp_path: Path) -> Iterator[Kit]:
    k = Kit(isobox_env, tmp_path / "isobox-run")
    try:
        yield k
    finally:
        k.close()
    left = k.state()
    assert left == {"links": [], "addresses": [], "rules": []}, left


def free_subnet() -> str:
    taken = [ipaddress.ip_network(f"{a}/{p}", strict=False) for a, p in links.host_networks()]
    return str(pick_subnet([t for t in taken if isinstance(t, ipaddress.IPv4Network)]))


def host_address() -> str:
    """An address of the host outside every isobox network (its main interface's)."""
    for name, ip, _ in links.addresses():
        if name != "lo" and not name.startswith(("ibx-", "ibv", "ibt")):
            return ip
    pytest.skip("the host has no non-loopback IPv4 address")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- networks --------------------------------------------------------------------------

def test_create_list_get_remove(kit: Kit) -> None:
    host = [ipaddress.ip_network(f"{x}/{p}", strict=False) for x, p in links.host_networks()]
    a = kit.create("alpha", labels={"k": "v"})
    net = ipaddress.ip_network(a["subnet"])
    assert not any(net.overlaps(h) for h in host), (net, host)
    assert a["gateway"] == str(next(net.hosts()))
    assert (a["bridge"], a["gateway"], net.prefixlen) in links.addresses()
    sysctl = Path("/proc/sys/net/ipv4")
    assert (sysctl / f"conf/{a['bridge']}/route_localnet").read_text().strip() == "1"
    assert (sysctl / "ip_forward").read_text().strip() == "1"
    assert any(r.comment == f"net:{a['id']}" for r in nft.rules())

    b = kit.create("beta", subnet=free_subnet(), internal=True)
    assert b["internal"] and b["subnet"] != a["subnet"]
    assert [n["name"] for n in kit.svc.list()] == ["alpha", "beta"]
    assert kit.svc.get("alpha")["id"] == a["id"]
    assert kit.svc.get(str(a["id"])[:10])["name"] == "alpha"
    assert kit.svc.get("alpha")["labels"] == {"k": "v"}

    with pytest.raises(Conflict):
        kit.svc.create("alpha")
    with pytest.raises(Conflict):
        kit.svc.create("gamma", subnet=str(a["subnet"]))
    wider = str(ipaddress.ip_network(a["subnet"]).supernet(new_prefix=20))
    with pytest.raises(Conflict):
        kit.svc.create("gamma", subnet=wider)
    # a subnet the host routes already
    hx, hp = next((x, p) for x, p in links.host_networks() if not x.startswith("127."))
    with pytest.raises(Conflict):
        kit.svc.create("gamma", subnet=str(ipaddress.ip_network(f"{hx}/{hp}", strict=False)))
    with pytest.raises(InvalidArgument):
        kit.svc.create("bad name")
    with pytest.raises(InvalidArgument):
        kit.svc.create("none")
    with pytest.raises(InvalidArgument):
        kit.svc.create("gamma", subnet="10.0.0.1/24")
    assert [n["name"] for n in kit.svc.list()] == ["alpha", "beta"]  # no half-made network

    kit.svc.remove("alpha")
    kit.svc.remove(str(b["id"]))
    assert kit.svc.list() == []
    with pytest.raises(NotFound):
        kit.svc.get("alpha")
    assert kit.state() == {"links": [], "addresses": [], "rules": []}


def test_default_network_made_once(kit: Kit) -> None:
    d = kit.svc.default()
    kit.bridges.add(d["bridge"])
    kit.owners.add(f"net:{d['id']}")
    assert d["name"] == "isobox"
    assert kit.svc.default()["id"] == d["id"]
    with pytest.raises(InvalidArgument):  # the default's name is the engine's own
        kit.svc.create("isobox")
    ep = kit.svc.reserve(secrets.token_hex(32), "x", "default")
    assert ep["networkId"] == d["id"]
    kit.svc.release(ep["containerId"])


def test_remove_with_endpoints_conflicts(kit: Kit) -> None:
    kit.create("busy")
    cid = secrets.token_hex(32)
    kit.svc.reserve(cid, "c", "busy")
    with pytest.raises(Conflict):
        kit.svc.remove("busy")
    kit.svc.release(cid)
    kit.svc.release(cid)  # idempotent
    kit.svc.remove("busy")


# --- endpoints and traffic ---------------------------------------------------------------

def test_two_endpoints_reach_each_other_and_attach_latency(kit: Kit) -> None:
    kit.create("n1")
    cid = secrets.token_hex(32)
    ep = kit.svc.reserve(cid, "a", "n1")
    assert ep["hostVeth"] == ""
    ip = ipaddress.ip_address(ep["ip"])
    assert ep["mac"] == "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)
    a = kit.netns()
    t = time.monotonic()
    ep = kit.svc.attach(ep, a.path)
    attach_ms = (time.monotonic() - t) * 1000
    kit.veths.add(ep["hostVeth"])
    kit.owners.add(f"ep:{cid}")
    b, epb = kit.up("n1", name="b")
    assert ("eth0", ep["ip"], ep["prefixLen"]) in links.addresses(a.path)
    assert a.ping(epb["ip"]) and b.ping(ep["ip"]) and a.ping(ep["gateway"])
    assert f"link/ether {ep['mac']} " in a.run("ip", "link", "show", "eth0").stdout
    assert "default via " + ep["gateway"] in a.run("ip", "route").stdout
    print(f"attach latency: {attach_ms:.1f} ms")
    assert attach_ms < 1000


def test_networks_are_isolated_and_internal_has_no_way_out(kit: Kit) -> None:
    kit.create("n1")
    kit.create("n2")
    kit.create("inner", internal=True)
    a, _ = kit.up("n1")
    b, epb = kit.up("n2")
    c, epc = kit.up("inner")
    c2, _epc2 = kit.up("inner")
    assert b.ping(epb["gateway"])
    assert not a.ping(epb["ip"])
    assert not b.ping(epc["ip"])
    assert c2.ping(epc["ip"])  # members of an internal network still talk
    outside_ip = _outside(kit)  # the world beyond the host
    assert a.connect(outside_ip, 7000).split()[0] == "198.51.100.1"
    assert c.connect(outside_ip, 7000, timeout=2).startswith("ERR")


def _outside(kit: Kit) -> str:
    """A namespace that stands for the world beyond the host: reachable through a veth
    from the host, with no route back to any isobox subnet (only NAT lets it answer)."""
    o = kit.netns()
    host_end = f"ibt{secrets.token_hex(3)}"
    kit.bridges.add(host_end)
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns",
       str(o.proc.pid))
    sh("ip", "addr", "add", "198.51.100.1/30", "dev", host_end)
    sh("ip", "link", "set", host_end, "up")
    o.run("ip", "addr", "add", "198.51.100.2/30", "dev", "eth0")
    o.run("ip", "link", "set", "eth0", "up")
    o.run("ip", "link", "set", "lo", "up")
    o.serve(SERVER, "7000")
    return "198.51.100.2"


def test_nat_out_is_masqueraded(kit: Kit) -> None:
    kit.create("n1")
    a, _epa = kit.up("n1")
    outside = _outside(kit)
    peer, echo = a.connect(outside, 7000).split()
    assert (peer, echo) == ("198.51.100.1", "ping")  # the host's address, not epa["ip"]


def test_published_port(kit: Kit) -> None:
    kit.create("n1")
    hp, hp_udp = free_port(), free_port()
    ports: list[PortMap] = [
        PortMap(hostIp="", hostPort=hp, containerPort=8080, protocol="tcp"),
        PortMap(hostIp="", hostPort=hp_udp, containerPort=8081, protocol="udp"),
    ]
    a, epa = kit.up("n1", ports=ports)
    a.serve(SERVER, "8080")
    b, _epb = kit.up("n1")
    addr = host_address()
    # the host itself, through loopback and through one of its addresses
    assert connect("127.0.0.1", hp).split()[1] == "ping"
    assert connect(addr, hp).split()[1] == "ping"
    # another container on the same network, through a host address
    assert b.connect(addr, hp).split()[1] == "ping"
    assert b.connect(epa["gateway"], hp).split()[1] == "ping"
    # another network cannot reach it through the host either
    kit.create("n2")
    c, _ = kit.up("n2")
    assert c.connect(addr, hp, timeout=2).startswith("ERR")
    # a second claim of the same host port is refused, and leaves nothing
    cid = secrets.token_hex(32)
    ep = kit.svc.reserve(cid, "dup", "n1")
    d = kit.netns()
    with pytest.raises(Conflict):
        kit.svc.attach(ep, d.path, ports=[PortMap(hostIp="127.0.0.1", hostPort=hp,
                                                  containerPort=1, protocol="tcp")])
    assert ep["ip"] in kit.svc.get("n1")["endpoints"].values()
    kit.svc.release(cid)
    assert d.run("ip", "link", "show", "eth0").returncode != 0


def test_names_in_hosts_files_rewritten_in_place(kit: Kit) -> None:
    kit.create("n1")
    a, epa = kit.up("n1", name="web", aliases=["www"])
    ha = write_hosts(kit.root, epa["containerId"], kit.svc.hosts_file(epa["containerId"]))
    inode = os.stat(ha).st_ino
    _b, epb = kit.up("n1", name="db")
    text = ha.read_text()
    assert os.stat(ha).st_ino == inode
    assert f"{epb['ip']}\tdb {epb['containerId'][:12]}" in text
    assert text.splitlines()[6].startswith(f"{epa['ip']}\tweb {epa['containerId'][:12]} www")
    # name resolution through the file, from inside a's network namespace
    ping = a.run("unshare", "-m", "sh", "-c",
                 f"mount --bind {ha} /etc/hosts && busybox ping -c 1 -W 1 db")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    kit.svc.release(epb["containerId"])
    assert "\tdb " not in ha.read_text() and os.stat(ha).st_ino == inode
    assert kit.svc.hosts_file("nobody").startswith("127.0.0.1\tlocalhost\n")


def test_rate_limit(kit: Kit) -> None:
    kit.create("n1")
    rate = 1 << 20
    a, _epa = kit.up("n1", rate=rate)
    b, epb = kit.up("n1")
    assert links.qdisc_kinds(a.path) == ["tbf"]
    sink = b.serve(SINK, "9000")
    a.python(SOURCE, epb["ip"], "9000", "5", timeout=60)
    out, _ = sink.communicate(timeout=60)
    n, secs = out.split()
    got = int(n) / float(secs)
    print(f"rate: {got / rate:.3f} of {rate} B/s over {float(secs):.2f} s ({n} bytes)")
    assert float(secs) > 4
    assert 0.8 * rate <= got <= 1.2 * rate


def test_release_leaves_nothing(kit: Kit) -> None:
    kit.create("n1")
    before = kit.state()
    rows = kit.svc.ipam.db.query("SELECT COUNT(*) FROM endpoints")[0][0]
    tables = (nft_json("inet", "isobox"), nft_json("ip", "isobox_nat"))
    a, ep = kit.up("n1", ports=[PortMap(hostIp="", hostPort=free_port(), containerPort=80,
                                        protocol="tcp")], rate=100000)
    assert kit.state() != before
    kit.svc.release(ep["containerId"])
    assert kit.state() == before
    assert kit.svc.ipam.db.query("SELECT COUNT(*) FROM endpoints")[0][0] == rows
    assert a.run("ip", "link", "show", "eth0").returncode != 0
    if not _foreign_rules(kit):
        assert (nft_json("inet", "isobox"), nft_json("ip", "isobox_nat")) == tables


def _foreign_rules(kit: Kit) -> bool:
    """Whether another isobox root on this host has rules in the shared tables now."""
    return any(r.comment not in kit.owners for r in nft.rules())


@pytest.mark.slow
def test_100_cycles_leave_nothing(kit: Kit) -> None:
    kit.create("n1")
    before = kit.state()
    n = kit.netns()
    times = []
    for i in range(100):
        cid = f"{i:04d}" + secrets.token_hex(30)
        kit.owners.add(f"ep:{cid}")
        ep = kit.svc.reserve(cid, f"c{i}", "n1")
        t = time.monotonic()
        ep = kit.svc.attach(ep, n.path, ports=[PortMap(hostIp="", hostPort=40000 + i,
                                                       containerPort=80, protocol="tcp")],
                            rate=1 << 20 if i % 2 else None)
        times.append(time.monotonic() - t)
        kit.veths.add(ep["hostVeth"])
        kit.svc.release(cid)
    assert kit.state() == before
    assert kit.svc.get("n1")["endpoints"] == {}
    assert n.run("ip", "-o", "link").stdout.count("\n") == 1  # only lo
    times.sort()
    print(f"attach with a port: median {times[50] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")


def test_recover_releases_dead_containers(kit: Kit) -> None:
    kit.create("n1")
    a, epa = kit.up("n1", ports=[PortMap(hostIp="", hostPort=free_port(), containerPort=80,
                                         protocol="tcp")])
    _b, epb = kit.up("n1")
    reserved = kit.svc.reserve(secrets.token_hex(32), "never-started", "n1")
    kit.owners.add(f"ep:{reserved['containerId']}")
    a.close()  # the container died with the daemon down
    # a new daemon on the same state
    svc2 = NetworkService(kit.root / "state.db", kit.root / "run2")
    try:
        svc2.recover({epb["containerId"]})
        assert svc2.get("n1")["endpoints"] == {epb["containerId"]: epb["ip"]}
        assert not any(r.comment == f"ep:{epa['containerId']}" for r in nft.rules())
        assert epa["hostVeth"] not in links.link_names("ibv")
        assert epb["hostVeth"] in links.link_names("ibv")
        # a new allocation never reuses a live address
        ep = svc2.reserve(secrets.token_hex(32), "new", "n1")
        assert ep["ip"] != epb["ip"]
        svc2.release(ep["containerId"])
    finally:
        svc2.close()


def test_concurrent_reservations_never_share_an_address(kit: Kit) -> None:
    kit.create("n1", subnet=str(next(ipaddress.ip_network(free_subnet()).subnets(
        new_prefix=26))))
    services = [kit.svc, NetworkService(kit.root / "state.db", kit.root / "run2")]
    got: list[str] = []
    errors: list[BaseException] = []

    def worker(svc: NetworkService) -> None:
        for _ in range(40):
            try:
                got.append(svc.reserve(secrets.token_hex(32), "x", "n1")["ip"])
            except Conflict as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in services for _ in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    services[1].close()
    assert len(got) == len(set(got)) == 61  # a /26 holds 62 hosts, one is the gateway
    assert len(errors) == 160 - 61


def test_failed_attach_undoes_what_it_made(kit: Kit) -> None:
    kit.create("n1")
    before = kit.state()
    cid = secrets.token_hex(32)
    kit.owners.add(f"ep:{cid}")
    ep = kit.svc.reserve(cid, "c", "n1")
    kit.veths.add(veth_name(cid, ep["networkId"]))
    dead = kit.netns()
    path = dead.path
    dead.close()
    from isobox.errors import IsoboxError

    with pytest.raises(IsoboxError):
        kit.svc.attach(ep, path, ports=[PortMap(hostIp="", hostPort=free_port(),
                                                containerPort=80, protocol="tcp")])
    assert kit.state() == before
    # the reservation stays until the caller releases it; a retry may attach
    assert kit.svc.get("n1")["endpoints"] == {cid: ep["ip"]}
    live = kit.netns()
    got = kit.svc.attach(ep, live.path)
    assert got["hostVeth"] and live.ping(got["gateway"])
    kit.svc.release(cid)
    assert kit.state() == before
