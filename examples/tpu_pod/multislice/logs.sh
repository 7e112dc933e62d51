#!/usr/bin/env bash
# ../logs.sh with the multislice settings of ./env.sh: the end of every host's log.
# Usage: ./logs.sh [-f]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ZJAX_TPU_ENV="$HERE/env.sh" exec "$HERE/../logs.sh" "$@"
