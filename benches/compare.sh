#!/usr/bin/env bash
# idemd against raw Postgres on this machine (run by hand, not in CI).
#
# Starts a throwaway PostgreSQL (default durability: fsync and
# synchronous_commit on) and idemd (release build, its defaults unless
# IDEMD_FLAGS says otherwise) on it. At each concurrency it alternates three
# sides, each a Begin+Complete pair per idempotency key:
#   hand   pgbench, the minimal hand-written pair: INSERT ... ON CONFLICT DO
#          NOTHING, then UPDATE ... SET state = 2, response = ..., two
#          transactions, on a table shaped like idemd's (hand_records);
#   sql    pgbench running idemd's own one-key statements (Begin with its
#          history event, Complete with its event), two transactions;
#   idemd  `idemd bench` against the server;
#   old    with OLD_IDEMD=path, the same against that build of idemd, on the
#          same database, alternating with the others: what a change does.
# For each it prints the medians (and ranges) of pairs/s and p99 and, per
# pair, the CPU of every Postgres process, idemd's CPU, commits
# (pg_stat_database), WAL syncs and WAL bytes (pg_stat_wal), all measured in
# the same run (benches/lib/usage.py), and the load generator's CPU. Then
# idemd and pgbench paced to half of idemd's peak, at the peak's concurrency
# and at 64 clients, for the latency
# of a pair at that load (p50 and p99, the same measure for both). A last
# row runs idemd on SQLite.
#
#   benches/compare.sh                 # 20 s per run, 3 rounds, c = 1 16 64 256
#   SIDES="hand idemd" LEVELS="64" benches/compare.sh
#   SECONDS_PER_RUN=10 ROUNDS=2 LEVELS="1 16 64" benches/compare.sh
#   IDEMD_FLAGS="--group-commit-max-batch 1" benches/compare.sh    # group commit off
#   OLD_IDEMD=/tmp/idemd-before SIDES="hand idemd old" LEVELS=64 benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SECONDS_PER_RUN:-20}
rounds=${ROUNDS:-3}
levels=${LEVELS:-"1 16 64 256"}
old_idemd=${OLD_IDEMD:-}
sides=${SIDES:-"hand sql idemd${old_idemd:+ old}"}
# How long to wait after a run for every backend's statistics to reach pg_stat.
stats_wait=${STATS_WAIT:-11}

# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh

log "building idemd (release)"
cargo build --release --locked --quiet --bin idemd
idemd=target/release/idemd

start_bench_cluster

# Starts a build of idemd on the database; sets server (its pid) and grpc_port.
start_idemd() {
  grpc_port=$(free_port)
  # shellcheck disable=SC2086 # IDEMD_FLAGS is a list of flags
  "$1" serve --listen "127.0.0.1:$grpc_port" --metrics-listen 127.0.0.1:0 --database-url "$url" \
    ${IDEMD_FLAGS:-} 2>"$root/$2.log" &
  server=$!
  for _ in $(seq 1 100); do grep -q "idemd listening" "$root/$2.log" && break; sleep 0.1; done
}
if [ -n "$old_idemd" ]; then
  start_idemd "$old_idemd" idemd-old
  old_server=$server old_port=$grpc_port
fi
start_idemd "$idemd" idemd

# idemd's one-key Begin (acquire, with its ACQUIRED event) and Complete
# (with its COMPLETED event), as src/store/postgres/statements.rs has them,
# for a key nobody holds: the statements, not the server, per pair.
cat >"$root/sql.sql" <<'SQL'
\set n random(1, 2000000000)
WITH principals AS (SELECT 'pgbench'::text AS namespace, (:client_id || '-' || :n)::text AS key, ''::text AS principal),
acquired AS (
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at, history_seq)
VALUES ('pgbench', :client_id || '-' || :n, 1, 1, '\x6265'::bytea, 'idk_' || md5(:n::text), 'lt_' || md5(:client_id || '-' || :n), NULL,
        86400000000, now(), now(), now() + 60000000::bigint * interval '1 microsecond',
        now() + greatest(60000000::bigint, 86400000000::bigint) * interval '1 microsecond', 1)
