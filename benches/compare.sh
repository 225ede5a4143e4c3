#!/usr/bin/env bash
# idemd against raw Postgres on this machine (run by hand, not in CI).
#
# Starts a throwaway PostgreSQL (default durability: fsync and
# synchronous_commit on) and idemd (release build) on it, then alternates
# pgbench running idemd's own Begin and Complete statements (one transaction
# each, prepared, same table) with `idemd bench` at the same concurrency, and
# prints the medians and their ratio. Then idemd and pgbench paced to half of
# idemd's peak, at the peak's concurrency and at 64 clients, for the latency
# of a pair at that load (p50 and p99, the same measure for both). A last
# row runs idemd on SQLite.
#
#   benches/compare.sh                 # 20 s per run, 3 rounds, c = 1 16 64 256
#   SECONDS_PER_RUN=10 ROUNDS=2 LEVELS="1 16 64" benches/compare.sh
#   IDEMD_FLAGS="--group-commit-max-batch 1" benches/compare.sh    # group commit off
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SECONDS_PER_RUN:-20}
rounds=${ROUNDS:-3}
levels=${LEVELS:-"1 16 64 256"}

# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh

log "building idemd (release)"
cargo build --release --locked --quiet --bin idemd
idemd=target/release/idemd

start_bench_cluster

grpc_port=$(free_port)
# shellcheck disable=SC2086 # IDEMD_FLAGS is a list of flags
"$idemd" serve --listen "127.0.0.1:$grpc_port" --metrics-listen 127.0.0.1:0 --database-url "$url" \
  --db-max-connections 64 ${IDEMD_FLAGS:-} 2>"$root/idemd.log" &
server=$!
for _ in $(seq 1 100); do grep -q "idemd listening" "$root/idemd.log" && break; sleep 0.1; done

# The same statements idemd runs for Begin (create) and Complete, per pair.
cat >"$root/pair.sql" <<'SQL'
\set n random(1, 2000000000)
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at)
VALUES ('pgbench', :client_id || '-' || :n, 1, 1, '\x6265'::bytea, 'idk_' || md5(:n::text), 'lt_' || md5(:client_id || '-' || :n), NULL,
        86400000000, now(), now(), now() + 60000000::bigint * interval '1 microsecond',
        now() + greatest(60000000::bigint, 86400000000::bigint) * interval '1 microsecond')
ON CONFLICT (namespace, key) DO UPDATE SET
    attempt = CASE WHEN r.expires_at <= now() THEN 1 ELSE r.attempt + 1 END,
    state = 1, lease_token = EXCLUDED.lease_token, updated_at = now(), lease_expires_at = EXCLUDED.lease_expires_at,
    waiters = false
WHERE r.expires_at <= now()
   OR (r.fingerprint = EXCLUDED.fingerprint AND (r.state = 3 OR (r.state = 1 AND r.lease_expires_at <= now())))
RETURNING attempt, lease_expires_at, downstream_key;
WITH done AS (
    UPDATE idemd_records
    SET state = 2, response = convert_to(repeat('x', 600), 'UTF8'), response_code = 201, content_type = 'application/octet-stream',
        completed_at = now(), updated_at = now(), expires_at = now() + retention_us * interval '1 microsecond'
    WHERE namespace = 'pgbench' AND key = :client_id || '-' || :n AND state = 1 AND lease_token = 'lt_' || md5(:client_id || '-' || :n)
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, completed_at, expires_at, waiters
)
SELECT completed_at, expires_at, CASE WHEN waiters THEN pg_notify('idemd_wake', namespace || '/' || key)::text END FROM done;
SQL

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
pgbench_run() {
  "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -M prepared -c "$1" -j 2 -T "$seconds" -f "$root/pair.sql" idemd 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
ping_run() {
  "$idemd" bench --addr "http://127.0.0.1:$1" --mode ping --concurrency 1 --duration "${seconds}s" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["pings_per_second"])'
}
idemd_run() {
  "$idemd" bench --addr "http://127.0.0.1:$2" --concurrency "$1" --duration "${seconds}s" --json "${@:3}" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["pairs_per_second"], r["latency_ms"]["pair"]["p99"], r["errors"])'
}

