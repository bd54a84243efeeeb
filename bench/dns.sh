#!/usr/bin/env bash
# GeoDNS throughput: Meridian's GeoDNS vs gdnsd (geoip plugin, same database, same regions and
# map) vs Knot (a static zone, no geo), each server pinned to the same core with taskset and
# dnsperf pinned to another; rounds alternate between servers, and the median per server is
# reported with the ratios:
#
#   ratio qps_vs_gdnsd=…   ratio qps_vs_knot=…
#
# Loopback only. Installs nothing: it says what to apt-get. Knobs (environment):
#   ROUNDS=3 SECS=5 SERVER_CORE=1 CLIENT_CORE=0 CLIENTS=4 OUTSTANDING=200
#   ECS=1 (send EDNS Client Subnet 198.51.100.0/24 so both geo servers look the client up)
#   BASE_EX=DIR  also run DIR/serve_snapshot (another build's examples dir) as `meridian_base` in the
#                same alternating rounds, and print ratio …_vs_meridian_base: an A/B of a change
#                that the machine's noise does not swamp
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
SERVER_CORE=${SERVER_CORE:-1}
CLIENT_CORE=${CLIENT_CORE:-0}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-200}
ECS=${ECS:-1}
P_MER=${P_MER:-25353}
P_GD=${P_GD:-25354}
P_KN=${P_KN:-25355}
P_BASE=${P_BASE:-25356}
BASE_EX=${BASE_EX:-}
SERVERS=(meridian gdnsd knot)
[[ -n $BASE_EX ]] && SERVERS=(meridian meridian_base gdnsd knot)

missing=()
for pair in dnsperf:dnsperf gdnsd:gdnsd knotd:knot taskset:util-linux cargo:cargo; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    echo "bench/dns.sh needs: apt-get install ${missing[*]}" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building geodns (release)…" >&2
(cd "$ROOT" && cargo build --release -q -p geodns --examples)
EX=$CARGO_TARGET_DIR/release/examples

WORK=$(mktemp -d /tmp/meridian-dns-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- shared inputs: database, regions, zone -----------------------------------------------------
"$EX/write_test_mmdb" "$WORK/geo.mmdb" >/dev/null

cat >"$WORK/snapshot.json" <<'EOF'
{"revision":1,"observed_version":1,
 "regions":[{"name":"ams","latitude":52.37,"longitude":4.90},
            {"name":"iad","latitude":38.95,"longitude":-77.45},
            {"name":"sin","latitude":1.35,"longitude":103.99}],
 "services":[],"mounts":[],"agent_tokens":[],
 "edges":[
  {"info":{"id":"ams-1","region":"ams","public_ips":["127.0.0.11"],"http_addr":null,"https_addr":null,"tunnel_addr":null},"alive":true,"last_seen_ms":0,"agents":[]},
  {"info":{"id":"iad-1","region":"iad","public_ips":["127.0.0.12"],"http_addr":null,"https_addr":null,"tunnel_addr":null},"alive":true,"last_seen_ms":0,"agents":[]},
  {"info":{"id":"sin-1","region":"sin","public_ips":["127.0.0.13"],"http_addr":null,"https_addr":null,"tunnel_addr":null},"alive":true,"last_seen_ms":0,"agents":[]}]}
EOF

# gdnsd: the same map (DE → iad,ams; NA → iad), nearest-by-coordinates otherwise.
mkdir -p "$WORK/gdnsd/zones" "$WORK/gdnsd/geoip" "$WORK/gdnsd/run"
cp "$WORK/geo.mmdb" "$WORK/gdnsd/geoip/geo.mmdb"
cat >"$WORK/gdnsd/config" <<EOF
options => {
  listen => [ 127.0.0.1:$P_GD ]
  udp_threads => 1
  tcp_threads => 1
}
plugins => {
  geoip => {
    maps => {
      m => {
        geoip2_db => geo.mmdb
        datacenters => [ams, iad, sin]
        map => { EU => { DE => [iad, ams] }, NA => [iad] }
        auto_dc_coords => { ams => [52.37, 4.90], iad => [38.95, -77.45], sin => [1.35, 103.99] }
      }
    }
    resources => {
      edge => { map => m, dcmap => { ams => 127.0.0.11, iad => 127.0.0.12, sin => 127.0.0.13 } }
    }
  }
}
EOF
cat >"$WORK/gdnsd/zones/meridian.test" <<'EOF'
$TTL 30
@     SOA ns1 hostmaster 1 3600 600 86400 30
@     NS  ns1
ns1   A   127.0.0.1
edge  30  DYNA geoip!edge
EOF

mkdir -p "$WORK/knot"
cat >"$WORK/knot/meridian.test.zone" <<'EOF'
$ORIGIN meridian.test.
$TTL 30
@     SOA ns1 hostmaster 1 3600 600 86400 30
@     NS  ns1
ns1   A   127.0.0.1
edge  A   127.0.0.12
EOF
cat >"$WORK/knot/knot.conf" <<EOF
server:
    rundir: "$WORK/knot"
    listen: 127.0.0.1@$P_KN
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot"
zone:
  - domain: meridian.test
    file: "$WORK/knot/meridian.test.zone"
EOF

echo "edge.meridian.test A" >"$WORK/queries"
# ECS option 8: family 1, source /24, scope 0, 198.51.100 (NA → iad on every server).
ECS_ARGS=()
[[ $ECS == 1 ]] && ECS_ARGS=(-e -E 8:00011800c63364)

# --- servers --------------------------------------------------------------------------------------
start_server() { # name
    case $1 in
    meridian | meridian_base)
        local ex=$EX
        [[ $1 == meridian_base ]] && ex=$BASE_EX
        taskset -c "$SERVER_CORE" "$ex/serve_snapshot" --snapshot "$WORK/snapshot.json" \
            --listen "127.0.0.1:$(port_of "$1")" --geoip-db "$WORK/geo.mmdb" \
            --map country:DE=iad,ams --map continent:NA=iad --default-region ams \
            >"$WORK/$1.log" 2>&1 &
        ;;
    gdnsd)
        RUNTIME_DIRECTORY="$WORK/gdnsd/run" STATE_DIRECTORY="$WORK/gdnsd/run" \
            taskset -c "$SERVER_CORE" gdnsd -c "$WORK/gdnsd" start >"$WORK/gdnsd.log" 2>&1 &
        ;;
    knot)
        taskset -c "$SERVER_CORE" knotd -c "$WORK/knot/knot.conf" -s "$WORK/knot/knot.sock" \
            >"$WORK/knot.log" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
}

