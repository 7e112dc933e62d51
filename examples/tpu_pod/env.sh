#!/usr/bin/env bash
# shellcheck disable=SC2034  # the settings are read by the scripts that source this file
# Every setting of the TPU pod scripts. The other scripts source this file; edit the
# values here, or set any of them in the environment (PROJECT=... ./create.sh).
# Run it on its own (./env.sh) to print the values the scripts will use.
set -euo pipefail

# --- Where the TPU lives -------------------------------------------------------------
PROJECT="${PROJECT:-my-gcp-project}"        # Google Cloud project id
ZONE="${ZONE:-us-east5-a}"                  # a zone with v5p capacity (us-east5-a, europe-west4-b, ...)
TPU_NAME="${TPU_NAME:-zjax-v5p-128}"        # name of the TPU VM (single slice)
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-128}"   # v5p-128 = 64 chips on 16 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"  # TPU VM image for v5p
SPOT="${SPOT:-false}"                       # true = Spot capacity: cheaper, preemptible

# --- What runs on it -----------------------------------------------------------------
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"    # uv fetches this Python on the workers (zjax's jax needs >= 3.11)
JAX_VERSION="${JAX_VERSION:-0.10.2}"        # must match the jax pin in pyproject.toml
REMOTE_DIR="${REMOTE_DIR:-zjax}"            # project copy on each worker, relative to the remote home
LOG_DIR="${LOG_DIR:-zjax-logs}"             # per-worker logs and pid file, relative to the remote home
CONFIG="${CONFIG:-configs/llama7b_v5p128.yaml}"   # relative to the project root

# --- Storage every worker shares (checkpoints must outlive a preempted VM) ------------
# zjax writes output_dir with ordinary file I/O, so it must be a POSIX path that is
# the same directory on every worker: a Filestore NFS share (best: atomic renames) or
# a Cloud Storage bucket mounted with Cloud Storage FUSE. setup.sh mounts whichever is set.
NFS_SHARE="${NFS_SHARE:-}"                  # e.g. 10.0.0.2:/zjax (Filestore IP:/share); takes precedence
GCS_BUCKET="${GCS_BUCKET:-}"                # e.g. my-bucket (no gs://), mounted with gcsfuse
MOUNT_POINT="${MOUNT_POINT:-/mnt/zjax}"     # where the share is mounted on every worker
OUTPUT_DIR="${OUTPUT_DIR:-$MOUNT_POINT/runs/llama7b_v5p128}"   # checkpoints, metrics.jsonl

# --- Multislice (examples/tpu_pod/multislice/env.sh sets these) ------------------------
NUM_SLICES="${NUM_SLICES:-1}"               # > 1: a queued resource of NUM_SLICES nodes
QR_ID="${QR_ID:-$TPU_NAME-qr}"              # queued resource id (multislice only)

# Extra zjax overrides passed to every `zjax train` (the scripts' arguments add more).
ZJAX_OVERRIDES=()
if (( NUM_SLICES > 1 )); then
  # One full replica per slice across the data-center network; ZeRO shards inside a slice.
  ZJAX_OVERRIDES+=("mesh.replica=$NUM_SLICES")
fi

# --- Helpers the scripts share ---------------------------------------------------------
# The project root: the scripts copy it to the workers and read CONFIG from it.
ZJAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# gcloud compute tpus SUBCOMMAND ... in this project and zone.
gcloud_tpu() {
  gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE"
}

# Runs one shell command line on every worker of every slice, all at once.
on_all_workers() {
  if (( NUM_SLICES > 1 )); then
    gcloud_tpu queued-resources ssh "$QR_ID" --node=all --worker=all --command="$1"
  else
    gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker=all --command="$1"
  fi
}

# Copies a local file to a path (relative to the remote home) on every worker.
copy_to_all_workers() {
  if (( NUM_SLICES > 1 )); then
    gcloud_tpu queued-resources scp "$1" "$QR_ID:$2" --node=all --worker=all
  else
    gcloud_tpu tpu-vm scp "$1" "$TPU_NAME:$2" --worker=all
  fi
}

# A `bash -c` command line that defines the named variables (arrays too, via declare -p)
# and then runs the script text on stdin; the values arrive on the worker exactly.
remote_bash() {
  local script
  script="$(declare -p "$@")"$'\n'"$(cat)"
  printf 'bash -c %q' "$script"
}

# Prints the settings the scripts will use.
print_settings() {
  local name
  for name in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT PYTHON_VERSION JAX_VERSION \
      REMOTE_DIR LOG_DIR CONFIG NFS_SHARE GCS_BUCKET MOUNT_POINT OUTPUT_DIR NUM_SLICES QR_ID; do
    printf '%s=%q\n' "$name" "${!name}"
  done
  printf 'ZJAX_OVERRIDES=(%s)\n' "${ZJAX_OVERRIDES[*]}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  print_settings
fi
