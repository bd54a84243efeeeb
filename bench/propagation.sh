#!/usr/bin/env bash
# Propagation: time from `meridian ctl mount add` to the mount answering at every edge.
#
#   bench/propagation.sh                     # 100 changes over the three dev edges, 1,000 subscribers
#   CHANGES=100 SUBSCRIBERS=1000 SUB_CHANGES=20 bench/propagation.sh
#
# 1. Edges: starts `meridian dev` (coordinator, edges ams/iad/sin on 127.0.0.11-13, demo agent),
#    then CHANGES times: `meridian ctl mount add benchN.meridian.test/ demo`, and polls each edge
#    with curl until it answers 200 for that host; the time to the *last* edge is one sample.
#    curl polling adds a few ms per sample (process start), so this is an upper bound.
# 2. 1,000 subscribers: `meridian ctl bench-watch` opens SUBSCRIBERS watch streams on the one
#    coordinator, makes SUB_CHANGES mount changes and times each until every stream delivered a
#    snapshot at the write's revision.
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

now_ns() { date +%s%N; }

# p50 and p99 (nearest rank) of the numbers on stdin, in ms with one decimal.
percentiles() {
  sort -n | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan nan"; exit }
    i50 = int(0.50 * NR + 0.999999); i99 = int(0.99 * NR + 0.999999)
    printf "%.1f %.1f %.1f\n", v[i50], v[i99], v[NR] }'
}

echo "edges: $CHANGES mount changes, each timed until all three edges answer"
: >"$WORK/edges.ms"
for n in $(seq 1 "$CHANGES"); do
  host="bench$n-$$.meridian.test"
  t0=$(now_ns)
  "$MERIDIAN" ctl mount add "$host/" demo >/dev/null
  for ip in 127.0.0.11 127.0.0.12 127.0.0.13; do
    for _ in $(seq 1 2000); do
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$CA" \
        --resolve "$host:8443:$ip" "https://$host:8443/headers" || true)
      [[ $code == 200 ]] && break
    done
    [[ $code == 200 ]] || { echo "edge $ip never served $host" >&2; exit 1; }
  done
  t1=$(now_ns)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) / 1e6 }' >>"$WORK/edges.ms"
  "$MERIDIAN" ctl mount remove "$host/" >/dev/null
done
read -r p50 p99 max < <(percentiles <"$WORK/edges.ms")
echo "edges: n=$CHANGES p50_ms=$p50 p99_ms=$p99 max_ms=$max"

echo "subscribers: $SUBSCRIBERS watch streams on one coordinator, $SUB_CHANGES changes"
line=$("$MERIDIAN" ctl bench-watch --subscribers "$SUBSCRIBERS" --changes "$SUB_CHANGES" --service demo)
echo "$line"
sp99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$line")

echo "value p99_ms_edges=$p99"
echo "value p99_ms_1000_subscribers=$sp99"
