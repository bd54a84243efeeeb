#!/usr/bin/env bash
# Meridian's tunnel vs rathole (Noise transport, so both are encrypted) vs the origin direct.
#
#   bench/tunnel.sh                              # 3 alternating rounds, 10 s of wrk per case, 1 GiB each way
#   ROUNDS=1 DURATION=5 BULK_BYTES=268435456 bench/tunnel.sh   # quick smoke run
#
# Origin: `meridian demo-app` at 127.0.0.1:7781 (`/bytes/N` streams N bytes, `POST /upload` reads
# and hashes the body), as started by `meridian dev`. Paths measured, all on loopback:
#   meridian  wrk/curl → edge ams 127.0.0.11:8080 (HTTP routing) → QUIC tunnel → agent → origin
#   rathole   wrk/curl → rathole server 127.0.0.41:8080 → Noise over TCP → rathole client → origin
#   direct    wrk/curl → origin
# Requests/s: wrk, 64 keep-alive connections (CONNS), 16-byte responses; and again with a new
# connection (a new visitor) per request. Bulk: one `curl` download
# of BULK_BYTES and one upload of BULK_BYTES per path and round; throughput = 2*BULK_BYTES / (time
# down + time up). Runs alternate between the paths (order rotated each round); medians printed as
#   ratio rps_vs_rathole=…  ratio throughput_vs_rathole=…  ratio throughput_vs_direct=…
# (Meridian over the peer; above 1 is better for Meridian).
# Note rathole relays TCP: with keep-alive it opens its per-visitor connection once per wrk
# connection, so the rps comparison is per-request overhead, not connection setup.
# Installs nothing: it says what to install. Binds only 127.0.0.0/8. Bounded: every step has a timeout.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
BULK_BYTES=${BULK_BYTES:-1073741824}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MERIDIAN=${MERIDIAN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/meridian}
RATHOLE=${RATHOLE_BIN:-$(command -v rathole || echo "$HOME/.cargo/bin/rathole")}

missing=()
for tool in wrk:wrk curl:curl; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  echo "missing tools; install with: apt-get install ${missing[*]}" >&2
  exit 2
fi
if [[ ! -x $RATHOLE ]]; then
  echo "no rathole at $RATHOLE; install it with: cargo install rathole --no-default-features --features server,client,noise" >&2
  echo "(rathole 0.5.0's lock file pins time 0.3.29, which current rustc rejects, so not --locked)" >&2
  exit 2
fi
if [[ ! -x $MERIDIAN ]]; then
  echo "no meridian binary at $MERIDIAN; build it with: cargo build --release -p meridian (or set MERIDIAN_BIN)" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/meridian-tunnel-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- Meridian (meridian dev)
(cd "$WORK" && exec "$MERIDIAN" dev >"$WORK/dev.log" 2>&1) &
PIDS+=($!)
MERIDIAN_URL=http://127.0.0.11:8080/demo
echo "waiting for meridian dev (edge ams on 127.0.0.11) ..."
for _ in $(seq 1 300); do
  curl -sf -m 2 -H "Host: edge.meridian.test" -o /dev/null "$MERIDIAN_URL/bytes/16" && break
  sleep 0.2
done
curl -sf -m 2 -H "Host: edge.meridian.test" -o /dev/null "$MERIDIAN_URL/bytes/16" ||
  { echo "meridian dev did not come up; see $WORK/dev.log" >&2; tail -20 "$WORK/dev.log" >&2; exit 1; }

# ---------------------------------------------------------------- rathole (Noise NK, x25519)
keys=$("$RATHOLE" --genkey)
priv=$(awk '/Private Key:/ {getline; print}' <<<"$keys")
pub=$(awk '/Public Key:/ {getline; print}' <<<"$keys")
cat >"$WORK/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.41:2333"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "$priv"
[server.services.demo]
token = "bench-token"
bind_addr = "127.0.0.41:8080"
EOF
cat >"$WORK/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.41:2333"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "$pub"
[client.services.demo]
token = "bench-token"
local_addr = "127.0.0.1:7781"
EOF
RUST_LOG=warn "$RATHOLE" -s "$WORK/rathole-server.toml" >"$WORK/rathole-server.log" 2>&1 &
PIDS+=($!)
sleep 0.3
RUST_LOG=warn "$RATHOLE" -c "$WORK/rathole-client.toml" >"$WORK/rathole-client.log" 2>&1 &
PIDS+=($!)
RATHOLE_URL=http://127.0.0.41:8080
for _ in $(seq 1 100); do curl -sf -m 2 -o /dev/null "$RATHOLE_URL/bytes/16" && break; sleep 0.1; done
curl -sf -m 2 -o /dev/null "$RATHOLE_URL/bytes/16" ||
  { echo "rathole did not come up; see $WORK/rathole-*.log" >&2; cat "$WORK"/rathole-*.log >&2; exit 1; }

