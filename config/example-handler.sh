#!/bin/sh
# Example spoold handler: reports what it got, and fails in the ways a real handler might, so
# that retries and failed/ can be watched. Arguments: the job file, its ID, the attempt number.
set -eu
job="$1" id="$2" attempt="$3"
first=$(head -n 1 "$job" || true)
echo "$GREETING: job $id, attempt $attempt, $(wc -c < "$job") bytes, first line: $first"
case "$first" in
  bad) echo "cannot process a job that says 'bad'" >&2; exit 65 ;;   # permanent: straight to failed/
  flaky) [ "$attempt" -ge 2 ] || { echo "flaky job fails its first attempt" >&2; exit 1; } ;;
  slow) sleep 10 ;;
esac
echo "job $id done"
