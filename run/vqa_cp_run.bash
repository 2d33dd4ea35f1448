#!/usr/bin/env bash
# Study B: compress and debias. Stage 1 fine-tunes the full model with BCE / LMH / LPF, stage 2 learns
# masks at each sparsity with its own loss (settings <stage-1 loss>-<stage-2 loss>), stage 3 fine-tunes
# the pruned models with the mask fixed, plus a lottery-ticket baseline; rows, table and plots in
# result/<experiment>/debias.*. Default: the embedded benchmark (no data or weights needed).
# Real data: CONFIG=run/configs/vqa_cp_v2.yaml bash run/vqa_cp_run.bash
# Single values can be overridden: bash run/vqa_cp_run.bash seeds=[0,1,2] debias.sparsities=[0.3,0.5,0.7]
# Several GPUs: NPROC=8 bash run/vqa_cp_run.bash (launches torchrun --nproc_per_node 8)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.bash"
CONFIG="${CONFIG:-run/configs/embedded_cp.yaml}"
launch debias "$@"
