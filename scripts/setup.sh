#!/usr/bin/env bash
# Prepare this machine for isobox: Debian packages, the dev venv, the default image.
#
# Idempotent, and quick when everything is already done (no apt-get update, no pip).
#
#   scripts/setup.sh            packages + .venv + `isobox image bootstrap busybox`
#   scripts/setup.sh --peers    also the peer engines the benchmarks compare against
#
# Environment:
#   PYTHON                       interpreter for a new .venv (default: python3, >= 3.11)
#   ISOBOX_SETUP_NO_BOOTSTRAP=1  skip the image bootstrap (tests bootstrap into their own
#                                ISOBOX_ROOT; `make test` sets this)
#   ISOBOX_SETUP_NO_UVM=1        skip building the utility-VM assets (`isobox uvm build`)
#   ISOBOX_ROOT                  honoured by the bootstrap and uvm steps (default /var/lib/isobox)
set -euo pipefail

# Debian packages the engine, its tests and `make demo` need.
PACKAGES=(
    busybox-static    # the default image's userland (replaces Debian's `busybox`)
    qemu-system-x86   # utility VMs
    erofs-utils       # utility-VM / layer images
    squashfs-tools
    iproute2          # networks: bridge, veth
    nftables          # networks: NAT, port publishing
    skopeo            # interop tests: OCI layouts, registries
    umoci
    podman            # interop tests: `podman load`/`podman save` of isobox archives
    docker.io         # interop tests: a private dockerd + /usr/bin/docker for `docker load`/`save`
    debootstrap       # a Debian image for tests and the utility VM
    python3
    python3-venv
    python3-pip
    make
    tar
    gzip
    zstd
    util-linux        # unshare, nsenter, flock
)

# Peer engines and tools the benchmarks (bench/) compare isobox against.
PEER_PACKAGES=(
    runc
    crun
    podman
    conmon
    containerd
    docker.io
    hyperfine
    skopeo
    umoci
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.isobox-installed"
PYTHON="${PYTHON:-python3}"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

with_peers=0
for arg in "$@"; do
    case "$arg" in
        --peers) with_peers=1 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

# Two `make` runs at once (several engineers share one tree) must not pip-install into
# the same venv concurrently: hold a lock on this script for the whole run.
if command -v flock >/dev/null 2>&1; then
    exec 9<"${BASH_SOURCE[0]}"
    flock 9
fi

cd "$ROOT"

# --- 1. Debian packages -------------------------------------------------------------
candidates=("${PACKAGES[@]}")
if ((with_peers)); then
    candidates+=("${PEER_PACKAGES[@]}")
fi
wanted=()
for pkg in "${candidates[@]}"; do
    [[ " ${wanted[*]-} " == *" $pkg "* ]] || wanted+=("$pkg")  # skopeo, umoci are in both
done

missing=()
for pkg in "${wanted[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    say "debian packages: all ${#wanted[@]} present"
else
    say "debian packages: installing ${missing[*]}"
    ((EUID == 0)) || die "installing packages needs root (missing: ${missing[*]})"
    # The peer engines ship daemons (dockerd, containerd); the benchmarks start their own,
    # with state in a temporary folder, so the install must not start them on the host.
    created_policy=""
    # Installing docker.io or containerd must not start host daemons (docker0, iptables,
    # /var/lib/docker): deny service starts for the duration of the install.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=/usr/sbin/policy-rc.d
        trap 'rm -f "$created_policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-o DPkg::Lock::Timeout=300 -q)
    apt_log="$(mktemp -t isobox-setup-apt.XXXXXX)"
    if ! { apt-get "${apt_opts[@]}" update \
           && apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}"; \
         } >"$apt_log" 2>&1; then
        tail -n 25 "$apt_log" >&2
        die "apt-get failed; full log in $apt_log"
    fi
    rm -f "$apt_log"
    if [[ -n "$created_policy" ]]; then
        rm -f "$created_policy"
        trap - EXIT
    fi
fi

# --- 2. the dev venv ----------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
    say "venv: $VENV exists ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "isobox needs Python >= 3.11; '$PYTHON' is $("$PYTHON" -V 2>&1)"
    if [[ -e "$VENV" ]]; then
        say "venv: $VENV is broken (its interpreter does not run); recreating it"
        rm -rf "$VENV"
    fi
    say "venv: creating $VENV with $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi

if [[ ! -e "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
    say "venv: pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "${ROOT}[dev]"
    touch "$STAMP"
else
    say "venv: isobox[dev] installed (pyproject.toml unchanged since $(date -r "$STAMP" '+%F %T'))"
fi

# An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set (as on these
# machines) every `isobox` command would compile isobox's modules from source again
# (~30 ms of its start). Compile them now; only changed files are recompiled.
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/src/isobox" >/dev/null \
    || die "compiling isobox's modules failed"

# --- 3. the default image -----------------------------------------------------------
if [[ "${ISOBOX_SETUP_NO_BOOTSTRAP:-0}" == "1" ]]; then
    say "image: bootstrap skipped (ISOBOX_SETUP_NO_BOOTSTRAP=1)"
else
    say "image: isobox image bootstrap busybox (ISOBOX_ROOT=${ISOBOX_ROOT:-/var/lib/isobox})"
    # 9<&-: whatever the bootstrap leaves running must not hold this script's lock.
    "$VENV/bin/isobox" image bootstrap busybox 9<&- \
        || die "'isobox image bootstrap busybox' failed (exit $?); ISOBOX_SETUP_NO_BOOTSTRAP=1 skips it"
fi

# --- 4. the utility-VM assets (--isolation=vm) -------------------------------------------
# Guest kernel, initramfs and image from Debian's packages (apt-get download, never
# installed); cached by input hash, so a rerun with nothing changed takes ~0.2 s. Tests
# build their own shared copy (tests/conftest.py, ISOBOX_UVM_DIR) on the first vm test.
if [[ "${ISOBOX_SETUP_NO_UVM:-0}" == "1" ]]; then
    say "uvm: assets build skipped (ISOBOX_SETUP_NO_UVM=1)"
else
    say "uvm: isobox uvm build (ISOBOX_ROOT=${ISOBOX_ROOT:-/var/lib/isobox})"
    "$VENV/bin/isobox" uvm build 9<&- \
        || die "'isobox uvm build' failed (exit $?); ISOBOX_SETUP_NO_UVM=1 skips it"
fi

say "done"
