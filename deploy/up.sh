#!/usr/bin/env bash
# Start the local infrastructure: PostgreSQL and Kafka (or reuse running servers named by
# AFTERGLOW_DATABASE_URL / AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS), then write <run dir>/env
# with `export AFTERGLOW_...=...` lines for shells (`. .run/env`) and make (`include .run/env`).
# The same lines are printed on stdout at the end, so `eval "$(deploy/up.sh)"` works too.
#
# Environment: everything deploy/postgres/postgres.sh and deploy/kafka/kafka.sh read;
# AFTERGLOW_RUN_DIR (default <repo>/.run) also decides where env is written.
set -euo pipefail

PROG=up.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

# Only characters that need no quoting in sh and GNU make stay bare.
env_value() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

mkdir -p "$RUN_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# In parallel: the JVM start takes longest and PostgreSQL fits inside it.
"$HERE/postgres/postgres.sh" start >"$tmp/postgres" &
pg_job=$!
kafka_rc=0
"$HERE/kafka/kafka.sh" start >"$tmp/kafka" || kafka_rc=$?
pg_rc=0
wait "$pg_job" || pg_rc=$?
if ((pg_rc != 0 || kafka_rc != 0)); then
  ((pg_rc == 0)) || info "PostgreSQL did not start (exit $pg_rc)"
  ((kafka_rc == 0)) || info "Kafka did not start (exit $kafka_rc)"
  die "not everything is up; deploy/down.sh stops whatever did start"
fi

pg_line=$(tail -n 1 "$tmp/postgres")
kafka_line=$(tail -n 1 "$tmp/kafka")
[[ $pg_line == AFTERGLOW_DATABASE_URL=?* ]] || die "unexpected last line from postgres.sh: '$pg_line'"
[[ $kafka_line == AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=?* ]] || die "unexpected last line from kafka.sh: '$kafka_line'"

env_file=$RUN_DIR/env
{
  echo "# Written by deploy/up.sh; load with: . $env_file"
  for line in "$pg_line" "$kafka_line"; do
    printf 'export %s=%s\n' "${line%%=*}" "$(env_value "${line#*=}")"
  done
} >"$env_file.tmp"
mv -f "$env_file.tmp" "$env_file"
info "wrote $env_file"
grep '^export ' "$env_file"
