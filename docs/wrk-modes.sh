#!/usr/bin/env bash
# Loop vs threads mode on /api/dashboard (bundled demo: 5 sources, slowest 0.25 s), with wrk.
# Interleaved (rep 1: loop c16, loop c64, threads c16, threads c64; rep 2: ...) so machine drift
# hits both modes alike. Loopback only; every run is bounded by -d. Until `aggregator bench`
# exists (issue 5), this is how the README's numbers were made.
#   usage: bash docs/wrk-modes.sh [REPS] [DURATION]   (needs wrk: apt-get install -y wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
DUR=${2:-10s}
PY=.venv/bin/python
DEMO_PORT=18101
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

$PY -m aggregator.demo --port $DEMO_PORT >/tmp/wrk-demo.log 2>&1 & pids+=($!)
declare -A PORT=([loop]=18001 [threads]=18002)
for mode in loop threads; do
    AGGREGATOR_MODE=$mode AGGREGATOR_DEMO_URL=http://127.0.0.1:$DEMO_PORT \
        $PY -m hypercorn --bind 127.0.0.1:${PORT[$mode]} --workers 1 asgi:app \
        >/tmp/wrk-$mode.log 2>&1 & pids+=($!)
done
for port in $DEMO_PORT ${PORT[loop]} ${PORT[threads]}; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
done
Q='/api/dashboard?city=Paris&user_id=7'
for mode in loop threads; do wrk -t2 -c16 -d2s "http://127.0.0.1:${PORT[$mode]}$Q" >/dev/null; done  # warm-up
for rep in $(seq "$REPS"); do
    for mode in loop threads; do
        for c in 16 64; do
            out=$(wrk -t2 -c$c -d"$DUR" --timeout 10s --latency "http://127.0.0.1:${PORT[$mode]}$Q")
            rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
            p50=$(awk '$1=="50%" {print $2}' <<<"$out")
            p99=$(awk '$1=="99%" {print $2}' <<<"$out")
            errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr -s ' ' | paste -sd';' || true)
            echo "rep=$rep mode=$mode c=$c rps=$rps p50=$p50 p99=$p99 ${errs:-errors=0}"
        done
    done
done
