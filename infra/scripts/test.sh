#!/usr/bin/env bash
# infra/'s tests, on a fresh machine too, idempotently:
#   1. npm ci in infra/ (skipped while node_modules matches package-lock.json),
#   2. cfn-lint into the repository's Python venv (.venv at the repository root), when missing,
#   3. the TypeScript type check,
#   4. the test suite (node:test with tsx; aws-cdk-lib/assertions and cdk-nag on synthesized templates),
#   5. `cdk synth` through the CLI with config.example.json and a dummy compactor zip (offline: no
#      AWS account, no Docker; synth only stages the image's build context),
#   6. cfn-lint on that template and on every template the tests synthesized,
#   7. checkov on the Terraform module (infra/terraform), installed into its own venv under .venv
#      (.venv/checkov: checkov pins boto3, networkx and packaging to versions the shared venv's
#      moto and cfn-lint do not want). The suite of step 4 parses the module, checks it against the
#      AWS provider's schema, resolves its references and compares it with the CDK stack.
# Needs no cargo and no network beyond the npm registry and PyPI (for steps 1, 2 and 7).
# Exits non-zero when anything fails; prints a summary.
set -euo pipefail
infra=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$infra/.." && pwd)
cd "$infra"
started=$(date +%s)
log() { printf '[infra] %s\n' "$*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-infra-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. Node packages, exactly as locked.
want=$(sha256sum package-lock.json | cut -d' ' -f1)
stamp=node_modules/.package-lock.sha256
if [ ! -x node_modules/.bin/cdk ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" >"$stamp"
fi

# 2. cfn-lint, in the repository's venv (shared with moto and the other Python tools).
venv="$root/.venv"
if [ ! -x "$venv/bin/cfn-lint" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  log "installing cfn-lint into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check cfn-lint
fi

# checkov, pinned (a new release brings new checks), in a venv of its own.
checkov_version=3.3.30
checkov_venv="$venv/checkov"
if [ "$("$checkov_venv/bin/checkov" --version 2>/dev/null)" != "$checkov_version" ]; then
  [ -x "$checkov_venv/bin/python" ] || python3 -m venv "$checkov_venv"
  log "installing checkov $checkov_version into $checkov_venv"
  "$checkov_venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$checkov_version"
fi

export CDK_DISABLE_CLI_TELEMETRY=true CDK_DISABLE_VERSION_CHECK=true

typecheck=FAILED tests=FAILED synth=FAILED lint=FAILED checkov=FAILED
rc=0

# 3. Types (tsx, which runs the tests and the app, does not check them).
log "type check"
if npx tsc --noEmit; then typecheck=ok; else rc=1; fi

# 4. The test suite; every template it synthesizes is kept for cfn-lint.
log "test suite"
mkdir -p "$work/templates"
set +e
PGCDC_TEMPLATE_DIR="$work/templates" node --import tsx --test --test-reporter=spec test/*.test.ts 2>&1 | tee "$work/tests.log"
test_rc=${PIPESTATUS[0]}
set -e
count() { sed -n "s/^ℹ $1 \([0-9]*\)$/\1/p" "$work/tests.log" | tail -n 1; }
n_tests=$(count tests) n_pass=$(count pass) n_fail=$(count fail)
if [ "$test_rc" = 0 ]; then tests=ok; else rc=1; fi

# 5. The CLI app, as `cdk deploy` runs it, with a prebuilt dummy zip for the compactor.
log "cdk synth (config.example.json)"
python3 -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr(zipfile.ZipInfo("bootstrap"), "#!/bin/sh\n")' "$work/bootstrap.zip"
if npx cdk synth --no-notices --quiet -c config=config.example.json -c compactorAsset="$work/bootstrap.zip" \
  -o "$work/cdk.out" >"$work/synth.log" 2>&1; then
  synth=ok
  cp "$work"/cdk.out/*.template.json "$work/templates/"
else
  cat "$work/synth.log" >&2
  rc=1
fi

# 6. cfn-lint: fails on errors (exit bit 2) or a crash (bit 1); warnings are shown and counted.
n_templates=$(find "$work/templates" -name '*.template.json' | wc -l)
log "cfn-lint on $n_templates templates"
set +e
"$venv/bin/cfn-lint" --format parseable -- "$work"/templates/*.template.json >"$work/lint.log" 2>&1
lint_rc=$?
set -e
sed "s|$work/templates/||" "$work/lint.log"
n_lint_err=$(grep -c ':E[0-9]' "$work/lint.log" || true)
n_lint_warn=$(grep -c ':W[0-9]' "$work/lint.log" || true)
if [ "$n_templates" -gt 0 ] && [ $((lint_rc & 3)) = 0 ]; then lint=ok; else rc=1; fi

# 7. checkov on the module and its example: fails on any failed check; skips are inline
#    (#checkov:skip=ID:reason, each with its reason) and counted. --skip-download: offline.
log "checkov on terraform/"
set +e
"$checkov_venv/bin/checkov" --directory terraform --framework terraform --skip-download --output json \
  >"$work/checkov.json" 2>"$work/checkov.log"
checkov_rc=$?
set -e
checkov_counts=$(python3 - "$work/checkov.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    print("? ? ? ?"); sys.exit()
reports = d if isinstance(d, list) else [d]
s = {k: sum(r.get("summary", {}).get(k, 0) for r in reports) for k in ("passed", "failed", "skipped", "parsing_errors")}
for r in reports:
    for c in r.get("results", {}).get("failed_checks", []):
        print(f"checkov FAILED {c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range'][0]})", file=sys.stderr)
print(s["passed"], s["failed"], s["skipped"], s["parsing_errors"])
PY
)
read -r n_ck_pass n_ck_fail n_ck_skip n_ck_parse <<<"$checkov_counts"
if [ "$checkov_rc" = 0 ] && [ "$n_ck_fail" = 0 ] && [ "$n_ck_parse" = 0 ] && [ "${n_ck_pass:-0}" != "?" ] && [ "$n_ck_pass" -gt 0 ]; then
  checkov=ok
else
  cat "$work/checkov.log" >&2
  rc=1
fi

cat <<SUMMARY

infra summary ($(( $(date +%s) - started )) s):
  type check   $typecheck
  tests        $tests: ${n_tests:-?} tests, ${n_pass:-?} passed, ${n_fail:-?} failed
  cdk synth    $synth (config.example.json, offline)
  cfn-lint     $lint: $n_templates templates, $n_lint_err errors, $n_lint_warn warnings ($("$venv/bin/cfn-lint" --version))
  checkov      $checkov: terraform/, $n_ck_pass passed, $n_ck_fail failed, $n_ck_skip skipped with reasons, $n_ck_parse parsing errors (checkov $checkov_version)
SUMMARY
exit "$rc"
