#!/usr/bin/env bash
# Emulated cluster network for the end-to-end benchmark: N network namespaces, one per rank.
#
#   scripts/netns.sh up N RATE DELAY   e.g.  scripts/netns.sh up 2 1gbit 0.5ms
#   scripts/netns.sh down              removes everything this script ever created (idempotent)
#   scripts/netns.sh hosts N           prints the IP of each rank, one per line
#
# NETNS_PREFIX (default lbtp, 1-8 lowercase letters) names the namespaces, so that two users
# (e.g. the tests and a benchmark) do not tear down each other's network.
#
# Layout: namespace PREFIX-br holds a bridge br0; namespace PREFIXR (R = 0..N-1) holds eth0
# (10.77.0.(R+1)/24) whose veth peer vR sits on br0. There is no default route and nothing is
# attached to the root namespace, so no traffic can leave the namespaces.
#
# Shaping, on each rank's eth0 egress, so each rank sends at most RATE (a full-duplex link of
# RATE per direction, like a NIC port):
#   DELAY 0     -> tbf rate RATE (burst max(128 KiB, RATE * 1 ms), queue bound 100 ms).
#   DELAY > 0   -> netem rate RATE delay DELAY (every packet waits DELAY one way). Needs the
#                  kernel's sch_netem; where it is missing (e.g. minimal VM kernels) this fails
#                  with a clear message instead of silently not delaying.
# RATE none with DELAY 0 leaves the link unshaped. Loopback inside a namespace is not shaped.
set -euo pipefail

PREFIX=${NETNS_PREFIX:-lbtp}
BRNS=${PREFIX}-br
SUBNET=10.77.0

die() { echo "netns.sh: $*" >&2; exit 1; }

[[ "$PREFIX" =~ ^[a-z]{1,8}$ ]] || die "NETNS_PREFIX must be 1-8 lowercase letters, got '$PREFIX'"

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces and tc need CAP_NET_ADMIN)"
    command -v ip >/dev/null || die "iproute2 'ip' not found"
    command -v tc >/dev/null || die "iproute2 'tc' not found"
}

down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        case "$ns" in
            ${PREFIX}-br|${PREFIX}[0-9]*) ip netns del "$ns" 2>/dev/null || true ;;
        esac
    done
}

up() {
    local n=$1 rate=$2 delay=$3 r
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "N must be 1..64, got '$n'"
    down
    ip netns add "$BRNS"
    ip -n "$BRNS" link add br0 type bridge
    ip -n "$BRNS" link set br0 up
    ip -n "$BRNS" link set lo up
    for ((r = 0; r < n; r++)); do
        local ns=${PREFIX}${r}
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # create the pair inside the rank namespace, then move the peer to the bridge namespace
        ip -n "$ns" link add eth0 type veth peer name "v${r}"
        ip -n "$ns" link set "v${r}" netns "$BRNS"
        ip -n "$BRNS" link set "v${r}" master br0
        ip -n "$BRNS" link set "v${r}" up
        ip -n "$ns" addr add "${SUBNET}.$((r + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        shape "$ns" "$rate" "$delay"
    done
}

# bits per second of a tc rate such as 1gbit, 500mbit, 10gbit
rate_bps() {
    local v=${1,,}
    case "$v" in
        *gbit) echo $(( ${v%gbit} * 1000000000 )) ;;
        *mbit) echo $(( ${v%mbit} * 1000000 )) ;;
        *kbit) echo $(( ${v%kbit} * 1000 )) ;;
        *bit) echo "${v%bit}" ;;
        *) die "rate must look like 10gbit, 500mbit, 800kbit; got '$1'" ;;
    esac
}

shape() {
    local ns=$1 rate=$2 delay=$3
    [ "$rate" = "none" ] && [ "$delay" = "0" ] && return 0
    if [ "$delay" != "0" ] && [ "$delay" != "0ms" ]; then
        # netem is the only qdisc that delays packets; some kernels are built without it
        ip netns exec "$ns" tc qdisc add dev eth0 root netem rate "$rate" delay "$delay" limit 100000 \
            || die "netem (tc delay) is not available in this kernel; use DELAY 0 (rate-only shaping with tbf)"
        return 0
    fi
    # tbf: burst must hold the largest packet (GSO super-packets on veth reach 64 KiB) and
    # at least one timer tick (1 ms) of the rate; latency bounds the queue.
    local bps burst
    bps=$(rate_bps "$rate")
    burst=$(( bps / 8 / 1000 ))
    [ "$burst" -lt 131072 ] && burst=131072
    ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 100ms
}

hosts() {
    local n=$1 r
    for ((r = 0; r < n; r++)); do echo "${SUBNET}.$((r + 1))"; done
}

case "${1:-}" in
    up)
        [ $# -eq 4 ] || die "usage: $0 up N RATE DELAY   (RATE 'none' = unshaped)"
        need_root
        trap 'echo "netns.sh: setup failed; removing what was created" >&2; down' EXIT
        up "$2" "$3" "$4"
        trap - EXIT
        ;;
    down)
        need_root
        down
        ;;
    hosts)
        [ $# -eq 2 ] || die "usage: $0 hosts N"
        hosts "$2"
        ;;
    *)
        die "usage: $0 up N RATE DELAY | down | hosts N"
        ;;
esac