ON CONFLICT (namespace, key) DO UPDATE SET
    attempt          = CASE WHEN r.expires_at <= now() THEN 1 ELSE r.attempt + 1 END,
    downstream_key   = CASE WHEN r.expires_at <= now() THEN EXCLUDED.downstream_key ELSE r.downstream_key END,
    created_at       = CASE WHEN r.expires_at <= now() THEN now() ELSE r.created_at END,
    expires_at       = CASE WHEN r.expires_at <= now() THEN EXCLUDED.expires_at ELSE greatest(r.expires_at, EXCLUDED.expires_at) END,
    fingerprint = EXCLUDED.fingerprint, state = 1, lease_token = EXCLUDED.lease_token, attempt_nonce = EXCLUDED.attempt_nonce,
    retention_us = EXCLUDED.retention_us, updated_at = now(), lease_expires_at = EXCLUDED.lease_expires_at,
    completed_at = NULL, response = NULL, response_code = NULL, content_type = NULL, waiters = false,
    taken_over       = r.expires_at > now() AND r.state = 1,
    aborted_by       = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN 2 ELSE r.aborted_by END,
    abort_reason     = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN 'lease expired' ELSE r.abort_reason END,
    outcome_unknown  = CASE WHEN r.expires_at <= now() THEN false WHEN r.state = 1 THEN true ELSE r.outcome_unknown END,
    ended_at         = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN r.lease_expires_at ELSE r.ended_at END,
    history_seq      = r.history_seq + CASE WHEN r.expires_at > now() AND r.state = 1 THEN 2 ELSE 1 END
WHERE r.expires_at <= now()
   OR (r.fingerprint = EXCLUDED.fingerprint AND (r.state = 3 OR (r.state = 1 AND r.lease_expires_at <= now())))
RETURNING namespace, key, attempt, lease_expires_at, downstream_key, history_seq, taken_over,
          aborted_by, abort_reason, outcome_unknown, ended_at
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT a.namespace, a.key, a.history_seq - 1, now(), 4, a.attempt - 1, 'reaper', a.abort_reason, true
    FROM acquired a WHERE a.taken_over
    UNION ALL
    SELECT a.namespace, a.key, a.history_seq, now(), 1, a.attempt, p.principal, '', false
    FROM acquired a JOIN principals p ON p.namespace = a.namespace AND p.key = a.key
)
SELECT namespace, key, attempt, lease_expires_at, downstream_key, aborted_by, abort_reason, outcome_unknown, ended_at
FROM acquired;
WITH done AS (
    UPDATE idemd_records
    SET state = 2, response = convert_to(repeat('x', 600), 'UTF8'), response_code = 201, content_type = 'application/octet-stream',
        completed_at = now(), updated_at = now(), expires_at = now() + retention_us * interval '1 microsecond',
        history_seq = history_seq + 1
    WHERE namespace = 'pgbench' AND key = :client_id || '-' || :n AND state = 1 AND lease_token = 'lt_' || md5(:client_id || '-' || :n)
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, completed_at, expires_at, waiters, history_seq, attempt, response_code, ''::text AS principal
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, response_code, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 2, attempt, principal, '', response_code, false FROM done
)
SELECT completed_at, expires_at, CASE WHEN waiters THEN pg_notify('idemd_wake', namespace || '/' || key)::text END FROM done;
SQL

# The minimal hand-written pair an application would write, on a table of
# the same shape and indexes as idemd's.
cat >"$root/hand.sql" <<'SQL'
\set n random(1, 2000000000)
INSERT INTO hand_records (namespace, key, state, attempt, fingerprint, downstream_key, lease_token,
                          retention_us, created_at, updated_at, lease_expires_at, expires_at)
VALUES ('pgbench', :client_id || '-' || :n, 1, 1, '\x6265'::bytea, 'idk_' || md5(:n::text), 'lt_' || md5(:client_id || '-' || :n),
        86400000000, now(), now(), now() + interval '60 seconds', now() + interval '1 day')
ON CONFLICT DO NOTHING;
UPDATE hand_records SET state = 2, response = convert_to(repeat('x', 600), 'UTF8'), response_code = 201,
       completed_at = now(), updated_at = now()
