#!/usr/bin/env bash
# Meridian's edge vs HAProxy vs nginx in front of the same origin, on loopback.
#
#   bench/edge.sh                 # defaults: 3 alternating rounds of 10 s per case
#   ROUNDS=5 DURATION=20 CONNS=64 bench/edge.sh
#   PROXIES="meridian haproxy" PROTOS=http SIZES=16 ROUNDS=5 DURATION=5 bench/edge.sh   # a subset
#   MERIDIAN_BASE_BIN=/tmp/meridian-before bench/edge.sh   # also an edge from another build
#   SIZES="16 post1024" bench/edge.sh   # `postN`: POST N bytes to the origin's /upload instead
#
# With MERIDIAN_BASE_BIN, an extra edge from that binary (region ams, 127.0.0.15, same coordinator,
# same origin) runs as proxy `meridian_base` in the same rounds, and `ratio …_vs_meridian_base`
# lines compare the two builds: A/B of a change, alternating, on the same noisy machine.
#
# Origin: `meridian demo-app` (127.0.0.1:7781, /bytes/N) as started by `meridian dev`.
# Compared configuration: Meridian's edge fronting that origin directly (a service with
# `--origin http://127.0.0.1:7781`, mounted at /direct), as nginx and HAProxy do. Extra line
# `meridian_tunnel`: the same edge reaching it through the tunnel (edge → QUIC → tunnel agent →
# origin, the `demo` service), one more process hop than the peers.
# Each proxy is pinned (all threads) to CPU $PROXY_CPU; wrk, the origin and the tunnel agent run on
# $LOAD_CPU. HTTP/1.1 keep-alive over plain HTTP and HTTPS, 16 B and 64 KiB responses, runs
# alternate between proxies so drift hits all three alike. Prints per-run lines, medians, and
#   ratio rps_http1_vs_haproxy=…  ratio p99_http1_vs_haproxy=…  (and _https_, and vs nginx)
# (Meridian over the peer; rps above 1 and p99 below 1 are better for Meridian).
# Each run also reads the proxy's CPU time (utime + stime of all its processes and threads, from
# /proc/PID/stat) around wrk and prints CPU µs per request served: on a shared 2-core machine rps
# moves with other load, CPU per request much less. `ratio cpu_per_req_…` lines compare it (below 1
# is better for Meridian). For meridian_tunnel it counts the edge only (the agent is on LOAD_CPU).
# Installs nothing: it says what to apt-get. Binds only 127.0.0.0/8.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
PROXIES=${PROXIES:-meridian haproxy nginx meridian_tunnel}
PROTOS=${PROTOS:-http https}
SIZES=${SIZES:-16 65536}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MERIDIAN=${MERIDIAN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/meridian}

missing=()
for tool in nginx:nginx-light haproxy:haproxy wrk:wrk taskset:util-linux curl:curl; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  echo "missing tools; install with: apt-get install ${missing[*]}" >&2
  exit 2
fi
if [[ ! -x $MERIDIAN ]]; then
  echo "no meridian binary at $MERIDIAN; build it with: cargo build --release -p meridian (or set MERIDIAN_BIN)" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/meridian-edge-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- Meridian (meridian dev)
# One worker thread per Meridian process, as nginx and HAProxy get one each (MERIDIAN_WORKER_THREADS=0
# is one per core, the default outside this bench).
(cd "$WORK" && MERIDIAN_WORKER_THREADS=${MERIDIAN_WORKER_THREADS:-1} exec "$MERIDIAN" dev >"$WORK/dev.log" 2>&1) &
PIDS+=($!)
DEV_PID=$!
CA=$WORK/.meridian-dev/ca.pem
echo "waiting for meridian dev (edge ams on 127.0.0.11) ..."
for _ in $(seq 1 300); do
  if [[ -f $CA ]] && curl -sf --cacert "$CA" --resolve edge.meridian.test:8443:127.0.0.11 \
      -o /dev/null https://edge.meridian.test:8443/demo/bytes/16; then
    break
  fi
  sleep 0.2
done
curl -sf --cacert "$CA" --resolve edge.meridian.test:8443:127.0.0.11 -o /dev/null \
  https://edge.meridian.test:8443/demo/bytes/16 || { echo "meridian dev did not come up; see $WORK/dev.log" >&2; tail -20 "$WORK/dev.log" >&2; exit 1; }

# The direct-origin service: the same origin, no agent.
(cd "$WORK" && "$MERIDIAN" ctl service create direct --origin http://127.0.0.1:7781 >/dev/null &&
  "$MERIDIAN" ctl mount add edge.meridian.test/direct direct --strip-prefix >/dev/null)
