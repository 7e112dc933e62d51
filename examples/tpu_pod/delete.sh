#!/usr/bin/env bash
# Deletes the TPU VM slice. OUTPUT_DIR lives on the shared storage and is kept.
# Usage: ./delete.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

gcloud_tpu tpu-vm delete "$TPU_NAME" --quiet
