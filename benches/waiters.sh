#!/usr/bin/env bash
# What parked `wait_timeout` waiters cost idemd: its RSS before and while N
# Begins wait on one held key (`idemd bench --mode park`), on SQLite.
#
#   benches/waiters.sh [N]      N defaults to 10000
#   IDEMD_FLAGS="..." benches/waiters.sh   extra flags for idemd serve
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-10000}
cargo build --release --quiet
idemd=target/release/idemd
dir=$(mktemp -d)
server=""
cleanup() { [ -z "$server" ] || kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics=$(free_port)

# shellcheck disable=SC2086
"$idemd" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" \
  --database-url "${DATABASE_URL:-sqlite://$dir/waiters.db}" \
  --max-waiters $((n * 2)) --max-waiters-per-namespace $((n * 2)) ${IDEMD_FLAGS:-} 2>"$dir/serve.log" &
server=$!
waiters() { curl -fsS "http://127.0.0.1:$metrics/metrics" 2>/dev/null | awk '/^idemd_waiters[ {]/ {print int($NF)}' | head -n 1; }
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$metrics/metrics" >/dev/null 2>&1 && break; sleep 0.1; done
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }
sleep 1
before=$(rss_kb)
echo "idemd idle: RSS ${before} kB"

"$idemd" bench --addr "http://127.0.0.1:$port" --mode park --concurrency "$n" \
  --channels $((n / 200 + 1)) --duration 40s --json >"$dir/bench.json" &
bench=$!
parked=0
for _ in $(seq 1 300); do
  parked=$(waiters); parked=${parked:-0}
  [ "$parked" -ge "$n" ] && break
  sleep 0.1
done
sleep 2
parked=$(waiters)
after=$(rss_kb)
echo "waiters parked: $parked; RSS ${after} kB"
echo "waiters: $parked parked, RSS $((before / 1024)) MiB idle -> $((after / 1024)) MiB, $(( (after - before) * 1024 / (parked > 0 ? parked : 1) )) bytes each"
[ -z "${TRIM:-}" ] || { gdb -p "$server" -batch -ex "call (int)malloc_trim(0)" >/dev/null 2>&1; echo "after malloc_trim: RSS $(( $(rss_kb) / 1024 )) MiB"; }
kill "$bench" 2>/dev/null || true
