#!/usr/bin/env bash
# Two idemd builds, alternating on one throwaway PostgreSQL server (default
# durability), at one concurrency: what a change does to throughput, with the
# noise of this shared machine visible in the spread of each side's rounds.
# Each build has its own database on that server (its own migrations: a
# build does not start on a schema newer than its own); each round starts
# the build, runs `idemd bench` (pairs, with the load generator of the NEW
# build) and stops it.
#
#   benches/ab.sh OLD_IDEMD NEW_IDEMD        # 64 clients, 10 s, 3 rounds each
#   CONCURRENCY=256 SECONDS_PER_RUN=8 ROUNDS=4 REST=20 benches/ab.sh old new
#
# REST (seconds, default 20) idles the machine between runs: this machine's
# disk slows down after a while of thousands of fsyncs a second (see
# docs/performance.md) and recovers when left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: benches/ab.sh OLD_IDEMD NEW_IDEMD}
new=${2:?usage: benches/ab.sh OLD_IDEMD NEW_IDEMD}
concurrency=${CONCURRENCY:-64}
seconds=${SECONDS_PER_RUN:-10}
rounds=${ROUNDS:-3}
rest=${REST:-20}
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
start_bench_cluster
as_pg "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres idemd_old
old_url="postgres://postgres@127.0.0.1:$port/idemd_old"

run() {
  local binary=$1 database=$2 grpc_port server
  grpc_port=$(free_port)
  "$binary" serve --listen "127.0.0.1:$grpc_port" --metrics-listen 127.0.0.1:0 --database-url "$database" \
    --db-max-connections 64 2>"$root/idemd.log" &
  server=$!
  for _ in $(seq 1 100); do grep -q "idemd listening" "$root/idemd.log" && break; sleep 0.1; done
  "$new" bench --addr "http://127.0.0.1:$grpc_port" --concurrency "$concurrency" --duration "${seconds}s" --json \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["pairs_per_second"]))'
  kill -TERM "$server"
  wait "$server" || true
  sleep "$rest"
}

old_runs=() new_runs=()
for round in $(seq 1 "$rounds"); do
  old_runs+=("$(run "$old" "$old_url")")
  new_runs+=("$(run "$new" "$url")")
  log "round $round: old ${old_runs[-1]}, new ${new_runs[-1]} pairs/s at $concurrency clients"
done
echo "old: ${old_runs[*]} pairs/s"
echo "new: ${new_runs[*]} pairs/s"
