#!/usr/bin/env bash
# Propagation: time from `meridian ctl mount add` to the mount answering at every edge.
#
#   bench/propagation.sh                     # 100 changes over the three dev edges, 1,000 subscribers
#   CHANGES=100 SUBSCRIBERS=1000 SUB_CHANGES=20 bench/propagation.sh
#
# 1. Edges: starts `meridian dev` (coordinator, edges ams/iad/sin on 127.0.0.11-13, demo agent),
#    checks once with curl that a new mount is served over HTTPS at every edge, then
#    `meridian ctl bench-edges` CHANGES times adds a mount through the API and polls every edge's
#    plain-HTTP listener (one task per edge, every 1 ms, no process start or TLS handshake in the
#    sample) until it answers 200 for that host; the time to the *last* edge is one sample.
#    (Polling with one curl per attempt, as this script first did, measured curl: ~30 ms per
#    attempt, three edges in sequence, >100 ms per sample while every edge already served.)
# 2. 1,000 subscribers: `meridian ctl bench-watch` opens SUBSCRIBERS watch streams on the one
#    coordinator (deltas, as edges and GeoDNS ask), makes SUB_CHANGES mount changes and times each
#    until every stream delivered the write's revision; then again with a snapshot per change.
# Prints `value p99_ms_edges=…` and `value p99_ms_1000_subscribers=…`.
# Installs nothing; binds only 127.0.0.0/8 (meridian dev's fixed ports: 7700, 8443, 8080, 5353).
set -euo pipefail

CHANGES=${CHANGES:-100}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
SUB_CHANGES=${SUB_CHANGES:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MERIDIAN=${MERIDIAN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/meridian}

command -v curl >/dev/null || { echo "missing curl; install with: apt-get install curl" >&2; exit 2; }
if [[ ! -x $MERIDIAN ]]; then
  echo "no meridian binary at $MERIDIAN; build it with: cargo build --release -p meridian (or set MERIDIAN_BIN)" >&2
  exit 2
fi
# Each watch stream is a socket on both ends.
ulimit -n $((SUBSCRIBERS * 2 + 512)) 2>/dev/null || echo "note: could not raise the fd limit (ulimit -n $(ulimit -n))" >&2

WORK=$(mktemp -d /tmp/meridian-propagation.XXXXXX)
DEV_PID=
cleanup() {
  [[ -n $DEV_PID ]] && kill -INT "$DEV_PID" 2>/dev/null && wait "$DEV_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$MERIDIAN" dev --data-dir "$WORK/dev" >"$WORK/dev.out" 2>"$WORK/dev.log" &
DEV_PID=$!
for _ in $(seq 1 600); do
  grep -q "meridian dev: ready" "$WORK/dev.out" 2>/dev/null && break
  kill -0 "$DEV_PID" 2>/dev/null || { echo "meridian dev exited:" >&2; tail -20 "$WORK/dev.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "meridian dev: ready" "$WORK/dev.out" || { echo "meridian dev not ready after 60 s" >&2; exit 1; }
export MERIDIAN_ADMIN_TOKEN
MERIDIAN_ADMIN_TOKEN=$(cat "$WORK/dev/admin.token")
CA=$WORK/dev/ca.pem

# Every edge must serve a new mount over HTTPS too (same routing table as plain HTTP; checked once).
"$MERIDIAN" ctl mount add "https-check-$$.meridian.test/" demo >/dev/null
for ip in 127.0.0.11 127.0.0.12 127.0.0.13; do
  for _ in $(seq 1 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$CA" \
      --resolve "https-check-$$.meridian.test:8443:$ip" "https://https-check-$$.meridian.test:8443/headers" || true)
    [[ $code == 200 ]] && break
    sleep 0.01
  done
  [[ $code == 200 ]] || { echo "edge $ip never served https-check-$$.meridian.test over HTTPS" >&2; exit 1; }
done
"$MERIDIAN" ctl mount remove "https-check-$$.meridian.test/" >/dev/null

echo "edges: $CHANGES mount changes, each timed from the API call until all three edges answer"
line=$("$MERIDIAN" ctl bench-edges --changes "$CHANGES")
echo "$line"
p99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$line")

echo "subscribers: $SUBSCRIBERS watch streams on one coordinator, $SUB_CHANGES changes"
line=$("$MERIDIAN" ctl bench-watch --subscribers "$SUBSCRIBERS" --changes "$SUB_CHANGES" --service demo)
echo "$line"
sp99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$line")
echo "for comparison, the same streams sent a whole snapshot per change:"
"$MERIDIAN" ctl bench-watch --subscribers "$SUBSCRIBERS" --changes "$SUB_CHANGES" --service demo --snapshots

echo "value p99_ms_edges=$p99"
echo "value p99_ms_1000_subscribers=$sp99"
