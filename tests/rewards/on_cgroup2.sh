#!/usr/bin/env bash
# The sandbox's attack tests on a cgroup-v2-only kernel, for hosts like this project's whose kernel binds
# pids and memory to cgroup v1: a throwaway virtme-ng guest (qemu) that shares this machine's filesystem
# (the checkout writable through an overlay, the host's copy untouched) and binds no controller to v1, so the
# outer cap (tests/rewards/conftest.py) is built on cgroup2. Exits with pytest's status.
# Needs root, and once:
#   apt-get install -y --no-install-recommends qemu-system-x86 busybox-static linux-image-amd64
#   python3 -m venv /opt/vng && /opt/vng/bin/pip install virtme-ng
# VNG: the vng command (default: vng on PATH); KERNEL: the guest's kernel (default: the newest
# /boot/vmlinuz-*); VNG_OPTS: more vng options, as shell words. Where /dev/kvm cannot boot a stock kernel
# (this project's Firecracker VMs, whose KVM is kvm-pvm): VNG_OPTS='--disable-kvm --qemu-opts="-cpu max"',
# and qemu emulates the CPU, several times slower: the tests' CPU-time and wall-time bounds can fail there
# while every containment check holds (docs/notes.md#sandbox).
#   bash tests/rewards/on_cgroup2.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = --guest ]; then  # inside the guest, as root
    out=$2; shift 2
    exec > "$out/guest.log" 2>&1
    mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    echo "kernel $(uname -r); controllers bound to v1: $(awk 'NR > 1 && $2 != 0 {print $1}' /proc/cgroups | xargs)"
    echo "cgroup2 offers: $(cat /sys/fs/cgroup/cgroup.controllers); this process: $(cat /proc/self/cgroup)"
    .venv/bin/python -c "from tests.rewards import conftest
groups, how = conftest.cap_plan('probe', conftest.own_cgroups())
print('outer cap built on', how, groups)"
    set +e
    CI=true .venv/bin/python -m pytest -q -p no:cacheprovider tests/rewards/test_sandbox.py "$@"
    echo $? > "$out/rc"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "on_cgroup2: needs root" >&2; exit 2; }
VNG=${VNG:-vng}
KERNEL=${KERNEL:-$(ls -v /boot/vmlinuz-* 2>/dev/null | tail -1)}
command -v "$VNG" >/dev/null && [ -n "$KERNEL" ] || { echo "on_cgroup2: needs vng and a kernel (see the header)" >&2; exit 2; }
out=$(mktemp -d /var/tmp/on_cgroup2.XXXXXX)  # not under /tmp: the guest mounts a fresh /tmp
trap 'rm -rf "$out"' EXIT
eval "opts=(${VNG_OPTS:-})"  # shell words, so that an option may hold spaces
# vng runs virtme-run, installed beside it
PATH=$(dirname "$(command -v "$VNG")"):$PATH "$VNG" --run "$KERNEL" --cpus 2 --memory 4G "${opts[@]}" \
    --overlay-rwdir="$PWD" --rwdir="$out" -- "$PWD/tests/rewards/on_cgroup2.sh" --guest "$out" "$@" >/dev/null \
    || echo "on_cgroup2: vng exited with $?" >&2
cat "$out/guest.log"
exit "$(cat "$out/rc" 2>/dev/null || echo 1)"
