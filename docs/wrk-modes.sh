#!/usr/bin/env bash
# Serving configurations compared with wrk on loopback, interleaved (rep 1: every config and
# concurrency, then rep 2, ... with the order rotated each rep) so machine drift hits all alike. One Hypercorn worker each.
# Every run is bounded by DURATION. Until `aggregator bench` exists (issue 5), the README's
# numbers come from here.
#
#   bash docs/wrk-modes.sh [REPS] [DURATION]                 # bundled demo, /api/dashboard
#   CONFIGS="loop:aiohttp loop:httpx" CONCURRENCY="64 256" WORKLOAD=k5x100 bash docs/wrk-modes.sh
#
# CONFIGS: MODE:ENGINE[:CACHE] (default "loop:aiohttp threads:aiohttp"; CACHE is a cache_type,
# default simple); CONCURRENCY: wrk -c levels (default "16 64"); WORKLOAD: "demo" (the bundled
# dashboard: 5 sources, slowest 0.25 s), "k5x100" (5 sources of 100 ms each, DESIGN §1's
# workload, uncached) or "hits" (the k5x100 aggregate cached for an hour: after the warm-up
# every request is a cache hit). Needs wrk; CACHE=redis needs Redis on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
DUR=${2:-10s}
CONFIGS=${CONFIGS:-"loop:aiohttp threads:aiohttp"}
CONCURRENCY=${CONCURRENCY:-"16 64"}
WORKLOAD=${WORKLOAD:-demo}
PY=.venv/bin/python
DEMO_PORT=18101
DEMO=http://127.0.0.1:$DEMO_PORT
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
}
trap cleanup EXIT

$PY -m aggregator.demo --port $DEMO_PORT --latency 0.1 >/tmp/wrk-demo.log 2>&1 & pids+=($!)
if [ "$WORKLOAD" = k5x100 ] || [ "$WORKLOAD" = hits ]; then
    cfg=$(mktemp --suffix=.toml)
    for s in weather:/weather/{city} stocks:/stocks/{user_id} news:/news profile:/profile/{user_id} \
             recommendations:/recommendations/{user_id}; do
        printf '[upstreams.%s]\nurl = "%s%s"\ntimeout = 5\n\n' "${s%%:*}" "$DEMO" "${s#*:}" >>"$cfg"
    done
    printf '[aggregates.k5]\npath = "/api/dashboard"\nsources = ["weather", "stocks", "news", "profile", "recommendations"]\ndeadline = 10\nparams = { city = "str", user_id = "int" }\n' >>"$cfg"
    [ "$WORKLOAD" = hits ] && printf 'cache_ttl = 3600\n' >>"$cfg"
    export AGGREGATOR_CONFIG=$cfg
fi
declare -A PORT
port=18001
for cfgname in $CONFIGS; do
    PORT[$cfgname]=$port
    IFS=: read -r mode engine cache <<<"$cfgname"
    AGGREGATOR_MODE=$mode AGGREGATOR_ENGINE=$engine AGGREGATOR_CACHE_TYPE=${cache:-simple} \
        AGGREGATOR_CACHE_DIR=$(mktemp -d) AGGREGATOR_CACHE_KEY_PREFIX="wrk-$$-$port:" \
        AGGREGATOR_DEMO_URL=$DEMO \
        $PY -m hypercorn --bind 127.0.0.1:$port --workers 1 asgi:app \
        >"/tmp/wrk-${cfgname//:/-}.log" 2>&1 & pids+=($!)
    port=$((port + 1))
done
for p in $DEMO_PORT "${PORT[@]}"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/healthz" >/dev/null && break; sleep 0.1; done
done
Q='/api/dashboard?city=Paris&user_id=7'
for cfgname in $CONFIGS; do wrk -t2 -c16 -d2s "http://127.0.0.1:${PORT[$cfgname]}$Q" >/dev/null; done
read -ra ALL <<<"$CONFIGS"
for rep in $(seq "$REPS"); do
    # Rotate the order each repetition (A B C, B C A, ...) so no config always runs last.
    shift_by=$(( (rep - 1) % ${#ALL[@]} ))
    for cfgname in "${ALL[@]:$shift_by}" "${ALL[@]:0:$shift_by}"; do
        for c in $CONCURRENCY; do
            out=$(wrk -t2 -c"$c" -d"$DUR" --timeout 10s --latency "http://127.0.0.1:${PORT[$cfgname]}$Q")
            rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
            p50=$(awk '$1=="50%" {print $2}' <<<"$out")
            p99=$(awk '$1=="99%" {print $2}' <<<"$out")
            errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr -s ' ' | paste -sd';' || true)
            echo "rep=$rep config=$cfgname c=$c rps=$rps p50=$p50 p99=$p99 ${errs:-errors=0}"
        done
    done
done
