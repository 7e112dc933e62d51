#!/usr/bin/env bash
# ../stop.sh with the multislice settings of ./env.sh: SIGTERM to zjax on every host; it saves and exits.
# Usage: ./stop.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ZJAX_TPU_ENV="$HERE/env.sh" exec "$HERE/../stop.sh" "$@"
