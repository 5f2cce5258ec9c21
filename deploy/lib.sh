# Helpers shared by the deploy scripts; sourced, never run on its own.
# shellcheck shell=bash

AFTERGLOW_REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
RUN_DIR=${AFTERGLOW_RUN_DIR:-$AFTERGLOW_REPO_DIR/.run}
case $RUN_DIR in
  /*) ;;
  *) RUN_DIR=$PWD/$RUN_DIR ;;
esac

info() { printf '%s: %s\n' "${PROG:-deploy}" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "${PROG:-deploy}" "$*" >&2
  exit 1
}

require_uint() { # NAME VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a number, got '$2'"
}

require_port() { # NAME VALUE
  require_uint "$1" "$2"
  ((10#$2 >= 1 && 10#$2 <= 65535)) || die "$1 must be a TCP port (1-65535), got '$2'"
}

# tcp_open HOST PORT: true when something accepts a TCP connection there.
tcp_open() {
  local host=$1 port=$2
  host=${host#[}
  host=${host%]}
  # shellcheck disable=SC2016 # $1/$2 expand in the child shell
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
}

# split_host_port HOST:PORT DEFAULT_PORT: sets HP_HOST and HP_PORT; IPv6 as [::1]:5432.
split_host_port() {
  local hp=$1
  HP_PORT=$2
  if [[ $hp == \[*\]* ]]; then
    HP_HOST=${hp%%]*}
    HP_HOST=${HP_HOST#[}
    hp=${hp#*]}
    [[ $hp == :?* ]] && HP_PORT=${hp#:}
  elif [[ $hp == *:* ]]; then
    HP_HOST=${hp%:*}
    HP_PORT=${hp##*:}
  else
    HP_HOST=$hp
  fi
  [[ -n $HP_HOST && $HP_PORT =~ ^[0-9]+$ ]]
}

# log_tail FILE: show why a server did not come up.
log_tail() {
  if [[ -s $1 ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2
    printf -- '-----\n' >&2
  fi
}
