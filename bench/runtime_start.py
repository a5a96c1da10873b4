"""Start-to-exit of ``/bin/true`` in a container: isobox-runtime vs runc vs crun.

All three get the same bundle: a busybox root filesystem (isobox's bootstrapped image) and
the ``config.json`` that ``runc spec`` writes (pid, network, ipc, uts, mount namespaces;
runc's default mounts, capabilities, masked paths), with ``terminal`` off and the process
``/bin/true``. Each run is ``<runtime> --root <fresh dir> run <id>``: create, start, wait,
delete.

crun refuses this host's hybrid cgroup layout unless the (almost empty) cgroup2 mount at
/sys/fs/cgroup/unified is out of sight, so *every* runtime runs inside the same wrapper:
``unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified; exec RUNTIME …'``
— the same cost for all, and nothing changes on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.harness import REPO, Config, Report, Scenario, Step, log, measure

NAME = "runtime_start"
TITLE = "run /bin/true in a container (create + start + wait + delete), same bundle"
WRAP = "umount /sys/fs/cgroup/unified 2>/dev/null; exec \"$@\""


def isobox_runtime() -> Path:
    return Path(os.environ.get("ISOBOX_RUNTIME_BIN") or REPO / ".venv" / "bin" / "isobox-runtime")


def _bundle(base: Path) -> Path:
    """The shared bundle: busybox rootfs + runc's default config running /bin/true."""
    bundle = base / "bundle"
    if (bundle / "config.json").exists():
        return bundle
    bundle.mkdir(parents=True)
    # The store directly, not the CLI: the CLI talks to (and would start) an isoboxd.
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.store import ImageStore

    store = ImageStore(base / "store")
    try:
        img = bootstrap_busybox(store)
        shutil.copytree(store.layer_diff(img.layers[0].chain_id), bundle / "rootfs",
                        symlinks=True)
    finally:
        store.close()
    spec = "runc" if shutil.which("runc") else str(isobox_runtime())
    subprocess.run([spec, "spec"], cwd=bundle, check=True, capture_output=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/true"]
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


def scenarios(bundle: Path) -> list[Scenario]:
    def runner(binary: str | Path, label: str) -> Scenario:
        def steps(d: Path) -> list[Step]:
            return [Step(label, ["unshare", "-m", "--propagation", "private", "sh", "-c", WRAP,
                                 "wrap", binary, "--root", d / "state", "run", "--bundle",
                                 bundle, "bench"])]

        return Scenario(label, steps, requires=[binary], baseline=label == "isobox-runtime",
                        versions={label: [binary, "--version"]})

    return [runner(isobox_runtime(), "isobox-runtime"), runner("runc", "runc"),
            runner("crun", "crun")]


def run(config: Config) -> Report:
    base = (config.tmpdir or Path("/tmp")) / "isobox-bench-runtime"
    base.mkdir(parents=True, exist_ok=True)
    log(f"{NAME}: preparing the bundle in {base}")
    bundle = _bundle(base)
    return measure(
        NAME, TITLE, scenarios(bundle), config,
        params={"bundle": str(bundle), "process": "/bin/true",
                "config": "runc spec, terminal off"},
        notes=[
            "Wall time of the whole command, process start included (for isobox-runtime: "
            "the Python interpreter and its imports).",
            "Every runtime runs inside the same `unshare -m` wrapper that hides the cgroup2 "
            "mount crun refuses; its cost is in every number alike.",
            "ratio = a runtime's median / isobox-runtime's median; below 1 means faster "
            "than isobox-runtime.",
        ],
        extra_tools={"isobox commit": ["git", "-C", REPO, "describe", "--always", "--dirty"]},
    )
