#!/usr/bin/env bash
# Anycast: announce, withdraw and failover times in the namespace lab (infra/lab/lab), measured as
# the time until the router's kernel route for the VIP (198.18.0.10/32) changes.
#
#   sudo bench/anycast.sh              # 20 tries of each (about 5 minutes)
#   sudo TRIES=5 bench/anycast.sh
#
# Each try picks the next edge (1, 2, 3, 1, ...) and measures:
#   withdraw_drain     SIGTERM to the edge          → its next hop leaves the route
#   announce_cold      `lab edge N start`           → its next hop is back (edge + BIRD start,
#                                                     BGP session, 3 health checks at 100 ms)
#   failover_kill9     kill -9 of the edge          → next hop gone (its child BIRD dies with it)
#   failover_bfd       SIGSTOP of the edge's BIRD   → next hop gone (BFD 100 ms x 3)
#   failover_link      router-side link down        → next hop gone
#   withdraw_toggle    `birdc disable vip`          → next hop gone (what the edge does when unhealthy)
#   announce_toggle    `birdc enable vip`           → next hop back (what the edge does when healthy)
# and prints, per metric, the median and the worst in milliseconds. Polling the route costs one
# `ip` process per sample (a few ms), so small numbers are upper bounds.
# Needs root, bird2, iproute2, openssl, curl and a built meridian (cargo build -p meridian, or
# MERIDIAN_BIN). Installs nothing; takes the lab down (and up) itself; uses only namespaces mer-*.
set -euo pipefail

TRIES=${TRIES:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAB=$ROOT/infra/lab/lab
export MERIDIAN_LAB_DIR=${MERIDIAN_LAB_DIR:-/tmp/meridian-lab}
DIR=$MERIDIAN_LAB_DIR

[[ $(id -u) -eq 0 ]] || { echo "needs root (network namespaces)" >&2; exit 2; }
for t in bird birdc ip openssl curl setpriv; do
  command -v "$t" >/dev/null || { echo "missing $t; install with: apt-get install bird2 iproute2 openssl curl util-linux" >&2; exit 2; }
done

SAMPLES=$(mktemp -d /tmp/meridian-anycast-bench.XXXXXX)
cleanup() { "$LAB" down >/dev/null 2>&1 || true; rm -rf "$SAMPLES"; }
trap cleanup EXIT

now_ns() { date +%s%N; }
has() { "$LAB" route | grep -qx "$1"; }
# Waits (at most 30 s) until edge $1's next hop is present ($2=1) or gone ($2=0); prints ms since $3.
wait_route() {
  local n=$1 want=$2 t0=$3 end=$((SECONDS + 30))
  while :; do
    if has "$n"; then [[ $want == 1 ]] && break; else [[ $want == 0 ]] && break; fi
    ((SECONDS < end)) || { echo "timeout waiting for edge $n (want $want)" >&2; exit 1; }
  done
  echo "scale=1; ($(now_ns) - $t0) / 1000000" | bc
}
record() { echo "$2" >>"$SAMPLES/$1"; }
all_three() { local end=$((SECONDS + 30)); until [[ $("$LAB" route | wc -l) -eq 3 ]]; do ((SECONDS < end)) || { echo "edges did not all come back" >&2; exit 1; }; sleep 0.05; done; }
alive() { [[ -r /proc/$1/stat ]] && ! sed 's/.*) //' "/proc/$1/stat" | grep -q '^[ZX]'; }
edge_bird() { for p in $(ip netns pids "mer-e$1"); do [[ $(cat "/proc/$p/comm" 2>/dev/null) == bird ]] && alive "$p" && echo "$p"; done; }

command -v bc >/dev/null || { echo "missing bc; install with: apt-get install bc" >&2; exit 2; }

"$LAB" down >/dev/null 2>&1 || true
"$LAB" up >/dev/null
echo "lab up; $TRIES tries" >&2

for i in $(seq 1 "$TRIES"); do
  n=$(( (i - 1) % 3 + 1 ))

  pid=$("$LAB" edge "$n" pid)
  t0=$(now_ns); kill -TERM "$pid"
  record withdraw_drain "$(wait_route "$n" 0 "$t0")"
  while alive "$pid"; do sleep 0.02; done
  rm -f "$DIR/pids/e$n"
  t0=$(now_ns); "$LAB" edge "$n" start
  record announce_cold "$(wait_route "$n" 1 "$t0")"
  all_three

  pid=$("$LAB" edge "$n" pid)
  t0=$(now_ns); kill -9 "$pid"
  record failover_kill9 "$(wait_route "$n" 0 "$t0")"
  rm -f "$DIR/pids/e$n"
  "$LAB" edge "$n" start
  all_three

  bird=$(edge_bird "$n")
  t0=$(now_ns); kill -STOP "$bird"
  record failover_bfd "$(wait_route "$n" 0 "$t0")"
  kill -CONT "$bird"
  all_three

  t0=$(now_ns); ip -n mer-rt link set "rt-e$n" down
  record failover_link "$(wait_route "$n" 0 "$t0")"
  ip -n mer-rt link set "rt-e$n" up
  all_three

  t0=$(now_ns); ip netns exec "mer-e$n" birdc -s "$DIR/e$n/bird.ctl" disable vip >/dev/null
  record withdraw_toggle "$(wait_route "$n" 0 "$t0")"
  t0=$(now_ns); ip netns exec "mer-e$n" birdc -s "$DIR/e$n/bird.ctl" enable vip >/dev/null
  record announce_toggle "$(wait_route "$n" 1 "$t0")"
  all_three
  echo "try $i/$TRIES done (edge $n)" >&2
done

printf '%-18s %8s %8s %4s\n' metric median_ms worst_ms n
for m in announce_cold announce_toggle withdraw_toggle withdraw_drain failover_kill9 failover_bfd failover_link; do
  sort -n "$SAMPLES/$m" >"$SAMPLES/$m.sorted"
  count=$(wc -l <"$SAMPLES/$m.sorted")
  median=$(sed -n "$(( (count + 1) / 2 ))p" "$SAMPLES/$m.sorted")
  worst=$(tail -1 "$SAMPLES/$m.sorted")
  printf '%-18s %8s %8s %4s\n' "$m" "$median" "$worst" "$count"
done
