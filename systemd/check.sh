#!/bin/sh
# Check the shipped systemd units the way CI does (systemd as PID 1 is not needed):
#   1. systemd-analyze verify on the service and every socket unit: ANY output fails
#      (verify exits 0 on warnings, so its exit status alone proves nothing);
#   2. systemd-analyze security --offline=true: overall exposure must be <= 1.5.
#
# verify also checks that ExecStart= names an executable. When /usr/bin/traits-agent is
# installed (the .deb), the units are verified against it as they are. When it is not (a
# plain checkout), they are verified inside a temporary root (--root) holding the host's
# units, copies of ours and a placeholder /usr/bin/traits-agent, and this script says so on stderr; everything
# else verify checks is the same. Install the package first to check the real binary.
#
# Usage: systemd/check.sh            (exit 0: clean; 1: a check failed; 2: cannot run)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
max_exposure=1.5
units="traits-agent.service traits-agent.socket traits-agent-udp.socket
traits-agent-forward.socket traits-agent-forward-tcp.socket"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check.sh: systemd-analyze not found (apt-get install systemd)" >&2
    exit 2
fi

status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# -- 1. verify ----------------------------------------------------------------------------------
if [ -x /usr/bin/traits-agent ]; then
    set --
    for unit in $units; do set -- "$@" "$here/$unit"; done
    systemd-analyze verify --man=no "$@" >"$tmp/verify.out" 2>&1 || true
else
    echo "check.sh: NOTE: /usr/bin/traits-agent is not installed; verifying in a temporary" \
        "root with a placeholder executable (install the .deb to verify the real one)" >&2
    root="$tmp/root"
    mkdir -p "$root/usr/bin" "$root/lib/systemd"
    # the host's own units (sysinit.target, sockets.target, ...) that ours depend on
    cp -a /lib/systemd/system "$root/lib/systemd/system"
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/traits-agent"
    chmod 0755 "$root/usr/bin/traits-agent"
    set --
    for unit in $units; do
        cp "$here/$unit" "$root/lib/systemd/system/$unit"
        set -- "$@" "$root/lib/systemd/system/$unit"
    done
    systemd-analyze verify --man=no --root="$root" "$@" >"$tmp/verify.out" 2>&1 || true
fi
if [ -s "$tmp/verify.out" ]; then
    echo "FAIL verify: systemd-analyze verify printed:" >&2
    cat "$tmp/verify.out" >&2
    status=1
else
    echo "ok   verify: no output for $(echo "$units" | wc -w) units"
fi

# -- 2. exposure --------------------------------------------------------------------------------
systemd-analyze security --offline=true --no-pager "$here/traits-agent.service" \
    >"$tmp/security.out" 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for traits-agent.service: \([0-9.]*\).*/\1/p' \
    "$tmp/security.out")
if [ -z "$exposure" ]; then
    echo "FAIL security: no exposure level in the output:" >&2
    cat "$tmp/security.out" >&2
    status=1
elif awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e > m) }'; then
    echo "FAIL security: exposure $exposure > $max_exposure; what still counts:" >&2
    grep '✗' "$tmp/security.out" >&2 || true
    status=1
else
    echo "ok   security: exposure $exposure <= $max_exposure"
fi

exit $status