printf '\n%-12s %16s %16s %8s %18s\n' concurrency "pgbench pairs/s" "idemd pairs/s" ratio "idemd p99 pair ms"
peak=0; peak_c=1; floor=""
for c in $levels; do
  pg=(); id=(); p99=(); ping=()
  for round in $(seq 1 "$rounds"); do
    log "c=$c round $round/$rounds"
    pg+=("$(pgbench_run "$c")")
    read -r rate tail errors <<<"$(idemd_run "$c" "$grpc_port")"
    [ "$errors" = 0 ] || log "idemd bench reported $errors errors"
    id+=("$rate"); p99+=("$tail")
    # At one client, also the bare gRPC round trip: the part of a pair's
    # latency that no store work can remove.
    [ "$c" != 1 ] || ping+=("$(ping_run "$grpc_port")")
  done
  pg_m=$(printf '%s\n' "${pg[@]}" | median)
  id_m=$(printf '%s\n' "${id[@]}" | median)
  if [ "$c" = 1 ]; then
    ping_m=$(printf '%s\n' "${ping[@]}" | median)
    floor=$(python3 -c "pg, idm, ping = 1000 / $pg_m, 1000 / $id_m, 1000 / $ping_m
print(f'one client, mean latency: pgbench pair {pg:.3f} ms, idemd pair {idm:.3f} ms ({idm / pg:.2f}x); '
      f'a bare gRPC round trip (health Check) {ping:.3f} ms, so pgbench + two round trips = {pg + 2 * ping:.3f} ms '
      f'({(pg + 2 * ping) / pg:.2f}x); idemd beyond that: {idm - pg - 2 * ping:+.3f} ms')")
  fi
  p99_m=$(printf '%s\n' "${p99[@]}" | median)
  printf '%-12s %16.0f %16.0f %8.2f %18.2f\n' "$c" "$pg_m" "$id_m" "$(python3 -c "print($id_m / $pg_m)")" "$p99_m"
  if python3 -c "import sys; sys.exit(0 if $id_m > $peak else 1)"; then peak=$id_m; peak_c=$c; fi
done
# Latency at half of the peak: idemd paced to half its best rate, at the
# peak's concurrency and at 64 clients, and pgbench paced to the same rate
# with the same clients. Both measure a pair from the moment it is sent to
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
    -f "$root/pair.sql" --log --log-prefix="$root/paced" idemd >/dev/null 2>&1
  # pgbench's log: client, transaction, latency µs (from the scheduled start), script,
  # epoch s, µs, schedule lag µs.
  cat "$root"/paced.* 2>/dev/null | awk '{print ($3 - $7) / 1000}' | sort -n \
    | awk -v c="$c" -v s="$seconds" '{a[NR] = $1}
        END {if (NR == 0) printf "%-12s %-8s (no transactions logged)\n", c, "pgbench"
             else printf "%-12s %-8s %10.0f %10.2f %10.2f\n", c, "pgbench", NR / s, a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}'
  "$idemd" bench --addr "http://127.0.0.1:$grpc_port" --concurrency "$c" --duration "${seconds}s" --rate "$half" --json \
    | python3 -c 'import json, sys
r = json.load(sys.stdin); p = r["latency_ms"]["pair"]; e = r["errors"]
print("%-12s %-8s %10.0f %10.2f %10.2f%s" % (sys.argv[1], "idemd", r["pairs_per_second"], p["p50"], p["p99"], "  (%d errors)" % e if e else ""))' "$c"
done
[ -z "$floor" ] || printf '%s\n' "$floor"
kill -TERM "$server"; wait "$server" || true

sqlite_port=$(free_port)
"$idemd" serve --listen "127.0.0.1:$sqlite_port" --metrics-listen 127.0.0.1:0 --database-url "sqlite://$root/bench.db" \
  2>"$root/idemd-sqlite.log" &
server=$!
for _ in $(seq 1 100); do grep -q "idemd listening" "$root/idemd-sqlite.log" && break; sleep 0.1; done
read -r rate tail errors <<<"$(idemd_run 16 "$sqlite_port")"
printf '%-12s %16s %16.0f %8s %18.2f\n' "16 (SQLite)" "-" "$rate" "-" "$tail"
kill -TERM "$server"; wait "$server" || true
