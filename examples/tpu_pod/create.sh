#!/usr/bin/env bash
# Creates the TPU VM slice (ACCELERATOR_TYPE, e.g. v5p-128: 16 hosts x 4 chips).
# Usage: ./create.sh        (settings in env.sh)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

RESERVED="${RESERVED:-false}"   # true = use the project's reserved capacity (v5p-128 usually needs it)

flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "$SPOT" == true ]]; then
  flags+=(--spot)
fi
if [[ "$RESERVED" == true ]]; then
  flags+=(--reserved)
fi

echo "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $PROJECT/$ZONE"
gcloud_tpu tpu-vm create "$TPU_NAME" "${flags[@]}"
gcloud_tpu tpu-vm describe "$TPU_NAME" --format='value(state)'
