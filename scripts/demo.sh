#!/usr/bin/env bash
# The main job: one image, the isolation chosen at run time, and the difference shown.
#
# The CLI talks to isoboxd (started on first use when its socket is absent). The demo runs
# the same busybox image under --isolation=process (own namespaces + job, like runc),
# --isolation=host (host namespaces, job only, like a HostProcess container) and
# --isolation=vm (its own kernel in a utility VM cloned from a pre-booted template), then
# shows the container verbs, Job limits holding, the image store, and the runc-compatible
# runtime. It leaves nothing behind but the image store; a daemon it started is stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ISOBOX=${ISOBOX:-$PWD/.venv/bin/isobox}
RUNTIME=${RUNTIME:-$PWD/.venv/bin/isobox-runtime}
export ISOBOX_ROOT=${ISOBOX_ROOT:-/var/lib/isobox}
export ISOBOX_RUN=${ISOBOX_RUN:-/run/isobox}
work=$(mktemp -d /tmp/isobox-demo.XXXXXX)
daemon_was_up=0
[ -S "$ISOBOX_RUN/isoboxd.sock" ] && "$ISOBOX" info >/dev/null 2>&1 && daemon_was_up=1

cleanup() {
    "$ISOBOX" rm -f demo-web demo-again >/dev/null 2>&1 || true
    "$ISOBOX" rmi demo/busybox:oci demo/busybox:docker >/dev/null 2>&1 || true
    if [ "$daemon_was_up" = 0 ] && [ -f "$ISOBOX_RUN/isoboxd.lock" ]; then
        pid=$(cat "$ISOBOX_RUN/isoboxd.lock" 2>/dev/null || true)
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "isobox $($ISOBOX --version | awk '{print $NF}'), state in $ISOBOX_ROOT"
show "$ISOBOX" image bootstrap busybox
show "$ISOBOX" info

# What the container sees: who it is, which kernel, which processes, what it may do.
PROBE='echo "hostname: $(hostname)   kernel: $(uname -r)   uid: $(id -u)"
echo "processes it can see: $(ls /proc | grep -c "^[0-9]")   pid of this shell: $$"
grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status | tr "\n" " "; echo
echo "root filesystem: $(sed -n "s|^[^ ]* / \([^ ]*\) .*|\1|p" /proc/mounts | head -1)"
mount -t tmpfs x /mnt 2>&1 | sed "s/^/mount: /" || true'

step "on the host itself"
sh -c "$PROBE" 2>&1 | sed 's/^/  /'

for iso in process host vm; do
    step "the same busybox image, --isolation=$iso"
    if ! "$ISOBOX" run --rm --isolation "$iso" --network none --hostname "demo-$iso" busybox sh -c "$PROBE" \
            2>"$work/err" | sed 's/^/  /'; then
        echo "  (not run here: $(tail -1 "$work/err"))"
    fi
done
cat <<'EOF'
  process: own hostname and pid namespace (sees only itself), Docker's 14 capabilities,
           no_new_privs, seccomp, an overlay root — mount is refused.
  host:    the host's hostname, processes and capabilities; only the job limits it (the
           image's files are at $ISOBOX_SANDBOX_MOUNT_POINT, as for a HostProcess container).
  vm:      its own kernel (Debian's, in a utility VM under QEMU), started as a clone of
           a pre-booted template; inside it an ordinary silo again.
EOF

step "VM isolation at container speed: a clone of the template vs a cold boot"
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>&1 || echo "  ($* failed)"; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
if "$ISOBOX" run --rm --isolation vm --network none busybox true >/dev/null 2>&1; then
    for i in 1 2 3; do
        echo "  run --rm --isolation=vm busybox true (clone):        $(ms "$ISOBOX" run --rm --isolation vm --network none busybox true) ms"
    done
    echo "  run --rm --isolation=process busybox true:           $(ms "$ISOBOX" run --rm --isolation process --network none busybox true) ms"
    echo "  run --rm --isolation=vm --no-template busybox true:  $(ms "$ISOBOX" run --rm --isolation vm --no-template --network none busybox true) ms"
    echo "  (a clone maps the template's guest RAM copy-on-write and restores its device state;"
    echo "   each gets its own CRNG seed, clock, MAC, IP and hostname before the container runs)"
else
    echo "  (vm isolation not available here)"
fi

step "a container's life: run -d, ps, exec, top, stats, logs, stop, restart elsewhere, rm"
show "$ISOBOX" run -d --name demo-web --label app=demo busybox \
    sh -c 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.5; done'
sleep 1.2
show "$ISOBOX" ps
show "$ISOBOX" exec demo-web sh -c 'echo "exec sees: $(hostname), pid 1 is $(cat /proc/1/comm)"'
show "$ISOBOX" top demo-web
show "$ISOBOX" stats --no-stream demo-web
show "$ISOBOX" logs --tail 2 demo-web
show "$ISOBOX" stop -t 1 demo-web
show "$ISOBOX" ls -a --filter label=app=demo
echo "Started again, this time under host isolation (same container, same scratch layer):"
show "$ISOBOX" start --isolation host demo-web
sleep 0.6
"$ISOBOX" inspect demo-web | python3 -c '
import json, sys
c = json.load(sys.stdin); c = c[0] if isinstance(c, list) else c
print("  isolation:", c["isolation"], "  state:", c["state"], "  pid on the host:", c["pid"])'
show "$ISOBOX" rm -f demo-web

step "limits that hold: a container's Job (memory, processes, CPU)"
echo "A memory hog under --memory 20m: killed by the OOM killer, exit 137:"
show "$ISOBOX" run --rm --memory 20m busybox sh -c 'x=a; while true; do x="$x$x"; done' \
    || echo "  (exit $?)"
echo "A fork bomb under --pids-limit 30: stopped at the limit, the host stays responsive:"
show "$ISOBOX" run --rm --pids-limit 30 busybox sh -c \
    'f() { f | f & }; f 2>/dev/null; sleep 2; echo "still $(ls /proc | grep -c "^[0-9]") processes"' \
    || echo "  (exit $?)"
echo "A CPU hog for 2 s under --cpus 0.2: about 20% of one CPU:"
show "$ISOBOX" run -d --name demo-again --cpus 0.2 busybox sh -c 'while :; do :; done'
sleep 2
show "$ISOBOX" stats --no-stream demo-again
show "$ISOBOX" rm -f demo-again

step "the image store: save in both formats, read back, a hostile tar refused"
show "$ISOBOX" save busybox -o "$work/busybox-oci.tar" --format oci
show "$ISOBOX" save busybox -o "$work/busybox-docker.tar" --format docker
show "$ISOBOX" import "$work/busybox-oci.tar" demo/busybox:oci
show "$ISOBOX" import "$work/busybox-docker.tar" demo/busybox:docker
show "$ISOBOX" images
python3 - "$work/evil.tar" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w") as t:
    i = tarfile.TarInfo("../../etc/isobox-demo-pwned"); data = b"pwned\n"; i.size = len(data)
    t.addfile(i, io.BytesIO(data))
PY
show "$ISOBOX" import "$work/evil.tar" demo/evil || echo "  (refused, exit $?)"
test ! -e /etc/isobox-demo-pwned && echo "  nothing written outside the store"
show "$ISOBOX" rmi demo/busybox:oci demo/busybox:docker

step "the runc-compatible runtime: the same image as an OCI bundle (what podman/docker/containerd call)"
bundle="$work/bundle"; mkdir -p "$bundle"
layer=$("$ISOBOX" image inspect busybox | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["layer_dirs"][0])')
cp -a "$layer" "$bundle/rootfs"
(cd "$bundle" && "$RUNTIME" spec)
python3 - "$bundle/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["process"]["terminal"] = False
cfg["hostname"] = "bundle"
cfg["process"]["args"] = ["sh", "-c", "echo \"hello from $(hostname), pid $$\""]
json.dump(cfg, open(sys.argv[1], "w"))
PY
show "$RUNTIME" --root "$work/runtime" run --bundle "$bundle" demo-bundle

step "nothing left behind"
show "$ISOBOX" ps -a
echo "mounts under $ISOBOX_ROOT: $(grep -c " $ISOBOX_ROOT/" /proc/self/mountinfo || true)"
