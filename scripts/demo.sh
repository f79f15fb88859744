#!/usr/bin/env bash
# The README's first command: install what is missing, build, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh
exec cargo run --release -- demo "$@"
