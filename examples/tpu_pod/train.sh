#!/usr/bin/env bash
# Starts `zjax train CONFIG output_dir=OUTPUT_DIR` on every worker at once, detached
# (nohup), each logging to LOG_DIR/train-<hostname>.log on its own disk. zjax calls
# jax.distributed.initialize(), which finds the other workers from the TPU metadata;
# a rerun with the same OUTPUT_DIR resumes from its newest intact checkpoint.
# Usage: ./train.sh [key=value ...]     e.g. ./train.sh steps=20 log_every=1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

# shellcheck disable=SC2034  # read on the workers (remote_bash passes it)
OVERRIDES=("${ZJAX_OVERRIDES[@]}" "$@")

on_all_workers "$(remote_bash REMOTE_DIR LOG_DIR CONFIG OUTPUT_DIR OVERRIDES <<'REMOTE'
set -euo pipefail
cd "$HOME"
mkdir -p "$LOG_DIR"
pidfile="$HOME/$LOG_DIR/train.pid"
log="$HOME/$LOG_DIR/train-$(hostname).log"
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2> /dev/null; then
  echo "$(hostname): zjax is already running (pid $(cat "$pidfile")); ./stop.sh stops it" >&2
  exit 1
fi
cd "$REMOTE_DIR"
echo "=== $(date -u +%FT%TZ) zjax train $CONFIG output_dir=$OUTPUT_DIR ${OVERRIDES[*]}" >> "$log"
# setsid + nohup: the run outlives this ssh session; appending keeps earlier attempts' logs.
setsid nohup .venv/bin/zjax train "$CONFIG" "output_dir=$OUTPUT_DIR" "${OVERRIDES[@]}" \
  >> "$log" 2>&1 < /dev/null &
echo $! > "$pidfile"
echo "$(hostname): started pid $!, logging to $log"
REMOTE
)"
echo "follow with ./logs.sh -f; stop (with a checkpoint) with ./stop.sh"
