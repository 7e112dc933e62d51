#!/usr/bin/env bash
# Requests NUM_SLICES slices of ACCELERATOR_TYPE as one queued resource and waits
# until it is ACTIVE. The TPU runtime sets the MEGASCALE_* variables on every host,
# so jax.distributed.initialize() (called by zjax train) joins all slices.
# Usage: ./create.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

RESERVED="${RESERVED:-false}"     # true = use the project's reserved capacity
POLL_SECONDS="${POLL_SECONDS:-60}"

flags=(--accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION"
  --node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
if [[ "$SPOT" == true ]]; then
  flags+=(--spot)
fi
if [[ "$RESERVED" == true ]]; then
  flags+=(--reserved)
fi

echo "requesting $NUM_SLICES x $ACCELERATOR_TYPE as queued resource $QR_ID in $PROJECT/$ZONE"
gcloud_tpu queued-resources create "$QR_ID" "${flags[@]}"
while true; do
  state="$(gcloud_tpu queued-resources describe "$QR_ID" --format='value(state.state)')"
  echo "$(date -u +%TZ) $QR_ID: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED)
      echo "$QR_ID will not become ACTIVE; ./delete.sh it and request again" >&2
      exit 1
      ;;
  esac
  sleep "$POLL_SECONDS"
done
