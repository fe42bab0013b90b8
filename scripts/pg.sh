# Sourced by the scripts: start_pg DIR starts a throwaway PostgreSQL cluster (wal_level=logical) in
# DIR on a free port and exports PG_PORT; stop_pg DIR stops it. Under root the server runs as the
# unprivileged 'postgres' account, since initdb refuses root: that account must be able to reach DIR
# (pg_cluster_home picks a place it can).
pg_bindir() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return 0; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do [ -x "$d/initdb" ] && echo "$d"; done | tail -n 1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${PG_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

# True when the account the server runs as can enter DIR's parent directories (always true when the
# scripts do not run as root, since the server then runs as the caller).
pg_can_reach() {
  local dir=$1 parent
  [ "$(id -u)" = 0 ] || return 0
  parent=$(dirname "$dir")
  while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done
  runuser -u "${PG_OS_USER:-postgres}" -- test -x "$parent"
}

# Prints where a throwaway cluster wanted at DIR can live: DIR itself when the server's account can
# reach it, otherwise a fresh directory under ${TMPDIR:-/tmp} (the caller's own directories keep
# their modes; they are never opened up).
pg_cluster_home() {
  local dir=$1
  if pg_can_reach "$dir"; then echo "$dir"; return 0; fi
  mktemp -d "${TMPDIR:-/tmp}/pg-cdc-s3-cluster.XXXXXX"
}

# Last lines of a log, indented, for error messages.
pg_log_tail() { [ -f "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    | /' >&2; return 0; }

start_pg() {
  local dir=$1 bin
  bin=$(pg_bindir)
  if [ -z "$bin" ]; then
    echo "error: PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found." >&2
    echo "  fix: run ./scripts/setup.sh as root (installs Debian's postgresql-15), or set PG_BIN to the" >&2
    echo "       directory holding initdb (e.g. PG_BIN=/usr/lib/postgresql/16/bin)" >&2
    return 1
  fi
  if [ "$(id -u)" = 0 ] && ! id "${PG_OS_USER:-postgres}" >/dev/null 2>&1; then
    echo "error: the '${PG_OS_USER:-postgres}' account the server runs as under root does not exist." >&2
    echo "  fix: run ./scripts/setup.sh (creates it), or set PG_OS_USER to an unprivileged account" >&2
    return 1
  fi
  if ! pg_can_reach "$dir"; then
    echo "error: the '${PG_OS_USER:-postgres}' account cannot enter the directories above $dir" >&2
    echo "  (a private home or a mktemp -d directory); initdb would fail there." >&2
    echo "  fix: put the cluster under a directory that account can traverse (e.g. one under /tmp)" >&2
    return 1
  fi
  mkdir -p "$dir/sock"
  printf 'postgres' > "$dir/pwfile"
  if [ "$(id -u)" = 0 ]; then chmod 755 "$dir"; chown -R "${PG_OS_USER:-postgres}" "$dir"; fi
  if ! as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/pwfile" -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
    echo "error: initdb ($bin/initdb) failed in $dir/data; the end of $dir/initdb.log:" >&2
    pg_log_tail "$dir/initdb.log"
    echo "  fix: see the log's cause above (a full disk, a directory the server's account cannot write," >&2
    echo "       or a data directory left from an earlier run: remove $dir and start again)" >&2
    return 1
  fi
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$dir/sock'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
fsync = off
CONF
  if ! as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start >/dev/null; then
    echo "error: PostgreSQL did not start on 127.0.0.1:$PG_PORT; the end of $dir/server.log:" >&2
    pg_log_tail "$dir/server.log"
    echo "  fix: if the log says the port is in use, another process took it after it was picked: run again;" >&2
    echo "       otherwise the log names the cause (shared memory, permissions, a bad setting)" >&2
    return 1
  fi
  export PG_PORT
}

stop_pg() {
  local dir=$1 bin
  bin=$(pg_bindir)
  [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

psql_pg() {
  local dir=$1 db=$2; shift 2
  "$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir/sock" -p "$PG_PORT" -U postgres -d "$db" "$@"
}
