#!/usr/bin/env bash
# Shows the end of every worker's training log, each line prefixed with its host.
# Usage: ./logs.sh [-f]      -f keeps following (Ctrl-C stops following, not training)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${ZJAX_TPU_ENV:-$HERE/env.sh}"

LOG_LINES="${LOG_LINES:-20}"   # lines shown per worker
FOLLOW=false
if [[ "${1:-}" == -f ]]; then
  # shellcheck disable=SC2034  # read on the workers (remote_bash passes it)
  FOLLOW=true
fi

on_all_workers "$(remote_bash LOG_DIR LOG_LINES FOLLOW <<'REMOTE'
set -euo pipefail
log="$HOME/$LOG_DIR/train-$(hostname).log"
if [[ ! -f "$log" ]]; then
  echo "$(hostname): no log yet ($log)"
  exit 0
fi
flags=(-n "$LOG_LINES")
if [[ "$FOLLOW" == true ]]; then
  flags+=(-F)
fi
# tqdm redraws its bar with carriage returns; show each redraw as its own line.
tail "${flags[@]}" "$log" | stdbuf -oL tr '\r' '\n' | sed -u "s/^/$(hostname): /"
REMOTE
)"
