#!/bin/sh
# A persistent spoold handler in shell (handler.mode = "persistent"): one JSON line per job on
# stdin, one JSON answer per job on stdout. It assumes job names that need no JSON escaping
# (what `spoold enqueue` makes); use the Python example for anything else.
while IFS= read -r line; do
    id=$(printf '%s\n' "$line" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
    path=$(printf '%s\n' "$line" | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
    if grep -q '^bad' "$path"; then status=65; else status=0; fi
    echo "handled $(wc -c < "$path") bytes" >&2
    printf '{"id":"%s","status":%d}\n' "$id" "$status"
done
