#!/usr/bin/env bash
# The main job: the lottery-ticket study (dense fine-tune, then low-magnitude / random / high-magnitude
# pruning with rewinding at every sparsity level), with plots and tables in result/<experiment>/.
# Default: the embedded benchmark (no data or weights needed). Real data: CONFIG=run/configs/vqa_v2.yaml
# Single values can be overridden: bash run/vqa_run.bash seeds=[0,1,2] train.epochs=2
# Several GPUs: NPROC=8 bash run/vqa_run.bash (launches torchrun --nproc_per_node 8)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.bash"
CONFIG="${CONFIG:-run/configs/embedded.yaml}"
launch lottery "$@"
