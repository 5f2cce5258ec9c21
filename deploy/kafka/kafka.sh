#!/usr/bin/env bash
# Single-node local Kafka (KRaft, broker and controller in one JVM) for development,
# tests and benchmarks. No Kafka distribution needed: the jars come from Maven Central.
#
# Usage: deploy/kafka/kafka.sh fetch|start|stop|status
#
# Environment:
#   AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS  if set and answering, `start` uses it and starts nothing
#   AFTERGLOW_KAFKA_VERSION            Kafka version (default 4.1.1)
#   AFTERGLOW_CACHE_DIR                jar cache (default $HOME/.cache/afterglow)
#   AFTERGLOW_RUN_DIR                  state folder parent (default <repo>/.run; Kafka uses <run>/kafka)
#   AFTERGLOW_KAFKA_PORT               broker port on 127.0.0.1 (default 9092)
#   AFTERGLOW_KAFKA_CONTROLLER_PORT    KRaft controller port on 127.0.0.1 (default 9093)
#   AFTERGLOW_KAFKA_HEAP               JVM heap options (default "-Xmx512m -Xms128m")
#   AFTERGLOW_KAFKA_START_TIMEOUT      seconds to wait for the broker (default 90)
#   JAVA_HOME                          Java 17+ to use (default: java on PATH)
#
# `start` prints AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=host:port as the last stdout line;
# all progress messages go to stderr.
set -euo pipefail

PROG=kafka.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

KAFKA_VERSION=${AFTERGLOW_KAFKA_VERSION:-4.1.1}
CACHE_DIR=${AFTERGLOW_CACHE_DIR:-${HOME:?HOME is not set}/.cache/afterglow}
DIST_DIR=$CACHE_DIR/kafka-$KAFKA_VERSION
LIB_DIR=$DIST_DIR/libs
FETCHED_MARKER=$DIST_DIR/.fetch-complete
STATE_DIR=$RUN_DIR/kafka
DATA_DIR=$STATE_DIR/data
PROPS=$STATE_DIR/server.properties
PID_FILE=$STATE_DIR/kafka.pid
LOG_FILE=$STATE_DIR/kafka.log
PORT=${AFTERGLOW_KAFKA_PORT:-9092}
CONTROLLER_PORT=${AFTERGLOW_KAFKA_CONTROLLER_PORT:-9093}
HEAP=${AFTERGLOW_KAFKA_HEAP:--Xmx512m -Xms128m}
START_TIMEOUT=${AFTERGLOW_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=30

require_port AFTERGLOW_KAFKA_PORT "$PORT"
require_port AFTERGLOW_KAFKA_CONTROLLER_PORT "$CONTROLLER_PORT"
require_uint AFTERGLOW_KAFKA_START_TIMEOUT "$START_TIMEOUT"
[[ $PORT != "$CONTROLLER_PORT" ]] || die "broker and controller ports must differ (both $PORT)"

JAVA=
require_java() {
  [[ -z $JAVA ]] || return 0
  local java=java version major
  [[ -n ${JAVA_HOME:-} ]] && java=$JAVA_HOME/bin/java
  command -v "$java" >/dev/null 2>&1 ||
    die "Java not found ('$java'): Kafka $KAFKA_VERSION needs Java 17 or newer (install e.g. openjdk-17-jre-headless, or set JAVA_HOME)"
  version=$("$java" -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)
  major=${version#1.}
  major=${major%%[.+-]*}
  if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
    die "Kafka $KAFKA_VERSION needs Java 17 or newer; '$java' is version '${version:-unknown}' (set JAVA_HOME)"
  fi
  JAVA=$java
}

jars_present() {
  [[ -f $FETCHED_MARKER && -f $LIB_DIR/kafka_2.13-$KAFKA_VERSION.jar ]]
}

fetch() {
  if jars_present; then
    info "Kafka $KAFKA_VERSION jars already in $LIB_DIR"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 ||
    die "Maven ('mvn') not found: it is needed once to download the Kafka $KAFKA_VERSION jars into $LIB_DIR (install e.g. the 'maven' package)"
  require_java
  mkdir -p "$DIST_DIR"
  # The lock makes a second concurrent fetch wait instead of mixing jars; the subshell
  # keeps the lock descriptor away from the broker started later.
  (
    flock 9
    jars_present && exit 0
    rm -rf "$LIB_DIR" "$LIB_DIR.partial" "$FETCHED_MARKER"
    cp "$HERE/pom.xml" "$DIST_DIR/pom.xml"
    info "downloading Kafka $KAFKA_VERSION jars with Maven into $LIB_DIR"
    if ! mvn -q -B -Dstyle.color=never -f "$DIST_DIR/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$LIB_DIR.partial" >"$DIST_DIR/mvn.log" 2>&1; then
      log_tail "$DIST_DIR/mvn.log"
      die "Maven could not download Kafka $KAFKA_VERSION (full log: $DIST_DIR/mvn.log)"
    fi
    [[ -f $LIB_DIR.partial/kafka_2.13-$KAFKA_VERSION.jar ]] ||
      die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing in $LIB_DIR.partial"
    mv "$LIB_DIR.partial" "$LIB_DIR"
    date -u '+%Y-%m-%dT%H:%M:%SZ' >"$FETCHED_MARKER"
    info "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars ($(du -sh "$LIB_DIR" | cut -f1))"
  ) 9>"$DIST_DIR/.lock"
}

# running_pid: prints the broker pid when the pid file names a live broker of this state dir.
running_pid() {
  local pid cmdline
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  # Checking the command line guards against a recycled pid (and a zombie has none).
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"kafka.Kafka $PROPS"* ]] || return 1
  echo "$pid"
}

