#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh machine, idempotently:
# PostgreSQL's server binaries (Debian package) when missing, and ./.venv with moto (the AWS
# emulator), cargo-lambda, cfn-lint, pyarrow and duckdb. The tests' other PostgreSQL versions
# come from scripts/pg-versions.sh, which test.sh runs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

pg_bindir() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return 0; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do [ -x "$d/initdb" ] && echo "$d"; done | tail -n 1
}

if [ -z "$(pg_bindir)" ]; then
  log "PostgreSQL server binaries not found; installing postgresql-15"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
  else
    log "error: install PostgreSQL 15's server (initdb, pg_ctl) or set PG_BIN to their directory"
    exit 1
  fi
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  log "creating the unprivileged 'postgres' account the throwaway clusters run as"
  useradd --system --create-home --shell /bin/bash postgres
fi

stamp=.venv/.requirements.sha
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python tools into .venv (moto, cargo-lambda, cfn-lint, pyarrow, duckdb)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi
log "ready: postgres binaries in $(pg_bindir), tools in .venv/bin"
