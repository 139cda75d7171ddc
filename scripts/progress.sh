# Sourced by scripts/setup.sh: `progress WHAT COMMAND...` runs COMMAND and, every
# PROGRESS_EVERY seconds (30) until it ends, prints "|   still WHAT (N s)", so that a long,
# quiet step (pip compiling fairseq-fixed) is never mistaken for a hang. Its exit status is
# COMMAND's.
progress() {
  local what=$1 every=${PROGRESS_EVERY:-30} waited=0 pid
  shift
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq "$every"); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break 2
    done
    waited=$((waited + every))
    echo "|   still $what ($waited s)"
  done
  wait "$pid"
}
