#!/usr/bin/env bash
# The main job: what isobox can do today, end to end, on real files.
#
# Today that is the image store (the default image built from Debian's busybox-static with
# no network, saved as an OCI archive and as a docker-save archive, read back, listed,
# inspected, garbage-collected) and jobs (limits, accounting and notifications on real
# cgroups). Each later capability (process / vm / host isolation, networks) extends this
# script so that it runs the same image under every isolation and shows the difference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ISOBOX=${ISOBOX:-.venv/bin/isobox}
RUNTIME=${RUNTIME:-$PWD/.venv/bin/isobox-runtime}
export ISOBOX_ROOT=${ISOBOX_ROOT:-/var/lib/isobox}
work=$(mktemp -d /tmp/isobox-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "isobox $($ISOBOX --version | awk '{print $NF}'), state in $ISOBOX_ROOT"
show "$ISOBOX" image bootstrap busybox

step "the image, as the store keeps it"
show "$ISOBOX" images
"$ISOBOX" image inspect busybox | python3 -c '
import json, sys
img = json.load(sys.stdin)[0]
print("manifest", img["digest"])
print("config  ", img["id"])
for layer, path in zip(img["layers"], img["layer_dirs"]):
    print("layer   ", layer["digest"], layer["media_type"].rsplit(".", 1)[-1], layer["size"], "bytes")
    print("  unpacked once, read-only lower layer:", path)
print("cmd     ", img["config"]["config"]["Cmd"])'

step "save it in both formats other tools read"
show "$ISOBOX" save busybox -o "$work/busybox-oci.tar" --format oci
show "$ISOBOX" save busybox -o "$work/busybox-docker.tar" --format docker
ls -l "$work"

step "read them back under other names: same content, layers shared, not unpacked again"
show "$ISOBOX" import "$work/busybox-oci.tar" demo/busybox:oci
show "$ISOBOX" import "$work/busybox-docker.tar" demo/busybox:docker
show "$ISOBOX" images
echo "unpacked layers on disk: $(ls "$ISOBOX_ROOT/layers" | wc -l) (the docker archive's uncompressed layer has the same diff ID)"
if command -v skopeo >/dev/null; then
    step "skopeo reads isobox's archive"
    show skopeo inspect --format '{{.Digest}} {{len .Layers}} layer(s)' "oci-archive:$work/busybox-oci.tar:latest"
fi

step "a hostile tar is refused and changes nothing"
python3 - "$work/evil.tar" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w") as t:
    i = tarfile.TarInfo("../../etc/isobox-demo-pwned"); data = b"pwned\n"; i.size = len(data)
    t.addfile(i, io.BytesIO(data))
PY
show "$ISOBOX" import "$work/evil.tar" demo/evil || echo "(refused, exit $?)"
test ! -e /etc/isobox-demo-pwned && echo "nothing written outside the store"

step "jobs: the seeds' JobExample — a hard CPU cap, a memory limit, a process limit"
echo "A CPU hog for 3 s under --cpu-rate 1000 (10% of the machine):"
show "$ISOBOX" job run --cpu-rate 1000 -- timeout 3 sh -c 'while :; do :; done' || true
echo
echo "A memory hog under --memory 20m: OOM-killed, and the job says which pid:"
show "$ISOBOX" job run --cpu-rate 150 --memory 20m -- python3 -S -c 'b = bytearray(100 << 20)' || echo "(exit $?)"
echo
echo "A fork bomb under --pids 30: stopped at the limit, the host stays responsive:"
show "$ISOBOX" job run --pids 30 -- timeout -s KILL 3 sh -c 'exec 2>/dev/null; f() { f | f & }; f; sleep 5' || echo "(exit $?)"

step "process isolation: the same busybox image in a silo (isobox-runtime, runc's CLI)"
bundle="$work/bundle"; mkdir -p "$bundle"
layer=$("$ISOBOX" image inspect busybox | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["layer_dirs"][0])')
cp -a "$layer" "$bundle/rootfs"
(cd "$bundle" && "$RUNTIME" spec)
.venv/bin/python - "$bundle/config.json" <<'PY'
import json, sys
from isobox._sys.seccomp import default_profile
cfg = json.load(open(sys.argv[1]))
cfg["process"]["terminal"] = False
cfg["linux"]["seccomp"] = default_profile(cfg["process"]["capabilities"]["bounding"])
cfg["hostname"] = "silo"
cfg["process"]["args"] = ["sh", "-c", "echo \"hostname: $(hostname)   kernel: $(uname -r)   uid: $(id -u)\"; "
    "echo \"processes it can see: $(ls /proc | grep -c '^[0-9]')\"; "
    "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr '\\n' ' '; echo; "
    "mount -t tmpfs x /tmp 2>&1 | sed 's/^/refused: /'"]
json.dump(cfg, open(sys.argv[1], "w"))
PY
echo "On the host:"
echo "hostname: $(hostname)   kernel: $(uname -r)   uid: $(id -u)"
echo "processes it can see: $(ls /proc | grep -c '^[0-9]')"
echo "In the silo (same image; own namespaces; Docker's 14 capabilities, no_new_privs, seccomp):"
(cd "$bundle" && "$RUNTIME" --root "$work/runtime" run demo) || true
echo "(a VM-isolated run of the same image — own kernel — arrives with the utility-VM issue)"

step "clean up: untag the demo names, collect garbage"
show "$ISOBOX" rmi demo/busybox:oci demo/busybox:docker
show "$ISOBOX" image prune
show "$ISOBOX" images
