#!/usr/bin/env bash
# The main job: set up .venv and run the embedded all-in-one demo (no broker).
set -euo pipefail
source "$(dirname "$0")/venv.sh" demo
exec "$VENV/bin/cellagent-demo" "$@"
