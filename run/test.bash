#!/usr/bin/env bash
# The test suite (one pytest process, a few minutes on 2 CPU cores). Sets up the environment if needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.bash"
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
