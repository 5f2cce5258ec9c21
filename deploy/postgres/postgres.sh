#!/usr/bin/env bash
# Local PostgreSQL server for development, tests and benchmarks, run from the
# installed binaries with its data under the run dir (no system service involved).
#
# Usage: deploy/postgres/postgres.sh start|stop|status
#
# Environment:
#   AFTERGLOW_DATABASE_URL         if set to a postgresql URL that answers, `start` uses it
#   AFTERGLOW_RUN_DIR              state folder parent (default <repo>/.run; data in <run>/postgres)
#   AFTERGLOW_PG_PORT              port on 127.0.0.1 (default 55432, away from a system server)
#   AFTERGLOW_PG_DATABASE          database created at start (default afterglow)
#   AFTERGLOW_PG_BINDIR            PostgreSQL bin dir (default: pg_config --bindir, else the
#                                  newest /usr/lib/postgresql/*/bin, else pg_ctl on PATH)
#   AFTERGLOW_PG_START_TIMEOUT     seconds to wait for the server (default 60)
#
# As root the server runs as the system user `postgres` (initdb refuses root); as any
# other user it runs as that user. When `postgres` cannot reach <run dir> (a parent
# folder without o+x), the data goes to /tmp/afterglow-run-<uid>/postgres instead.
#
# `start` prints AFTERGLOW_DATABASE_URL=... as the last stdout line; progress goes to stderr.
set -euo pipefail

PROG=postgres.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

PG_PORT=${AFTERGLOW_PG_PORT:-55432}
PG_DB=${AFTERGLOW_PG_DATABASE:-afterglow}
START_TIMEOUT=${AFTERGLOW_PG_START_TIMEOUT:-60}
PG_USER=postgres
PRIMARY_DIR=$RUN_DIR/postgres
FALLBACK_DIR=/tmp/afterglow-run-$(id -u)/postgres

