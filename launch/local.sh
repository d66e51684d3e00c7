#!/usr/bin/env bash
# Run a recipe on this machine: sets up .venv if needed, then `cispo train RECIPE [key=value ...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
exec .venv/bin/cispo train "$@"