port_of() { case $1 in meridian) echo "$P_MER" ;; meridian_base) echo "$P_BASE" ;; gdnsd) echo "$P_GD" ;; knot) echo "$P_KN" ;; esac; }

wait_ready() { # name: poll with dig-free dnsperf one-shots until an answer comes back (10 s)
    local port
    port=$(port_of "$1")
    for _ in $(seq 100); do
        if dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" -n 1 -t 1 "${ECS_ARGS[@]}" 2>/dev/null |
            grep -q "Queries completed: *1 "; then
            return 0
        fi
        sleep 0.1
    done
    echo "$1 did not come up; log:" >&2
    cat "$WORK/$1.log" >&2 || true
    return 1
}

run_one() { # name → qps on stdout
    local port out
    port=$(port_of "$1")
    start_server "$1"
    wait_ready "$1"
    if command -v dig >/dev/null 2>&1; then # same answer from every server, or the race is moot
        echo "  $1 answers $(dig +short -p "$port" @127.0.0.1 edge.meridian.test A +subnet=198.51.100.0/24 | xargs)" >&2
    fi
    local t0 t1
    t0=$(cpu_ticks "$SERVER_PID")
    out=$(taskset -c "$CLIENT_CORE" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" -l "$SECS" \
        -c "$CLIENTS" -q "$OUTSTANDING" "${ECS_ARGS[@]}" 2>&1)
    t1=$(cpu_ticks "$SERVER_PID")
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    grep -q "Queries lost: *0 " <<<"$out" || echo "  ($1: $(grep 'Queries lost' <<<"$out" | xargs))" >&2
    # qps, and the server's CPU time per answered query in µs: the second number does not depend
    # on whether the (shared, noisy) client core kept the server busy.
    awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" '
        /Queries completed:/ {n = $3}
        /Queries per second:/ {q = $4}
        END {printf "%s %.3f\n", q, (n > 0 ? t * 1e6 / hz / n : 0)}' <<<"$out"
}

cpu_ticks() { # pid → utime + stime of the whole process, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# Every server must answer iad (127.0.0.12) for 198.51.100.0/24; each run prints its answer.
declare -A QPS CPU
for r in $(seq "$ROUNDS"); do
    for s in "${SERVERS[@]}"; do
        read -r q c < <(run_one "$s")
        echo "round $r $s qps=$q cpu_us_per_query=$c" >&2
        QPS[$s]+="$q "
        CPU[$s]+="$c "
    done
done

med() { tr ' ' '\n' <<<"$1" | grep . | median; }
m=$(med "${QPS[meridian]}") g=$(med "${QPS[gdnsd]}") k=$(med "${QPS[knot]}")
mc=$(med "${CPU[meridian]}") gc=$(med "${CPU[gdnsd]}") kc=$(med "${CPU[knot]}")
echo "median qps meridian=$m gdnsd=$g knot=$k (rounds=$ROUNDS secs=$SECS core=$SERVER_CORE ecs=$ECS)"
echo "median cpu_us_per_query meridian=$mc gdnsd=$gc knot=$kc"
echo "ratio qps_vs_gdnsd=$(awk -v a="$m" -v b="$g" 'BEGIN {printf "%.2f", a/b}')"
echo "ratio qps_vs_knot=$(awk -v a="$m" -v b="$k" 'BEGIN {printf "%.2f", a/b}')"
# Meridian's CPU per query over the peer's: below 1 is better.
echo "ratio cpu_per_query_vs_gdnsd=$(awk -v a="$mc" -v b="$gc" 'BEGIN {printf "%.2f", a/b}')"
echo "ratio cpu_per_query_vs_knot=$(awk -v a="$mc" -v b="$kc" 'BEGIN {printf "%.2f", a/b}')"
if [[ -n $BASE_EX ]]; then
    b=$(med "${QPS[meridian_base]}") bc=$(med "${CPU[meridian_base]}")
    echo "median meridian_base qps=$b cpu_us_per_query=$bc"
    echo "ratio qps_vs_meridian_base=$(awk -v a="$m" -v b="$b" 'BEGIN {printf "%.2f", a/b}')"
    echo "ratio cpu_per_query_vs_meridian_base=$(awk -v a="$mc" -v b="$bc" 'BEGIN {printf "%.2f", a/b}')"
fi