DIRECT_URL=http://127.0.0.1:7781
declare -A URL=([meridian]=$MERIDIAN_URL [rathole]=$RATHOLE_URL [direct]=$DIRECT_URL)

# ---------------------------------------------------------------- runs
RESULTS=$WORK/results.txt
: >"$RESULTS"
BULK_TIMEOUT=${BULK_TIMEOUT:-300}

rps_run() { # path
  local path=$1 out rps errs
  out=$(timeout $((DURATION + 30)) wrk -t2 -c"$CONNS" -d"${DURATION}s" \
    -H "Host: edge.meridian.test" "${URL[$path]}/bytes/16" 2>&1)
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "run path=$path rps=$rps $errs"
  echo "$path rps $rps" >>"$RESULTS"
}

# A new visitor per request (`Connection: close`): what rathole pays per visitor — a new
# connection from its client to the origin, set up over its control channel — and what the
# issue's requests/s goal is about. Meridian opens a QUIC stream on an existing connection.
visitor_run() { # path
  local path=$1 out rps errs
  out=$(timeout $((DURATION + 30)) wrk -t2 -c"$CONNS" -d"${DURATION}s" -H "Connection: close" \
    -H "Host: edge.meridian.test" "${URL[$path]}/bytes/16" 2>&1)
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "run path=$path new_visitor_rps=$rps $errs"
  echo "$path visitor $rps" >>"$RESULTS"
}

bulk_run() { # path
  local path=$1 down up
  down=$(curl -sf -m "$BULK_TIMEOUT" -H "Host: edge.meridian.test" -o /dev/null \
    -w '%{time_total}' "${URL[$path]}/bytes/$BULK_BYTES")
  # Streamed from head(1) with chunked encoding: nothing is buffered whole, on either side.
  up=$(head -c "$BULK_BYTES" /dev/zero | curl -sf -m "$BULK_TIMEOUT" -H "Host: edge.meridian.test" \
    -X POST -T - -o /dev/null -w '%{time_total}' "${URL[$path]}/upload")
  local mibs
  mibs=$(awk -v b="$BULK_BYTES" -v d="$down" -v u="$up" 'BEGIN{ printf "%.1f", 2*b/1048576/(d+u) }')
  echo "run path=$path bulk down_s=$down up_s=$up throughput_MiB_s=$mibs"
  echo "$path bulk $mibs" >>"$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  case $((round % 3)) in
    1) order="meridian rathole direct" ;;
    2) order="rathole direct meridian" ;;
    0) order="direct meridian rathole" ;;
  esac
  for path in $order; do rps_run "$path"; done
  for path in $order; do visitor_run "$path"; done
  for path in $order; do bulk_run "$path"; done
done

median() { sort -g | awk '{a[NR]=$1} END{ if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
med() { awk -v p="$1" -v k="$2" '$1==p && $2==k {print $3}' "$RESULTS" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "nan"; else printf "%.2f", a/b }'; }

echo
echo "medians over $ROUNDS rounds (wrk c=$CONNS ${DURATION}s, 16 B responses; bulk $BULK_BYTES bytes each way):"
for path in meridian rathole direct; do
  echo "median path=$path rps=$(med "$path" rps) new_visitor_rps=$(med "$path" visitor) throughput_MiB_s=$(med "$path" bulk)"
done
echo
echo "ratio rps_vs_rathole=$(ratio "$(med meridian rps)" "$(med rathole rps)")"
echo "ratio rps_new_visitor_vs_rathole=$(ratio "$(med meridian visitor)" "$(med rathole visitor)")"
echo "ratio throughput_vs_rathole=$(ratio "$(med meridian bulk)" "$(med rathole bulk)")"
echo "ratio throughput_vs_direct=$(ratio "$(med meridian bulk)" "$(med direct bulk)")"
