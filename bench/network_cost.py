"""What a network costs a start: ``isobox run --rm busybox true`` on the default network vs
``--network none``, same warm isoboxd, same run (issue 6).

Both scenarios are the CLI command against one ``isoboxd`` started before the rounds, with
its root and run folders in the benchmark's folder and busybox bootstrapped there through
the CLI; the harness interleaves them round by round. The difference of the medians is the
network's cost: the address (IPAM row), the hosts/resolv.conf/hostname files, the veth
pair moved into the container's namespace with its address and route, the rules (none
here: no port published), and on removal the veth, the rules and the address freed. The
SDK's run is measured the same way (no interpreter start), so the difference is seen
without the CLI's noise. After the rounds the default network is removed and the daemon
stopped; a bridge, veth or nft rule left of the benchmark is reported.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.harness import REPO, Config, Report, Scenario, Step, fmt_s, log, measure
from bench.peers import IsoboxDaemon, PeerError, environ, mounts_under, venv_bin

NAME = "network_cost"
TITLE = "run --rm busybox true: default NAT network vs --network none (warm isoboxd)"
CLI_NONE = "CLI --network none"
CLI_NET = "CLI --network default"
SDK_NONE = "SDK network none"
SDK_NET = "SDK network default"






def scenarios(d: IsoboxDaemon) -> list[Scenario]:
    from isobox.client import Client

    clients: list[Client] = []

    def cli(mode: str) -> Scenario:
        def steps(_w: Path) -> list[Step]:
            return [Step("isobox run", [d.cli, "run", "--rm", "--network", mode, "busybox",
                                        "true"], env=d.env)]

        return Scenario(CLI_NONE if mode == "none" else CLI_NET, steps,
                        baseline=mode == "none")

    def sdk(mode: str) -> Scenario:
        def call() -> object:
            if not clients:
                clients.append(Client(d.sock))
            return clients[0].containers.run("busybox", ["true"], auto_remove=True,
                                             network=mode)

        return Scenario(SDK_NONE if mode == "none" else SDK_NET,
                        lambda _w: [Step("containers.run", call=call)])

    return [cli("none"), cli("default"), sdk("none"), sdk("default")]


def _host_links(prefix: str) -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix)}


def _cost(report: Report, net: str, none: str) -> str:
    by = {o.name: o for o in report.outcomes}
    a, b = by[net].stats, by[none].stats
    if a is None or b is None:
        return f"{net} - {none}: not computed ({by[net].status}, {by[none].status})"
    return (f"Network cost ({net} - {none}): median {fmt_s(a.median)} - {fmt_s(b.median)} = "
            f"{(a.median - b.median) * 1000:.1f} ms")


def run(config: Config) -> Report:
    parent = config.tmpdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    # Short: monitor sockets live under it and must fit in sun_path.
    folder = Path(tempfile.mkdtemp(prefix="ibnet-", dir="/tmp"))
    links_before = _host_links("ibx-") | _host_links("ibv")
    leftovers: list[str] = []
    d = IsoboxDaemon(folder, venv_bin("isoboxd"), venv_bin("isobox"))
    try:
        log(f"{NAME}: starting isoboxd in {folder}")
        d.start()
        d.isobox("image", "bootstrap", "busybox")
        with environ(d.env):
            report = measure(
                NAME, TITLE, scenarios(d), config,
                params={"image": "busybox (bootstrapped by isobox)", "process": "true",
                        "network": "the default NAT network (isobox), no port published, "
                                   "no rate"},
                notes=[
                    "CLI: the whole `isobox run --rm --network MODE busybox true` command "
                    "(interpreter start, imports, 4 round trips to the warm isoboxd).",
                    "SDK: `Client().containers.run('busybox', ['true'], auto_remove=True, "
                    "network=MODE)` in this warm process.",
                    "default: reserve an address, write hosts/resolv.conf/hostname, spawn the "
                    "monitor, veth into the container's namespace (address, route), start; "
                    "release of the veth, rules and address at the exit.",
                ],
                extra_tools={"isobox commit": ["git", "-C", REPO, "describe", "--always",
                                               "--dirty"]},
            )
        try:
            d.isobox("network", "rm", "isobox")
        except PeerError as exc:
            leftovers.append(f"network rm isobox: {exc}")
    finally:
        leftovers += d.stop()
        left_links = (_host_links("ibx-") | _host_links("ibv")) - links_before
        leftovers += [f"link left: {x}" for x in sorted(left_links)]
        nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                             check=False).stdout
        leftovers += [f"nft rule left: {line.strip()}" for line in nft.splitlines()
                      if "comment" in line and "ep:" in line]
        stuck = mounts_under(folder)
        if stuck:
            leftovers.append(f"mounts left under {folder}: {stuck[:5]}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report.baseline_label = CLI_NONE
    report.notes += [f"LEFTOVER: {x}" for x in leftovers] or [
        "After the rounds the default network was removed and isoboxd stopped: no bridge, "
        "veth, nft rule, mount or process of the benchmark was left."]
    report.notes.append(f"{_cost(report, SDK_NET, SDK_NONE)}; {_cost(report, CLI_NET, CLI_NONE)}")
    return report
