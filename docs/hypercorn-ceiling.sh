#!/usr/bin/env bash
# The server's own cost per request, apart from any framework: a 12-line ASGI app answering the
# same 10.6 KB of bytes as a cached aggregate, behind Hypercorn (stock h11, then h11-mypyc) and
# behind uvicorn (httptools), one worker each on uvloop, wrk -t2 -c64, interleaved REPS times.
# Prints req/s and the server's CPU ms per request. Needs wrk and the bench extra.
#
#   bash docs/hypercorn-ceiling.sh [REPS] [DURATION_S]
set -euo pipefail
REPS=${1:-3}
DUR=${2:-5}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/raw.py" <<'PYEOF'
BODY = b'{"x":"' + b"a" * 10600 + b'"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
PYEOF
cat > "$WORK/mypyc.py" <<'PYEOF'
import sys

from hypercorn.__main__ import main

from aggregator.ops.http1 import use_parser

assert not use_parser("h11-mypyc").fell_back
sys.exit(main())
PYEOF
free_port() { "$PY" -c "from aggregator.demo.process import free_port; print(free_port())"; }
one() {  # name, then the command (the port is appended by the caller)
  local name=$1 port=$2; shift 2
  (cd "$WORK" && exec "$@") > "$WORK/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  wrk -t2 -c64 -d1s "http://127.0.0.1:$port/" > /dev/null
  local c0 c1 out
  c0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  out=$(wrk -t2 -c64 -d"${DUR}s" "http://127.0.0.1:$port/")
  c1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  local rps reqs
  rps=$(awk '/Requests\/sec/ {print $2}' <<< "$out")
  reqs=$(awk '/requests in/ {print $1}' <<< "$out")
  printf '%-16s %10s req/s  %s ms CPU/request\n' "$name" "$rps" \
    "$(awk -v a="$c0" -v b="$c1" -v n="$reqs" 'BEGIN {printf "%.3f", (b-a)*10/n}')"
  kill "$pid"; wait "$pid" 2> /dev/null || true
}
PYABS=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
for rep in $(seq "$REPS"); do
  p=$(free_port); one hypercorn "$p" "$PYABS" -m hypercorn -w 0 -k uvloop -b "127.0.0.1:$p" raw:app
  p=$(free_port); one hypercorn-mypyc "$p" "$PYABS" mypyc.py -w 0 -k uvloop -b "127.0.0.1:$p" raw:app
  p=$(free_port); one uvicorn "$p" "$PYABS" -m uvicorn --no-access-log --loop uvloop --http httptools --port "$p" raw:app
done
