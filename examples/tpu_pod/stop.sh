#!/usr/bin/env bash
# Sends SIGTERM to zjax on every worker: zjax finishes its step, saves a checkpoint
# to OUTPUT_DIR and exits 0. Waits up to STOP_TIMEOUT seconds for the save.
# Usage: ./stop.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

STOP_TIMEOUT="${STOP_TIMEOUT:-600}"   # seconds; a 7B ZeRO-3 checkpoint is ~80 GB in all

on_all_workers "$(remote_bash LOG_DIR STOP_TIMEOUT <<'REMOTE'
set -euo pipefail
pidfile="$HOME/$LOG_DIR/train.pid"
if ! { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2> /dev/null; }; then
  echo "$(hostname): zjax is not running"
  exit 0
fi
pid="$(cat "$pidfile")"
kill -TERM "$pid"
SECONDS=0
while (( SECONDS < STOP_TIMEOUT )); do
  if ! kill -0 "$pid" 2> /dev/null; then
    echo "$(hostname): zjax (pid $pid) saved and exited"
    exit 0
  fi
  sleep 0.2
done
echo "$(hostname): zjax (pid $pid) still running after ${STOP_TIMEOUT}s; see its log" >&2
exit 1
REMOTE
)"