WHERE namespace = 'pgbench' AND key = :client_id || '-' || :n;
SQL
psql_idemd=(psql -h 127.0.0.1 -p "$port" -U postgres -d idemd -q -v ON_ERROR_STOP=1)
[ -x "$bindir/psql" ] && psql_idemd[0]="$bindir/psql"
"${psql_idemd[@]}" -c "CREATE TABLE hand_records (LIKE idemd_records INCLUDING ALL)"
postmaster=$(head -n 1 "$root/data/postmaster.pid")

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ping_run() {
  "$idemd" bench --addr "http://127.0.0.1:$1" --mode ping --concurrency 1 --duration "${seconds}s" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["pings_per_second"])'
}
idemd_run() {
  "$idemd" bench --addr "http://127.0.0.1:$2" --concurrency "$1" --duration "${seconds}s" --json "${@:3}" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["pairs_per_second"], r["latency_ms"]["pair"]["p99"], r["errors"])'
}

stats() { python3 benches/lib/usage.py snapshot "$postmaster" "$1" "${psql_idemd[@]}"; }
# One run of a side at $2 clients; prints: pairs/s p99_ms pg_cpu_us idemd_cpu_us commits wal_syncs wal_bytes
# load_generator_cpu_us (per pair).
run_side() {
  local side=$1 c=$2 before end after rate p99 pairs errors pid=$server target=$grpc_port
  # The load generator's own CPU (user + system), from /usr/bin/time.
  local timed=(/usr/bin/time -f '%U %S' -o "$root/load.time")
  [ "$side" != old ] || { pid=$old_server; target=$old_port; }
  before=$(stats "$pid")
  case $side in
    idemd | old)
      read -r rate p99 pairs errors <<<"$("${timed[@]}" "$idemd" bench --addr "http://127.0.0.1:$target" --concurrency "$c" \
        --duration "${seconds}s" --json | python3 -c 'import json,sys; r=json.load(sys.stdin)
print(r["pairs_per_second"], r["latency_ms"]["pair"]["p99"], r["pairs"], r["errors"])')"
      [ "$errors" = 0 ] || log "idemd bench reported $errors errors" ;;
    hand | sql)
      rm -f "$root"/run.*
      rate=$("${timed[@]}" "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -M prepared -c "$c" -j 2 -T "$seconds" \
        -f "$root/$side.sql" --log --log-prefix="$root/run" idemd 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
      # pgbench's log: client, transaction, latency µs, ...
      read -r pairs p99 <<<"$(cat "$root"/run.* | awk '{print $3 / 1000}' | sort -n \
        | awk '{a[NR] = $1} END {printf "%d %.2f\n", NR, NR ? a[int(NR * 0.99) + 1] : 0}')" ;;
  esac
  end=$(stats "$pid")
  sleep "$stats_wait"
  after=$(stats "$pid")
  echo "$rate $p99 $(python3 benches/lib/usage.py per-pair "$before" "$end" "$after" "$pairs")" \
    "$(tail -n 1 "$root/load.time" | awk -v n="$pairs" '{printf "%.0f", n ? ($1 + $2) / n * 1e6 : 0}')"
}
# "median (min–max)" of a column of numbers, each printed with format $1.
spread() {
  sort -n | awk -v f="$1" '{a[NR]=$1} END {m = NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2
    printf f " (" f "–" f ")", m, a[1], a[NR]}'
}

printf '\n%-6s %-6s %-22s %-18s %-16s %-14s %-12s %-14s %-14s %s\n' clients side "pairs/s" "p99 ms" "PG CPU µs/pair" \
  "idemd µs/pair" "commits/pair" "WAL syncs/pair" "WAL B/pair" "load gen µs/pair"
