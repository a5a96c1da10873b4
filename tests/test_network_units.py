"""isobox.network's pure parts: subnet pool, addresses, MACs, names files, rule building.
(Their integration twins, on real kernel objects, are in test_network.py.)"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from isobox.errors import Conflict, InvalidArgument
from isobox.network import hosts, nft
from isobox.network.ipam import (
    NETWORK_SCHEMA,
    Ipam,
    NetRow,
    mac_of,
    parse_subnet,
    pick_subnet,
    veth_name,
)
from isobox.spec.wire import PortMap
from isobox.statedb import StateDB


def net(s: str) -> ipaddress.IPv4Network:
    n = ipaddress.ip_network(s)
    assert isinstance(n, ipaddress.IPv4Network)
    return n


def test_pick_subnet_skips_what_is_taken() -> None:
    assert str(pick_subnet([])) == "172.18.0.0/24"
    assert str(pick_subnet([net("172.18.0.0/24"), net("172.18.1.0/25")])) == "172.18.2.0/24"
    with pytest.raises(Conflict):
        pick_subnet([net("172.16.0.0/12")])  # the whole pool is routed elsewhere


def test_pick_subnet_when_pool_is_taken_raises() -> None:
    with pytest.raises(Conflict):
        pick_subnet([net("172.0.0.0/8")])


def test_parse_subnet() -> None:
    assert str(parse_subnet("10.1.2.0/24")) == "10.1.2.0/24"
    for bad in ("10.1.2.3/24", "fd00::/64", "nonsense", "10.0.0.0/30", "224.1.0.0/24",
                "240.0.0.0/24", "0.0.0.0/8", "255.255.255.0/24", "127.1.0.0/24", "0.0.0.0/0"):
        with pytest.raises(InvalidArgument):
            parse_subnet(bad)


def test_mac_and_veth_names() -> None:
    assert mac_of("172.18.0.2") == "02:42:ac:12:00:02"
    v = veth_name("c" * 64, "n" * 64)
    assert v.startswith("ibv") and len(v) <= 15 and v == veth_name("c" * 64, "n" * 64)
    assert v != veth_name("d" * 64, "n" * 64)


def test_ipam_round_robin_and_full(tmp_path: Path) -> None:
    ipam = Ipam(StateDB(tmp_path / "state.db", [NETWORK_SCHEMA]))
    row = ipam.add_network(NetRow("a" * 64, "n", "10.9.0.0/29", "10.9.0.1", "ibx-aaaaaaaa",
                                  False, {}, "now"), host=[], auto=False)
    got = [ipam.reserve(row, f"c{i}", "x", []).ip for i in range(5)]
    assert got == [f"10.9.0.{i}" for i in range(2, 7)]  # .1 is the gateway, .7 broadcast
    with pytest.raises(Conflict):
        ipam.reserve(row, "c9", "x", [])
    with pytest.raises(Conflict):
        ipam.reserve(row, "c0", "x", [])  # already on it
    ipam.drop_endpoint(ipam.endpoints(container_id="c1")[0])
    assert ipam.reserve(row, "c10", "x", []).ip == "10.9.0.3"
    with pytest.raises(Conflict):
        ipam.add_network(NetRow("b" * 64, "m", "10.9.0.0/28", "10.9.0.1", "ibx-bbbbbbbb",
                                False, {}, "now"), host=[], auto=False)
    with pytest.raises(Conflict):
        ipam.delete_network(row.id)


def test_hosts_text_and_in_place_rewrite(tmp_path: Path) -> None:
    text = hosts.hosts_text([("10.0.0.2", ["web", "abc", "web"]), ("10.0.0.3", ["db", "web"])])
    assert "10.0.0.2\tweb abc\n" in text and "10.0.0.3\tdb\n" in text
    assert text.startswith("127.0.0.1\tlocalhost\n")
    p = tmp_path / "hosts"
    p.write_text("x" * 1000)
    ino = os.stat(p).st_ino
    assert hosts.rewrite_in_place(p, "short\n")
    assert p.read_text() == "short\n" and os.stat(p).st_ino == ino
    assert not hosts.rewrite_in_place(tmp_path / "missing", "x")


def test_resolv_conf_leaves_out_loopback(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("nameserver 127.0.0.53\nsearch example.org\noptions edns0\n")
    b = tmp_path / "b"
    b.write_text("nameserver 9.9.9.9\nnameserver ::1\nnameserver 2001:db8::1\n")
    out = hosts.resolv_text([str(a), str(b)])
    assert "nameserver 9.9.9.9\nnameserver 2001:db8::1\n" in out
    assert "127.0.0.53" not in out and "nameserver ::1\n" not in out
    assert "search example.org" in out and "options edns0" in out
    only_loopback = hosts.resolv_text([str(a)])
    assert "nameserver" not in only_loopback.replace("loopback", "")


def _batch(rules: list[nft.Rule]) -> str:
    cmds = nft._skeleton() + [
        {"add": {"rule": {"family": nft.CHAINS[r.chain][0], "table": nft.CHAINS[r.chain][1],
                          "chain": r.chain, "comment": "net:x", "expr": r.expr}}}
        for r in rules]
    return json.dumps({"nftables": cmds})


@pytest.mark.root
@pytest.mark.net
@pytest.mark.parametrize("internal", [False, True])
def test_rules_are_accepted_by_nft(internal: bool) -> None:
    """The JSON the module builds is what nft accepts (checked with ``nft -c``: nothing is
    applied)."""
    ports = [PortMap(hostIp="", hostPort=8080, containerPort=80, protocol="tcp"),
             PortMap(hostIp="127.0.0.1", hostPort=5353, containerPort=53, protocol="udp")]
    rules = nft.network_rules("ibx-12345678", "172.18.9.0/24", internal)
    rules += nft.port_rules("172.18.9.2", ports)
    assert len([r for r in rules if r.chain == "forward"]) == (4 if internal else 3)
    proc = subprocess.run(["nft", "-c", "-j", "-f", "-"], input=_batch(rules), text=True,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_create_refuses_the_reserved_names_before_making_anything(tmp_path: Path) -> None:
    """``isobox`` is the default network's name, made by the engine: a user network named so
    would be taken for the default. Refused like the network modes, with nothing made."""
    from isobox.network.service import NetworkService

    svc = NetworkService(tmp_path / "state.db", tmp_path / "run")
    try:
        for name in ("isobox", "default", "none", "host", "bridge"):
            with pytest.raises(InvalidArgument, match="invalid network name"):
                svc.create(name)
        assert svc.list() == []
    finally:
        svc.close()
