#!/usr/bin/env bash
# ../train.sh with the multislice settings of ./env.sh: starts zjax train on every host of every
# slice with mesh.replica=NUM_SLICES (one ZeRO-3 replica per slice).
# Usage: ./train.sh [key=value ...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ZJAX_TPU_ENV="$HERE/env.sh" exec "$HERE/../train.sh" "$@"
