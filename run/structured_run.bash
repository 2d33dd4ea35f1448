#!/usr/bin/env bash
# Study A with structured tickets, after (or instead of) bash run/vqa_run.bash: the same experiment and dense
# fine-tunes, pruned by attention heads, by feed-forward neurons, and with N:M masks in groups of 4 (2:4 at
# 50 %); tables and plots in result/<experiment>/lottery_heads*, lottery_neurons*, lottery_nm4*.
# One granularity alone: bash run/vqa_run.bash lottery.granularity=heads
# Then the accuracy-against-speed-up picture and latency table: python -m bench.inference
# Real data: CONFIG=run/configs/vqa_v2.yaml bash run/structured_run.bash; overrides apply to every run.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
bash "$here/vqa_run.bash" lottery.granularity=heads "$@"
bash "$here/vqa_run.bash" lottery.granularity=neurons "$@"
bash "$here/vqa_run.bash" lottery.granularity=n_m "lottery.levels=[0.25,0.5,0.75]" "$@"
