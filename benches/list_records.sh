#!/usr/bin/env bash
# How fast Admin.ListRecords answers one page over a large namespace: seeds
# N records (default 1,000,000: 97 % completed, 2 % aborted with an unknown
# outcome, 1 % in progress, updated over the last 24 h) in a throwaway
# PostgreSQL, prints the plans Postgres chooses (EXPLAIN ANALYZE) for the
# first page, the on-call filter and a page deep in the listing, then times
# the call itself through idemd (its request-duration histogram) and through
# `idemd admin list` (wall clock, process start included).
#
#   benches/list_records.sh [N]         IDEMD=path/to/idemd (default target/release/idemd)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
idemd=${IDEMD:-target/release/idemd}
[ -x "$idemd" ] || cargo build --release --quiet --bin idemd
calls=${CALLS:-20}
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
start_bench_cluster
psql_() { as_pg "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d idemd -v ON_ERROR_STOP=1 -qAt "$@"; }

"$idemd" migrate --database-url "$url" 2>/dev/null
log "seeding $n records"
psql_ -c "
INSERT INTO idemd_records (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, retention_us,
    created_at, updated_at, lease_expires_at, expires_at, completed_at, response, response_code, content_type,
    abort_reason, aborted_by, outcome_unknown)
SELECT 'payments', 'order-' || i,
       CASE WHEN i % 100 < 97 THEN 2 WHEN i % 100 < 99 THEN 3 ELSE 1 END, 1, '', 'idk_' || md5(i::text),
       'lt_' || i, 86400000000, t, t, t + interval '60 seconds', t + interval '2 days',
       CASE WHEN i % 100 < 97 THEN t END, CASE WHEN i % 100 < 97 THEN 'ok'::bytea END,
       CASE WHEN i % 100 < 97 THEN 201 END, 'application/json',
       CASE WHEN i % 100 IN (97, 98) THEN 'provider timeout' END,
       CASE WHEN i % 100 IN (97, 98) THEN 1 END, i % 100 IN (97, 98)
FROM (SELECT i, now() - (random() * interval '24 hours') AS t FROM generate_series(1, $n) AS i) AS s;"
psql_ -c "VACUUM ANALYZE idemd_records;"

plan() { log "$1"; psql_ -c "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) $2"; }
columns="namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at, lease_expires_at,
  completed_at, expires_at, NULL::bytea AS response, response_code, content_type, abort_reason, aborted_by,
  outcome_unknown"
plan "first page, any state" "SELECT $columns FROM idemd_records WHERE namespace = 'payments' AND expires_at > now()
  ORDER BY updated_at DESC, key LIMIT 101"
plan "on call: aborted, outcome unknown, last hour" "SELECT $columns FROM idemd_records
  WHERE namespace = 'payments' AND expires_at > now() AND state = 3 AND state = 3 AND outcome_unknown
    AND updated_at >= now() - interval '1 hour' ORDER BY updated_at DESC, key LIMIT 101"
cursor=$(psql_ -c "SELECT updated_at FROM idemd_records WHERE namespace = 'payments'
  ORDER BY updated_at DESC, key OFFSET 500000 LIMIT 1")
plan "a page half-way through (cursor)" "SELECT $columns FROM idemd_records
  WHERE namespace = 'payments' AND expires_at > now() AND updated_at <= '$cursor'
    AND (updated_at < '$cursor' OR key > '') ORDER BY updated_at DESC, key LIMIT 101"

grpc_port=$(free_port)
metrics_port=$(free_port)
"$idemd" serve --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$metrics_port" --database-url "$url" \
  2>"$root/idemd.log" &
server=$!
for _ in $(seq 1 100); do grep -q "idemd listening" "$root/idemd.log" && break; sleep 0.1; done
addr="http://127.0.0.1:$grpc_port"
# The sum and count of idemd's ListRecords latencies so far.
histogram() {
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk '
    /^idemd_request_duration_seconds_sum/ && /rpc="ListRecords"/ { sum = $NF }
    /^idemd_request_duration_seconds_count/ && /rpc="ListRecords"/ { count = $NF }
    END { print sum + 0, count + 0 }'
}
# Runs `idemd admin list ... --limit 100` CALLS times; prints idemd's mean
# answer time for those calls and the command's wall clock.
measure() {
  local before after start end
  before=$(histogram)
  start=$(date +%s%N)
  for _ in $(seq 1 "$calls"); do "$idemd" admin list --addr "$addr" "$@" --limit 100 >/dev/null 2>&1; done
  end=$(date +%s%N)
  after=$(histogram)
  python3 -c "
b, a = '$before'.split(), '$after'.split()
calls = float(a[1]) - float(b[1])
print(f'idemd answers in {1000 * (float(a[0]) - float(b[0])) / calls:.1f} ms on average over {calls:.0f} calls'
      f' (idemd admin list: {($end - $start) / $calls / 1e6:.0f} ms a command, process start included)')"
}
log "first page of $n records: $(measure --namespace payments)"
log "on-call page (aborted, outcome unknown, last hour): $(measure --namespace payments --state aborted --outcome-unknown --since 1h)"
kill -TERM "$server"
wait "$server" || true