require_port AFTERGLOW_PG_PORT "$PG_PORT"
require_uint AFTERGLOW_PG_START_TIMEOUT "$START_TIMEOUT"
[[ $PG_DB =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "AFTERGLOW_PG_DATABASE must be a plain identifier, got '$PG_DB'"

# Ignore the caller's libpq settings: every connection below names its target explicitly.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGOPTIONS PGSSLMODE

# as_pg CMD...: run as the server's owner; from / because the caller's cwd may be unreadable.
as_pg() {
  if ((EUID == 0)); then
    (cd / && runuser -u "$PG_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

check_user() {
  ((EUID == 0)) || return 0
  id -u "$PG_USER" >/dev/null 2>&1 ||
    die "running as root needs the system user '$PG_USER' (initdb and postgres refuse root); create it or run as a normal user"
  command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) not found; it is needed to run PostgreSQL as '$PG_USER'"
}

is_pg_bindir() {
  [[ -n $1 && -x $1/pg_ctl && -x $1/initdb && -x $1/postgres ]]
}

BINDIR='' PSQL='' PG_ISREADY=''
find_bindir() {
  local want_version=${1:-} dir candidate
  local -a candidates=()
  if [[ -n ${AFTERGLOW_PG_BINDIR:-} ]]; then
    is_pg_bindir "$AFTERGLOW_PG_BINDIR" || die "AFTERGLOW_PG_BINDIR=$AFTERGLOW_PG_BINDIR has no initdb/pg_ctl/postgres"
    BINDIR=$AFTERGLOW_PG_BINDIR
    return 0
  fi
  # An existing cluster only runs with its own major version.
  [[ -n $want_version ]] && candidates+=("/usr/lib/postgresql/$want_version/bin")
  if command -v pg_config >/dev/null 2>&1; then
    candidates+=("$(pg_config --bindir 2>/dev/null || true)")
  fi
  while IFS= read -r dir; do
    candidates+=("$dir")
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
  if command -v pg_ctl >/dev/null 2>&1; then
    candidates+=("$(dirname "$(command -v pg_ctl)")")
  fi
  for candidate in "${candidates[@]}"; do
    is_pg_bindir "$candidate" || continue
    if [[ -n $want_version && $("$candidate/postgres" -V | sed -n 's/^[^0-9]*\([0-9][0-9]*\).*/\1/p') != "$want_version" ]]; then
      continue
    fi
    BINDIR=$candidate
    return 0
  done
  if [[ -n $want_version ]]; then
    die "the data in $PG_DIR/data needs PostgreSQL $want_version server binaries, which were not found (install postgresql-$want_version or set AFTERGLOW_PG_BINDIR)"
  fi
  die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install PostgreSQL (e.g. apt-get install postgresql) or set AFTERGLOW_PG_BINDIR"
}

client() { # client NAME: psql/pg_isready from BINDIR, else from PATH
  if [[ -x $BINDIR/$1 ]]; then
    echo "$BINDIR/$1"
  elif command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  else
    die "$1 not found (PostgreSQL client programs); install e.g. postgresql-client"
  fi
}

initialized() { [[ -f $1/.initialized && -f $1/data/PG_VERSION ]]; }

# make_owned_dir DIR: DIR exists, belongs to the server's user, mode 700.
make_owned_dir() {
  mkdir -p "$1"
  if ((EUID == 0)); then
    chown "$PG_USER:" "$1"
  fi
  chmod 700 "$1"
}

# resolve_pg_dir [create]: sets PG_DIR to the folder holding data/, socket/ and the log.
PG_DIR=
resolve_pg_dir() {
  local dir
  for dir in "$PRIMARY_DIR" "$FALLBACK_DIR"; do
    if initialized "$dir"; then
      PG_DIR=$dir
      return 0
    fi
  done
  PG_DIR=$PRIMARY_DIR
  [[ ${1:-} == create ]] || return 0

  if [[ ! -d $RUN_DIR || $RUN_DIR == "$AFTERGLOW_REPO_DIR/.run" ]]; then
    mkdir -p "$RUN_DIR"
    chmod 755 "$RUN_DIR"
  fi
  ((EUID == 0)) || {
    make_owned_dir "$PG_DIR"
    return 0
  }
  if runuser -u "$PG_USER" -- test -x "$RUN_DIR" 2>/dev/null; then
    make_owned_dir "$PG_DIR"
    return 0
  fi
  PG_DIR=$FALLBACK_DIR
  info "user $PG_USER cannot enter $RUN_DIR (a parent folder lacks o+x); using $PG_DIR"
  local parent=${FALLBACK_DIR%/*}
  mkdir -p "$parent"
  # /tmp is shared: refuse a folder someone else prepared.
  [[ -O $parent ]] || die "$parent exists but is not owned by $(id -un); remove it or set AFTERGLOW_RUN_DIR"
  chmod 755 "$parent"
  make_owned_dir "$PG_DIR"
}

pg_running() {
  initialized "$PG_DIR" && as_pg "$BINDIR/pg_ctl" status -D "$PG_DIR/data" >/dev/null 2>&1
}

# The port of a running server, from line 4 of postmaster.pid.
running_port() {
  sed -n 4p "$PG_DIR/data/postmaster.pid" 2>/dev/null || true
}

conf_quote() { printf "'%s'" "${1//\'/\'\'}"; }

write_conf() {
  local socket_dir=$PG_DIR/socket sockets
  make_owned_dir "$socket_dir"
  # A Unix socket path is limited to 107 bytes; past that, TCP only.
  if ((${#socket_dir} + 20 > 107)); then
    info "run dir path too long for a Unix socket; TCP only"
    sockets="''"
  else
    sockets=$(conf_quote "$socket_dir")
  fi
  as_pg tee "$PG_DIR/data/afterglow.conf" >/dev/null <<EOF
# Written by deploy/postgres/postgres.sh at every start; edits are overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = $sockets
max_connections = 200
# The ingest's indexes (activities at 10,000,000 rows) stay in memory, and the WAL's full
# page images are compressed: REST ingest at 1,000,000 users went from 17,074 to 21,685
# activities/s (PostgreSQL CPU per 1,000 activities 61.9 -> 51.9 ms) against 256MB and none.
shared_buffers = 1GB
wal_compression = lz4
# Checkpoints by time, not by WAL volume: at the default 1GB a bulk load checkpointed every
# 7-16 s, and after each one every page touched is written to the WAL whole again. REST
# ingest at 1,000,000 users, alternating runs: PostgreSQL CPU per 1,000 activities 60.6-62.3
# -> 56.8-57.0 ms, 16,144-16,896 -> 17,909-18,686 activities/s. Costs disk: up to 8GB of WAL.
max_wal_size = 8GB
checkpoint_timeout = 15min
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
EOF
}

init_cluster() {
  local data=$PG_DIR/data locale_opt=(--no-locale)
  # Collation C: text keys compare byte by byte (memcmp, abbreviated sort keys), about
  # twice as fast in sorts and B-tree inserts as the libc collation "C.UTF-8" (PostgreSQL
  # 15 calls strcoll for it), in the same order (UTF-8 bytes sort as code points). The
  # character type C.UTF-8, where the system has it, makes upper()/lower() work beyond ASCII.
  if locale -a 2>/dev/null | grep -qixE 'c\.utf-?8'; then
    locale_opt=(--locale=C.UTF-8 --lc-collate=C)
  fi
  rm -rf "$data" "$PG_DIR/.initialized"
  info "initdb in $data ($("$BINDIR/postgres" -V))"
  if ! as_pg "$BINDIR/initdb" -D "$data" -A trust -U postgres --encoding=UTF8 "${locale_opt[@]}" \
    >"$PG_DIR/initdb.log" 2>&1; then
    log_tail "$PG_DIR/initdb.log"
    die "initdb failed (log: $PG_DIR/initdb.log)"
  fi
  echo "include_if_exists = 'afterglow.conf'" | as_pg tee -a "$data/postgresql.conf" >/dev/null
  date -u '+%Y-%m-%dT%H:%M:%SZ' >"$PG_DIR/.initialized"
}

psql_tcp() { # psql_tcp PORT SQL
  PGCONNECT_TIMEOUT=5 "$PSQL" -X -q -t -A -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

ensure_database() {
  local port=$1
  if [[ $(psql_tcp "$port" "select 1 from pg_database where datname = '$PG_DB'") != 1 ]]; then
    info "creating database $PG_DB"
    # Collation C even on a cluster initialised otherwise (shared/db.py: FAST_COLLATIONS).
    psql_tcp "$port" "create database \"$PG_DB\" owner postgres template template0 lc_collate 'C'" >/dev/null
  fi
}

url_answers() { # url_answers URL: a postgresql URL whose first host:port accepts TCP
  local url=$1 authority
  [[ $url =~ ^postgres(ql)?(\+[A-Za-z0-9_]+)?:// ]] || return 1
  authority=${url#*://}
  authority=${authority%%[/?]*}
  authority=${authority##*@}
  authority=${authority%%,*}
  split_host_port "$authority" 5432 || return 1
  tcp_open "$HP_HOST" "$HP_PORT"
}

start() {
  if [[ -n ${AFTERGLOW_DATABASE_URL:-} ]]; then
    if url_answers "$AFTERGLOW_DATABASE_URL"; then
      info "using the running server of AFTERGLOW_DATABASE_URL; not starting one"
      echo "AFTERGLOW_DATABASE_URL=$AFTERGLOW_DATABASE_URL"
      return 0
    fi
    info "AFTERGLOW_DATABASE_URL is set but its host:port does not answer (or is not a postgresql URL); starting a local server"
  fi
  check_user
  resolve_pg_dir
  local version=
  initialized "$PG_DIR" && version=$(<"$PG_DIR/data/PG_VERSION")
  find_bindir "$version"
  PSQL=$(client psql)
  PG_ISREADY=$(client pg_isready)
  resolve_pg_dir create

  local port=$PG_PORT log=$PG_DIR/postgres.log
  if pg_running; then
    port=$(running_port)
    info "already running on 127.0.0.1:$port (data $PG_DIR/data)"
  else
    if tcp_open 127.0.0.1 "$PG_PORT"; then
      die "port $PG_PORT on 127.0.0.1 is taken by another process (see 'ss -ltnp'); choose another with AFTERGLOW_PG_PORT"
    fi
    initialized "$PG_DIR" || init_cluster
    write_conf
    info "starting PostgreSQL on 127.0.0.1:$PG_PORT (data $PG_DIR/data, log $log)"
    local started=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    # The log lives beside data/ so that pg_ctl (running as $PG_USER) can append to it.
    as_pg "$BINDIR/pg_ctl" start -W -s -D "$PG_DIR/data" -l "$log"
    until "$PG_ISREADY" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres -t 2; do
      if ((SECONDS - started >= 3)) && ! pg_running; then
        log_tail "$log"
        die "PostgreSQL exited during startup (log: $log)"
      fi
      if ((SECONDS >= deadline)); then
        log_tail "$log"
        as_pg "$BINDIR/pg_ctl" stop -s -D "$PG_DIR/data" -m immediate >/dev/null 2>&1 || true
        die "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT within ${START_TIMEOUT}s; stopped it (log: $log)"
      fi
      sleep 0.2
    done
    info "ready in $((SECONDS - started))s"
  fi
  ensure_database "$port"
  echo "AFTERGLOW_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:$port/$PG_DB"
}

stop() {
  resolve_pg_dir
  if ! initialized "$PG_DIR"; then
    info "not running (no data in $PG_DIR)"
    return 0
  fi
  check_user
  find_bindir "$(<"$PG_DIR/data/PG_VERSION")"
  if ! pg_running; then
    info "not running"
    return 0
  fi
  info "stopping (data $PG_DIR/data)"
  as_pg "$BINDIR/pg_ctl" stop -s -D "$PG_DIR/data" -m fast -w -t 60
  info "stopped"
}

status() {
  resolve_pg_dir
  if initialized "$PG_DIR"; then
    check_user
    find_bindir "$(<"$PG_DIR/data/PG_VERSION")"
    if pg_running; then
      echo "postgres: running on 127.0.0.1:$(running_port) (data $PG_DIR/data)"
      return 0
    fi
  fi
  echo "postgres: not running"
  return 3
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
