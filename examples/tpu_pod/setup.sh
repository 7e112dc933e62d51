#!/usr/bin/env bash
# Copies the project to every worker, creates its venv with zjax and jax[tpu], and
# mounts the shared storage that holds OUTPUT_DIR. Safe to rerun (resume.sh does).
# Usage: ./setup.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

if [[ -z "$NFS_SHARE" && -z "$GCS_BUCKET" ]]; then
  echo "warning: neither NFS_SHARE nor GCS_BUCKET is set, so $OUTPUT_DIR is a separate local" \
    "directory on each worker: checkpoints need one directory all workers share, and a" \
    "preempted VM loses its disk" >&2
fi

TARBALL_NAME="zjax-src.tar.gz"
tarball="$(mktemp -d)/$TARBALL_NAME"
trap 'rm -rf "$(dirname "$tarball")"' EXIT

# Tracked and untracked-but-not-ignored files: no .venv, runs/ or caches.
git -C "$ZJAX_ROOT" ls-files -z --cached --others --exclude-standard \
  | tar -czf "$tarball" -C "$ZJAX_ROOT" --null -T -
echo "copying $(du -h "$tarball" | cut -f1) of project files to every worker"
copy_to_all_workers "$tarball" "$TARBALL_NAME"

on_all_workers "$(remote_bash TARBALL_NAME REMOTE_DIR PYTHON_VERSION JAX_VERSION NFS_SHARE GCS_BUCKET \
    MOUNT_POINT OUTPUT_DIR <<'REMOTE'
set -euo pipefail
cd "$HOME"
# Replace the previous copy but keep its venv, so a rerun only reinstalls zjax.
mkdir -p "$REMOTE_DIR"
find "$REMOTE_DIR" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -xzf "$TARBALL_NAME" -C "$REMOTE_DIR"
rm -f "$TARBALL_NAME"

# uv brings its own Python: the TPU image's python3 may be older than zjax's jax needs.
export PATH="$HOME/.local/bin:$PATH"
command -v uv > /dev/null || python3 -m pip install --user --quiet uv
cd "$REMOTE_DIR"
[[ -x .venv/bin/python ]] || uv venv --quiet --python "$PYTHON_VERSION" .venv
uv pip install --quiet --python .venv/bin/python -e . "jax[tpu]==$JAX_VERSION"

if [[ -n "$NFS_SHARE" ]] && ! mountpoint -q "$MOUNT_POINT"; then
  command -v mount.nfs > /dev/null || { sudo apt-get update -q && sudo apt-get install -y -q nfs-common; }
  sudo mkdir -p "$MOUNT_POINT"
  sudo mount -t nfs -o rw,hard "$NFS_SHARE" "$MOUNT_POINT"
elif [[ -z "$NFS_SHARE" && -n "$GCS_BUCKET" ]] && ! mountpoint -q "$MOUNT_POINT"; then
  if ! command -v gcsfuse > /dev/null; then
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p "$MOUNT_POINT"
  sudo chown "$(id -u):$(id -g)" "$MOUNT_POINT"
  # Orbax commits a checkpoint by renaming its temporary directory; gcsfuse only
  # renames directories with fewer entries than this limit.
  gcsfuse --implicit-dirs --rename-dir-limit=1000000 "$GCS_BUCKET" "$MOUNT_POINT"
fi
if ! mkdir -p "$OUTPUT_DIR" 2> /dev/null; then
  sudo mkdir -p "$OUTPUT_DIR"
  sudo chown "$(id -u):$(id -g)" "$OUTPUT_DIR"
fi
echo "$(hostname): $(.venv/bin/python -c 'import jax, zjax; print("jax", jax.__version__)'), output_dir $OUTPUT_DIR"
REMOTE
)"
