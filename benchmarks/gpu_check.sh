#!/usr/bin/env bash
# Another name for benchmarks/device_check.sh (same arguments), which older command lines use.
exec bash "$(dirname "$0")/device_check.sh" "$@"
