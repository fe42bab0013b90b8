# Sourced by the scripts: start_pg DIR starts a throwaway PostgreSQL cluster (wal_level=logical) in
# DIR on a free port and exports PG_PORT; stop_pg DIR stops it. Under root the server runs as the
# unprivileged 'postgres' account, since initdb refuses root.
pg_bindir() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return 0; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do [ -x "$d/initdb" ] && echo "$d"; done | tail -n 1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${PG_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

start_pg() {
  local dir=$1 bin
  bin=$(pg_bindir)
  if [ -z "$bin" ]; then echo "error: PostgreSQL server binaries not found (set PG_BIN)" >&2; return 1; fi
  mkdir -p "$dir/sock"
  printf 'postgres' > "$dir/pwfile"
  if [ "$(id -u)" = 0 ]; then chmod 755 "$dir"; chown -R "${PG_OS_USER:-postgres}" "$dir"; fi
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/pwfile" -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
    || { echo "error: initdb failed; see $dir/initdb.log" >&2; return 1; }
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
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start >/dev/null \
    || { echo "error: PostgreSQL did not start; see $dir/server.log" >&2; return 1; }
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
