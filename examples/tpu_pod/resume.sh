#!/usr/bin/env bash
# After a preemption (or any stop): recreates the slice if it is gone or preempted,
# sets it up again, and restarts training; zjax resumes from the newest intact
# checkpoint in OUTPUT_DIR. On a healthy slice it only restarts training.
# Usage: ./resume.sh [key=value ...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

state="$(gcloud_tpu tpu-vm list --format='value(name.basename(),state)' \
  | awk -v name="$TPU_NAME" '$1 == name { print $2 }')"
echo "$TPU_NAME: ${state:-absent}"
case "$state" in
  READY) ;;
  "") "$HERE/create.sh" ;;
  PREEMPTED | TERMINATED)
    "$HERE/delete.sh"
    "$HERE/create.sh"
    ;;
  *)
    echo "$TPU_NAME is $state; wait until it is READY (or ./delete.sh it) and rerun" >&2
    exit 1
    ;;
esac
"$HERE/setup.sh"
"$HERE/train.sh" "$@"
