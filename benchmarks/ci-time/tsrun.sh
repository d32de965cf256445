#!/usr/bin/env bash
# Run a command; prefix each line of its output with the seconds since it started.
start=$(date +%s)
"$@" 2>&1 | while IFS= read -r line; do printf '%5d %s\n' "$(( $(date +%s) - start ))" "$line"; done
exit "${PIPESTATUS[0]}"
