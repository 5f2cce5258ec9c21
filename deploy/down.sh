#!/usr/bin/env bash
# Stop the local Kafka and PostgreSQL started by deploy/up.sh (data is kept) and remove
# <run dir>/env. Servers reused through AFTERGLOW_* variables are left alone.
set -euo pipefail

PROG=down.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

rc=0
"$HERE/kafka/kafka.sh" stop || rc=1
"$HERE/postgres/postgres.sh" stop || rc=1
rm -f "$RUN_DIR/env"
exit "$rc"
