# Sourced by scripts/test and scripts/failover (after postgres.sh): installs
# what the PgBouncer and failover tests run, from Debian's packages, when it
# is missing and we are root: pgbouncer, patroni, etcd-server.

need_packages=()
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need_packages+=(pgbouncer)
command -v patroni >/dev/null || need_packages+=(patroni)
command -v etcd >/dev/null || need_packages+=(etcd-server)
if [ "${#need_packages[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { log "missing ${need_packages[*]}: apt-get install them, or run as root"; exit 1; }
  log "installing ${need_packages[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi
pgbouncer_bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
