#!/usr/bin/env bash
# shellcheck disable=SC2034  # the settings are read by the scripts that source this file
# Multislice settings: NUM_SLICES slices of ACCELERATOR_TYPE in one queued resource,
# joined over the data-center network. Everything else comes from ../env.sh.
# Run it on its own (./env.sh) to print the values the scripts will use.
set -euo pipefail

NUM_SLICES="${NUM_SLICES:-2}"                  # slices; each holds a full ZeRO-3 replica
QR_ID="${QR_ID:-zjax-v5p-128x$NUM_SLICES}"     # queued resource id
TPU_NAME="${TPU_NAME:-$QR_ID}"                 # node prefix: the nodes are named after it
OUTPUT_DIR="${OUTPUT_DIR:-${MOUNT_POINT:-/mnt/zjax}/runs/llama7b_v5p128x$NUM_SLICES}"

# shellcheck source=../env.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/env.sh"

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  print_settings
fi
