#!/usr/bin/env bash
# Produce every table of BENCHMARKS.md. Run it from the repository root on a
# quiet machine, with bgapi installed (pip install -e '.[compare,plot,apscheduler]').
# Results (JSON, PNG, text) go to benchmarks/results/ (or $OUT). With the
# defaults (DURATION=20 s windows, REPEAT=3) it takes about 75 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
D=${DURATION:-20}
R=${REPEAT:-3}
mkdir -p "$OUT"
ALL=thread,asyncio,apscheduler,fixed-delay,bare-thread,bare-asyncio

run() {
    local name=$1
    shift
    echo "== $name: bgapi compare $*" | tee "$OUT/$name.txt"
    python -m bgapi compare "$@" --json "$OUT/$name.json" --plot "$OUT/$name.png" | tee -a "$OUT/$name.txt"
}

# 1. Idle: 50 targets at 1 s, no API load.
run idle --modes "$ALL" --targets 50 --interval 1 --duration "$D" --repeat "$R"
# 2. Drift: one target at 10 ms for 1,000 runs (no accumulated drift, p99 at idle).
run drift --modes "$ALL" --targets 1 --interval 0.01 --duration 10 --repeat "$R"
# 3. Loaded, moderate: 50 targets at 1 s, 50 API clients sharing 1,000 requests/s.
run moderate --modes "$ALL" --targets 50 --interval 1 --duration "$D" --load 50 --rate 1000 --repeat "$R"
# 4. Loaded, saturated: 50 targets at 1 s, 100 API clients as fast as they go.
run saturated --modes "$ALL" --targets 50 --interval 1 --duration "$D" --load 100 --repeat "$R"
# 5. Blocking: the same moderate load, and a 5 ms blocking call in every poll.
run blocking --modes thread,asyncio,apscheduler,fixed-delay --targets 50 --interval 1 --duration "$D" \
    --load 50 --rate 1000 --blocking-ms 5 --repeat "$R"
# 6. Memory and shutdown with 10,000 targets (1,000 polls/s at a 10 s interval).
run memory --modes thread,asyncio,apscheduler --targets 10000 --interval 10 --duration "$D" --repeat "$R"
# 7. Transports: the old httpx transport against the default (aiohttp) at 300 polls every 0.1 s.
run transport-httpx --modes thread,asyncio --targets 300 --interval 0.1 --duration "$D" --repeat "$R" --http-client httpx
run transport-aiohttp --modes thread,asyncio --targets 300 --interval 0.1 --duration "$D" --repeat "$R" --http-client aiohttp
# 8. Scale: the most targets at 1 s with p99 lateness under 50 ms, per mode.
python benchmarks/scale.py --modes thread,asyncio,apscheduler --duration "$D" --out "$OUT/scale" | tee "$OUT/scale.txt"
# 9. HTTP clients alone, one core, against the built-in upstream.
python benchmarks/http_clients.py --seconds 3 | tee "$OUT/http_clients.txt"
# 10. Start-up of the CLI.
for i in 1 2 3 4 5; do /usr/bin/time -f "bgapi --help: %e s" bgapi --help > /dev/null; done 2>&1 | tee "$OUT/help.txt"
# 11. The process mode beside the thread mode, ten repetitions of 10 s: half of the capacity, then saturated.
run half-grouped --modes thread,process --targets 50 --interval 1 --duration 10 --load 50 --rate 50% --repeat 10
run saturated-grouped-a --modes thread,process --targets 50 --interval 1 --duration 10 --load 100 --repeat 10
# 12. CPU per poll of the process mode's child, with and without its fewer wake-ups.
python benchmarks/wakeups.py | tee "$OUT/wakeups.txt"
# 13. The Markdown tables of every comparison, for BENCHMARKS.md.
python benchmarks/tables.py "$OUT"/*.json > "$OUT/tables.md"