peak=0; peak_c=1; floor=""
for c in $levels; do
  declare -A results=()
  ping=()
  for round in $(seq 1 "$rounds"); do
    for side in $sides; do
      log "c=$c round $round/$rounds: $side"
      results[$side]+="$(run_side "$side" "$c")"$'\n'
    done
    # At one client, also the bare gRPC round trip: the part of a pair's
    # latency that no store work can remove.
    [ "$c" != 1 ] || ping+=("$(ping_run "$grpc_port")")
  done
  for side in $sides; do
    column() { printf '%s' "${results[$side]}" | awk -v k="$1" 'NF {print $k}' | spread "$2"; }
    printf '%-6s %-6s %-22s %-18s %-16s %-14s %-12s %-14s %-14s %s\n' "$c" "$side" "$(column 1 %.0f)" "$(column 2 %.1f)" \
      "$(column 3 %.0f)" "$(column 4 %.0f)" "$(column 5 %.2f)" "$(column 6 %.3f)" "$(column 7 %.0f)" "$(column 8 %.0f)"
  done
  id_m=$(printf '%s' "${results[idemd]:-0}" | awk 'NF {print $1}' | median)
  if [ "$c" = 1 ] && [ -n "${results[hand]:-}" ] && [ -n "${results[idemd]:-}" ]; then
    pg_m=$(printf '%s' "${results[hand]}" | awk 'NF {print $1}' | median)
    ping_m=$(printf '%s\n' "${ping[@]}" | median)
    floor=$(python3 -c "pg, idm, ping = 1000 / $pg_m, 1000 / $id_m, 1000 / $ping_m
print(f'one client, mean latency: hand-written pair {pg:.3f} ms, idemd pair {idm:.3f} ms ({idm / pg:.2f}x); '
      f'a bare gRPC round trip (health Check) {ping:.3f} ms, so the pair + two round trips = {pg + 2 * ping:.3f} ms; '
      f'idemd beyond that: {idm - pg - 2 * ping:+.3f} ms')")
  fi
  if python3 -c "import sys; sys.exit(0 if $id_m > $peak else 1)"; then peak=$id_m; peak_c=$c; fi
  unset results
done
# Latency at half of the peak: idemd paced to half its best rate, at the
# peak's concurrency and at 64 clients, and the hand-written pair paced to
# the same rate with the same clients. Both measure a pair from the moment it is sent to
# its answer: pgbench's schedule lag (time spent behind its own timetable) is
# left out, as idemd bench starts its clock when it sends.
half=$(python3 -c "print(round($peak / 2))")
paced_levels=$(printf '%s\n' "$peak_c" 64 | awk '!seen[$0]++')
printf '\nhalf of the peak (%s pairs/s), latency of a pair:\n' "$half"
printf '%-12s %-8s %10s %10s %10s\n' clients "" "pairs/s" "p50 ms" "p99 ms"
for c in $paced_levels; do
  log "half of the peak: $half pairs/s over $c clients (pgbench, then idemd)"
  rm -f "$root"/paced.*
  "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -M prepared -c "$c" -j 2 -T "$seconds" -R "$half" \
    -f "$root/hand.sql" --log --log-prefix="$root/paced" idemd >/dev/null 2>&1
  # pgbench's log: client, transaction, latency µs (from the scheduled start), script,
  # epoch s, µs, schedule lag µs.
  cat "$root"/paced.* 2>/dev/null | awk '{print ($3 - $7) / 1000}' | sort -n \
    | awk -v c="$c" -v s="$seconds" '{a[NR] = $1}
        END {if (NR == 0) printf "%-12s %-8s (no transactions logged)\n", c, "hand"
             else printf "%-12s %-8s %10.0f %10.2f %10.2f\n", c, "hand", NR / s, a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}'
  "$idemd" bench --addr "http://127.0.0.1:$grpc_port" --concurrency "$c" --duration "${seconds}s" --rate "$half" --json \
    | python3 -c 'import json, sys
r = json.load(sys.stdin); p = r["latency_ms"]["pair"]; e = r["errors"]
print("%-12s %-8s %10.0f %10.2f %10.2f%s" % (sys.argv[1], "idemd", r["pairs_per_second"], p["p50"], p["p99"], "  (%d errors)" % e if e else ""))' "$c"
done
[ -z "$floor" ] || printf '%s\n' "$floor"
kill -TERM "$server"; wait "$server" || true
[ -z "$old_idemd" ] || { kill -TERM "$old_server"; wait "$old_server" || true; }

sqlite_port=$(free_port)
"$idemd" serve --listen "127.0.0.1:$sqlite_port" --metrics-listen 127.0.0.1:0 --database-url "sqlite://$root/bench.db" \
  2>"$root/idemd-sqlite.log" &
server=$!
for _ in $(seq 1 100); do grep -q "idemd listening" "$root/idemd-sqlite.log" && break; sleep 0.1; done
read -r rate tail errors <<<"$(idemd_run 16 "$sqlite_port")"
printf '%-12s %16s %16.0f %8s %18.2f\n' "16 (SQLite)" "-" "$rate" "-" "$tail"
kill -TERM "$server"; wait "$server" || true
