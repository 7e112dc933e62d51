#!/usr/bin/env bash
# Deletes the queued resource and all its slices. OUTPUT_DIR on the shared storage is kept.
# Usage: ./delete.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

gcloud_tpu queued-resources delete "$QR_ID" --force --quiet
