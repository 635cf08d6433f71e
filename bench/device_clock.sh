# Sourced by the device scripts after they set OUT and BUDGET_S: makes $OUT, starts the clock, and
# defines say (a line with the UTC time and the seconds since the start) and left (seconds of
# BUDGET_S left).
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
