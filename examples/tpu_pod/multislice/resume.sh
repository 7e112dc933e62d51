#!/usr/bin/env bash
# After a preemption: re-requests the slices if the queued resource is gone, failed or
# suspended, sets every host up again and restarts training; zjax resumes from the
# newest intact checkpoint in OUTPUT_DIR.
# Usage: ./resume.sh [key=value ...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

state="$(gcloud_tpu queued-resources list --format='value(name.basename(),state.state)' \
  | awk -v name="$QR_ID" '$1 == name { print $2 }')"
echo "$QR_ID: ${state:-absent}"
case "$state" in
  ACTIVE) ;;
  "") "$HERE/create.sh" ;;
  FAILED | SUSPENDED)
    "$HERE/delete.sh"
    "$HERE/create.sh"
    ;;
  *)
    echo "$QR_ID is $state; wait until it is ACTIVE (or ./delete.sh it) and rerun" >&2
    exit 1
    ;;
esac
"$HERE/setup.sh"
"$HERE/train.sh" "$@"
