#!/usr/bin/env bash
# ../setup.sh with the multislice settings of ./env.sh: copies the project, builds the venv
# and mounts the shared storage on every host of every slice.
# Usage: ./setup.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ZJAX_TPU_ENV="$HERE/env.sh" exec "$HERE/../setup.sh" "$@"