# pid_alive PID: true until the process is fully gone. A JVM shows as a zombie while its
# other threads still hold the ports, so a zombie counts as alive.
pid_alive() {
  [[ -e /proc/$1 ]]
}

running_bootstrap() {
  local listener
  listener=$(sed -n 's/^advertised\.listeners=PLAINTEXT:\/\///p' "$PROPS" 2>/dev/null)
  echo "${listener:-127.0.0.1:$PORT}"
}

bootstrap_answers() {
  local server
  local -a servers
  IFS=, read -r -a servers <<<"$1"
  for server in "${servers[@]}"; do
    server=${server//[[:space:]]/}
    server=${server#*://}
    split_host_port "$server" 9092 || continue
    tcp_open "$HP_HOST" "$HP_PORT" && return 0
  done
  return 1
}

write_properties() {
  cat >"$PROPS" <<EOF
# Generated by deploy/kafka/kafka.sh at every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR

num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0

offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the default 50: faster first consumer group / transaction
# on one node, fewer files on disk.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

# Keep the disk small: one day of data, small segments and indexes.
log.retention.hours=24
log.retention.check.interval.ms=60000
log.segment.bytes=16777216
log.index.size.max.bytes=1048576
offsets.topic.segment.bytes=16777216
transaction.state.log.segment.bytes=16777216
metadata.log.segment.bytes=8388608
metadata.max.retention.bytes=67108864
# The compaction buffer (default 128 MiB) lives on the heap; a quarter of 512 MiB is too much.
log.cleaner.dedupe.buffer.size=33554432
EOF
}

kafka_tool() {
  "$JAVA" -Xmx256m -cp "$LIB_DIR/*" "$@"
}

format_storage() {
  if [[ -f $DATA_DIR/meta.properties ]]; then
    return 0
  fi
  # No meta.properties means nothing was ever stored, so a leftover folder is safe to drop.
  rm -rf "$DATA_DIR"
  local cluster_id
  cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
  [[ -n $cluster_id ]] || die "kafka.tools.StorageTool random-uuid printed nothing"
  info "formatting storage in $DATA_DIR (cluster id $cluster_id)"
  if ! kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" >"$STATE_DIR/format.log" 2>&1; then
    log_tail "$STATE_DIR/format.log"
    rm -rf "$DATA_DIR"
    die "formatting the Kafka storage failed"
  fi
}

start() {
  if [[ -n ${AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS:-} ]]; then
    if bootstrap_answers "$AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS"; then
      info "using the running Kafka at $AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (from AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS); not starting one"
      echo "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=$AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS"
      return 0
    fi
    info "nothing answers at AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=$AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS; starting a local broker"
  fi

  local pid bootstrap
  if pid=$(running_pid); then
    bootstrap=$(running_bootstrap)
    info "already running (pid $pid) on $bootstrap"
    echo "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=$bootstrap"
    return 0
  fi
  rm -f "$PID_FILE"

  local port
  for port in "$PORT" "$CONTROLLER_PORT"; do
    if tcp_open 127.0.0.1 "$port"; then
      die "port $port on 127.0.0.1 is taken by another process (see 'ss -ltnp'); choose others with AFTERGLOW_KAFKA_PORT / AFTERGLOW_KAFKA_CONTROLLER_PORT"
    fi
  done

  require_java
  fetch
  mkdir -p "$STATE_DIR"
  write_properties
  format_storage

  [[ -f $LOG_FILE ]] && mv -f "$LOG_FILE" "$LOG_FILE.1"
  local -a heap_opts
  read -r -a heap_opts <<<"$HEAP"
  info "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (log: $LOG_FILE)"
  # setsid + nohup: the broker must outlive this script and its terminal. The inner shell
  # writes its own pid before exec, so the pid file names the JVM even if setsid forks.
  # shellcheck disable=SC2016
  setsid nohup bash -c 'echo "$$" >"$1"; shift; exec "$@"' _ "$PID_FILE" \
    "$JAVA" "${heap_opts[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat="yyyy-MM-dd'T'HH:mm:ss.SSS" \
    -cp "$LIB_DIR/*" kafka.Kafka "$PROPS" \
    >"$LOG_FILE" 2>&1 </dev/null &

  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  while :; do
    if grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null && tcp_open 127.0.0.1 "$PORT"; then
      break
    fi
    if ((SECONDS - started >= 5)) && ! running_pid >/dev/null; then
      log_tail "$LOG_FILE"
      rm -f "$PID_FILE"
      die "the broker exited during startup (log: $LOG_FILE)"
    fi
    if ((SECONDS >= deadline)); then
      log_tail "$LOG_FILE"
      stop >/dev/null 2>&1 || true
      die "the broker did not serve on 127.0.0.1:$PORT within ${START_TIMEOUT}s; stopped it (log: $LOG_FILE)"
    fi
    sleep 0.3
  done
  pid=$(running_pid) || die "the broker started but its pid file $PID_FILE is not valid"
  info "ready in $((SECONDS - started))s (pid $pid)"
  echo "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$PID_FILE"
    info "not running"
    return 0
  fi
  info "stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do
    sleep 0.3
  done
  if pid_alive "$pid"; then
    info "still running after ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    # Wait for the exit so the ports are free when this returns.
    deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do
      sleep 0.2
    done
  fi
  rm -f "$PID_FILE"
  info "stopped"
}

status() {
  local pid
  if pid=$(running_pid); then
    echo "kafka: running (pid $pid) on $(running_bootstrap)"
    return 0
  fi
  echo "kafka: not running"
  return 3
}

case ${1:-} in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 fetch|start|stop|status" >&2
    exit 2
    ;;
esac
