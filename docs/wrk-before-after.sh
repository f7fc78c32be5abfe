#!/usr/bin/env bash
# Two trees of this project served side by side, as shipped (`aggregator serve`: hypercorn.toml,
# one worker, INFO access log, the bundled demo config) against one demo, measured with wrk on
# loopback at c=64, interleaved (3 rounds, the order swapped each round): fresh cache hits,
# /api/dashboard misses (a new user_id per request: Flask and the fan-out) and /healthz (Flask,
# one small buffered answer). Prints one line per run; every run is bounded by DUR.
#
#   git worktree add /tmp/before <commit>
#   DUR=6s bash docs/wrk-before-after.sh /tmp/before .
set -euo pipefail
BEFORE=$(realpath "$1")
AFTER=$(realpath "${2:-.}")
DUR=${DUR:-6s}
PY=${PY:-$AFTER/.venv/bin/python}  # run from each tree's directory: it imports that tree's code
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
lua=$(mktemp --suffix=.lua)
cat >"$lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/dashboard?city=Paris&user_id=" .. (100000 + n * 7 + math.random(0, 6)))
end
LUA
$PY -m aggregator demo --port 18201 >/tmp/wrk-ba-demo.log 2>&1 & pids+=($!)
sleep 2
export AGGREGATOR_DEMO_URL=http://127.0.0.1:18201
(cd "$BEFORE" && exec $PY -m aggregator serve --bind 127.0.0.1:18301 >/tmp/wrk-ba-before.log 2>&1) & pids+=($!)
(cd "$AFTER" && exec $PY -m aggregator serve --bind 127.0.0.1:18302 >/tmp/wrk-ba-after.log 2>&1) & pids+=($!)
for p in 18301 18302; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/healthz" >/dev/null && break; sleep 0.2; done
done
declare -A NAME=([18301]=before [18302]=after)
HIT='/api/dashboard?city=Paris&user_id=7'
for p in 18301 18302; do  # warm-up
    wrk -t2 -c16 -d2s "http://127.0.0.1:$p$HIT" >/dev/null
    wrk -t2 -c16 -d2s -s "$lua" "http://127.0.0.1:$p" >/dev/null
done
for round in 1 2 3; do
    order="18301 18302"; [ $((round % 2)) = 0 ] && order="18302 18301"
    for kind in hit miss healthz; do
        for p in $order; do
            curl -sf "http://127.0.0.1:$p$HIT" >/dev/null  # the hit fresh again (cache_ttl 5 s)
            case $kind in
                hit) out=$(wrk -t2 -c64 -d"$DUR" "http://127.0.0.1:$p$HIT") ;;
                miss) out=$(wrk -t2 -c64 -d"$DUR" -s "$lua" "http://127.0.0.1:$p") ;;
                healthz) out=$(wrk -t2 -c64 -d"$DUR" "http://127.0.0.1:$p/healthz") ;;
            esac
            rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
            non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
            echo "round=$round kind=$kind server=${NAME[$p]} rps=$rps non2xx=${non2xx:-0}"
        done
    done
done