for _ in $(seq 1 100); do
  curl -sf --cacert "$CA" --resolve edge.meridian.test:8443:127.0.0.11 -o /dev/null \
    https://edge.meridian.test:8443/direct/bytes/16 && break
  sleep 0.1
done
curl -sf --cacert "$CA" --resolve edge.meridian.test:8443:127.0.0.11 -o /dev/null \
  https://edge.meridian.test:8443/direct/bytes/16 || { echo "direct-origin service did not come up" >&2; exit 1; }

# Pin: the ams edge on PROXY_CPU; every other dev process (origin, agent, ...) on LOAD_CPU.
EDGE_PID=
for pid in $(pgrep -P "$DEV_PID"); do
  args=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  if [[ $args == *" edge "* && $args == *"127.0.0.11"* ]]; then
    EDGE_PID=$pid
    taskset -a -cp "$PROXY_CPU" "$pid" >/dev/null
  else
    taskset -a -cp "$LOAD_CPU" "$pid" >/dev/null
  fi
done

# ---------------------------------------------------------------- peers
cat "$WORK/.meridian-dev/edge.pem" "$WORK/.meridian-dev/edge.key" >"$WORK/edge-combined.pem"
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream origin { server 127.0.0.1:7781; keepalive 64; }
  server {
    listen 127.0.0.31:8080;
    listen 127.0.0.31:8443 ssl;
    ssl_certificate $WORK/.meridian-dev/edge.pem;
    ssl_certificate_key $WORK/.meridian-dev/edge.key;
    location /demo/ {
      proxy_pass http://origin/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
EOF
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.32:8080
  bind 127.0.0.32:8443 ssl crt $WORK/edge-combined.pem
  default_backend origin
backend origin
  http-request replace-path /demo(/.*) \1
  server o1 127.0.0.1:7781
EOF
[[ -n $EDGE_PID ]] || { echo "ams edge process not found under meridian dev" >&2; exit 1; }

# An edge from another build, beside the dev network's ams edge (A/B of a change).
BASE_PID=
if [[ -n ${MERIDIAN_BASE_BIN:-} ]]; then
  D=$WORK/.meridian-dev
  MERIDIAN_WORKER_THREADS=${MERIDIAN_WORKER_THREADS:-1} MERIDIAN_NODE_TOKEN=$(cat "$D/node.token") \
    taskset -c "$PROXY_CPU" "$MERIDIAN_BASE_BIN" edge --id ams-base --region ams \
    --http-listen 127.0.0.15:8080 --https-listen 127.0.0.15:8443 --tunnel-listen 127.0.0.15:7443 \
    --tls-cert "$D/edge.pem" --tls-key "$D/edge.key" --peer-ca "$D/ca.pem" \
    --coordinator http://127.0.0.1:7700 --state-dir "$WORK/edge-base" >"$WORK/edge-base.log" 2>&1 &
  PIDS+=($!)
  BASE_PID=$!
  for _ in $(seq 1 100); do curl -sf -o /dev/null -H "Host: edge.meridian.test" http://127.0.0.15:8080/direct/bytes/16 && break; sleep 0.1; done
  curl -sf -o /dev/null -H "Host: edge.meridian.test" http://127.0.0.15:8080/direct/bytes/16 ||
    { echo "base edge did not come up; see $WORK/edge-base.log" >&2; exit 1; }
  PROXIES="$PROXIES meridian_base"
fi
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
NGINX_PID=$!
taskset -c "$PROXY_CPU" haproxy -f "$WORK/haproxy.cfg" -db &
PIDS+=($!)
HAPROXY_PID=$!
for url in http://127.0.0.31:8080/demo/bytes/16 http://127.0.0.32:8080/demo/bytes/16; do
  for _ in $(seq 1 100); do curl -sf -o /dev/null "$url" && break; sleep 0.1; done
  curl -sf -o /dev/null "$url" || { echo "peer at $url did not come up" >&2; exit 1; }
done

# ---------------------------------------------------------------- runs
declare -A ADDR=([meridian]=127.0.0.11 [meridian_tunnel]=127.0.0.11 [nginx]=127.0.0.31 [haproxy]=127.0.0.32 [meridian_base]=127.0.0.15)
declare -A PREFIX=([meridian]=/direct [meridian_tunnel]=/demo [nginx]=/demo [haproxy]=/demo [meridian_base]=/direct)
declare -A PID=([meridian]=$EDGE_PID [meridian_tunnel]=$EDGE_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID [meridian_base]=$BASE_PID)
TICK=$(getconf CLK_TCK)

cpu_ticks() { # pid → utime + stime of it and its children (nginx's workers), in clock ticks
  local total=0 p
  for p in "$1" $(pgrep -P "$1"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
RESULTS=$WORK/results.txt
: >"$RESULTS"

to_ms() { # wrk latency like 812.00us / 1.23ms / 2.01s → ms
  awk -v v="$1" 'BEGIN{ n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

run() { # proxy proto size
  local proxy=$1 proto=$2 size=$3 port=8080
  [[ $proto == https ]] && port=8443
  local url="$proto://${ADDR[$proxy]}:$port${PREFIX[$proxy]}/bytes/$size" script=()
  if [[ $size == post* ]]; then # a request body: N bytes to /upload (answers ~90 B of JSON)
    url="$proto://${ADDR[$proxy]}:$port${PREFIX[$proxy]}/upload"
    printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\n' "${size#post}" >"$WORK/$size.lua"
    script=(-s "$WORK/$size.lua")
  fi
  local out t0 t1
  t0=$(cpu_ticks "${PID[$proxy]}")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${script[@]}" \
    -H "Host: edge.meridian.test" "$url" 2>&1)
  t1=$(cpu_ticks "${PID[$proxy]}")
  local rps p99 errs reqs cpu
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v d=$((t1 - t0)) -v n="${reqs:-0}" -v hz="$TICK" 'BEGIN{ if (n+0 == 0) print 0; else printf "%.2f", d * 1e6 / hz / n }')
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "run proxy=$proxy proto=$proto size=$size rps=$rps p99_ms=$p99 cpu_us_per_req=$cpu $errs"
  echo "$proxy $proto $size $rps $p99 $cpu" >>"$RESULTS"
}

enabled() { [[ " $PROXIES " == *" $1 "* ]]; }

for round in $(seq 1 "$ROUNDS"); do
  for proto in $PROTOS; do
    for size in $SIZES; do
      # Rotate the order each round.
      case $((round % 3)) in
        1) order="meridian meridian_base haproxy nginx meridian_tunnel" ;;
        2) order="haproxy meridian_base nginx meridian_tunnel meridian" ;;
        0) order="nginx meridian meridian_tunnel haproxy meridian_base" ;;
      esac
      for proxy in $order; do
        if enabled "$proxy"; then run "$proxy" "$proto" "$size"; fi
      done
    done
  done
done

median() { sort -g | awk '{a[NR]=$1} END{ if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
med() { awk -v p="$1" -v pr="$2" -v s="$3" -v f="$4" '$1==p && $2==pr && $3==s {print $f}' "$RESULTS" | median; }

echo
echo "medians over $ROUNDS rounds (c=$CONNS, ${DURATION}s each):"
for proto in $PROTOS; do
  for size in $SIZES; do
    for proxy in meridian meridian_base meridian_tunnel haproxy nginx; do
      enabled "$proxy" || continue
      echo "median proxy=$proxy proto=$proto size=$size rps=$(med $proxy $proto $size 4) p99_ms=$(med $proxy $proto $size 5) cpu_us_per_req=$(med $proxy $proto $size 6)"
    done
  done
done

echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "nan"; else printf "%.2f", a/b }'; }
for proto in $PROTOS; do
  label=$proto
  [[ $proto == http ]] && label=http1
  for peer in haproxy nginx meridian_base; do
    enabled meridian && enabled "$peer" || continue
    for size in $SIZES; do
      sfx=""
      [[ $size == 65536 ]] && sfx="_64k"
      [[ $size == post* ]] && sfx="_$size"
      echo "ratio rps_${label}${sfx}_vs_${peer}=$(ratio "$(med meridian $proto $size 4)" "$(med $peer $proto $size 4)")"
      echo "ratio p99_${label}${sfx}_vs_${peer}=$(ratio "$(med meridian $proto $size 5)" "$(med $peer $proto $size 5)")"
      echo "ratio cpu_per_req_${label}${sfx}_vs_${peer}=$(ratio "$(med meridian $proto $size 6)" "$(med $peer $proto $size 6)")"
    done
  done
  enabled meridian_tunnel && enabled haproxy || continue
  for size in $SIZES; do
    sfx=""
    [[ $size == 65536 ]] && sfx="_64k"
    [[ $size == post* ]] && sfx="_$size"
    echo "extra rps_${label}${sfx}_tunnel_vs_haproxy=$(ratio "$(med meridian_tunnel $proto $size 4)" "$(med haproxy $proto $size 4)")"
  done
done
