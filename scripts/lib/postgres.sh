# Sourced by scripts/test and scripts/faults: finds (or installs) the
# PostgreSQL server binaries, picks the unprivileged user PostgreSQL runs as
# (it refuses root), makes a scratch folder, and removes everything on exit.
# Sets: bindir, pg_user, root, as_pg(); exports IDEMD_TEST_PG_BINDIR,
# IDEMD_TEST_PG_USER and IDEMD_TEST_TMP for tests that run clusters of their own.

# Each line says how long the script has run: where CI's time goes.
log() { printf '==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

bindir=$(pg_bindir || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "PostgreSQL server binaries not found: install them (apt-get install postgresql) or run as root"
    exit 1
  fi
  log "installing PostgreSQL server binaries with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  bindir=$(pg_bindir)
fi

pg_user=""
as_pg() { "$@"; }
if [ "$(id -u)" -eq 0 ]; then
  pg_user=postgres
  if ! id -u "$pg_user" >/dev/null 2>&1; then
    pg_user=idemd-test
    id -u "$pg_user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$pg_user"
  fi
  as_pg() { runuser -u "$pg_user" -- "$@"; }
fi

root=$(mktemp -d /tmp/idemd-test.XXXXXX)
chmod 755 "$root"
cleanup() {
  status=$?
  log "cleaning up $root"
  for data in "$root"/data "$root"/clusters/*/data; do
    [ -f "$data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
  done
  pkill -9 -f "$root" >/dev/null 2>&1 || true
  rm -rf "$root"
  exit "$status"
}
trap cleanup EXIT INT TERM

mkdir -p "$root/clusters"
if [ -n "$pg_user" ]; then chown -R "$pg_user" "$root"; fi

export IDEMD_TEST_PG_BINDIR="$bindir"
export IDEMD_TEST_PG_USER="$pg_user"
export IDEMD_TEST_TMP="$root/clusters"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A cluster with the default durability (fsync and synchronous_commit on)
# and a database `idemd` on it, for the benchmarks. Sets port and url.
start_bench_cluster() {
  port=$(free_port)
  as_pg "$bindir/initdb" -D "$root/data" -U postgres --auth=trust -E UTF8 >"$root/initdb.log" 2>&1
  as_pg "$bindir/pg_ctl" -D "$root/data" -l "$root/postgres.log" -w -t 60 \
    -o "-p $port -k $root -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=256MB" start >/dev/null
  as_pg "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres idemd
  url="postgres://postgres@127.0.0.1:$port/idemd"
}
