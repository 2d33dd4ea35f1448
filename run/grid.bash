#!/usr/bin/env bash
# One task of a grid (a Slurm array task, or one process per GPU of a box): the project's environment and one
# `python -m lxmert` process that takes units of the experiment until none is left for it (docs/RUNNING.md).
#   bash run/grid.bash lottery run/configs/vqa_v2.yaml --only 'seed_*/dense'
#   bash run/grid.bash debias run/configs/vqa_cp_v2.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.bash"
command="$1"; CONFIG="$2"; shift 2
exec "$PY" -m lxmert "$command" --config "$CONFIG" --workers 1 "$@"
