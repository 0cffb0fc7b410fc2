#!/usr/bin/env bash
# The paper's Table 4/5 headline cell (AG News, imbalance 20 + uniform noise 0.4) at BERT-base scale on
# the full data, on one GPU: every method on the same corrupted data, then eval and weights.
#
#   MODEL=/path/to/bert-base-uncased DATA=../shared/data/ag_news bash benchmarks/gpu.sh
#
# Environment (defaults are the paper's §4.4 settings where it gives them):
#   MODEL     model folder or hub id [bert-base-uncased]
#   DATA      folder with train.parquet and test.parquet (has_title rows are used) [../shared/data/ag_news]
#   OUT       output folder [bench-work/gpu]
#   EPOCHS 10, LR 1e-5, BATCH 30, MAXLEN 128, META 100 (clean rows per class), POOL 500, NMAX (head) unset
#   METHODS "plain plain-meta meta-only mwnet mlrnet", DEVICE auto, SEED 1
# CPU check with a tiny model: MODEL=tiny-folder EPOCHS=1 NMAX=60 POOL=20 META=5 MAXLEN=32 DEVICE=cpu
set -euo pipefail
MODEL="${MODEL:-bert-base-uncased}"
DATA="${DATA:-$(dirname "$0")/../../shared/data/ag_news}"
OUT="${OUT:-bench-work/gpu}"
EPOCHS="${EPOCHS:-10}" LR="${LR:-1e-5}" BATCH="${BATCH:-30}" MAXLEN="${MAXLEN:-128}"
META="${META:-100}" POOL="${POOL:-500}" SEED="${SEED:-1}" DEVICE="${DEVICE:-auto}"
METHODS="${METHODS:-plain plain-meta meta-only mwnet mlrnet}"
mkdir -p "$OUT"
python - "$DATA" "$OUT" <<'PY'
import sys, pyarrow.parquet as pq
src, out = sys.argv[1], sys.argv[2]
t = pq.read_table(f"{src}/train.parquet")
if "has_title" in t.column_names:
    t = t.filter(t["has_title"])
pq.write_table(t.select(["text", "label"]), f"{out}/train.parquet")
pq.write_table(pq.read_table(f"{src}/test.parquet").select(["text", "label"]), f"{out}/test.parquet")
PY
base="$OUT/base"
nmax=(); [ -n "${NMAX:-}" ] && nmax=(--n-max "$NMAX")
stage=(--model "$MODEL" --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH" --max-length "$MAXLEN" --device "$DEVICE" --seed "$SEED")
mlrnet corrupt -w "$base" --data "$OUT/train.parquet" --test-data "$OUT/test.parquet" --imbalance 20 \
  --noise uniform:0.4 --meta-pool-per-class "$POOL" --seed "$SEED" "${nmax[@]}"
mlrnet collect-losses -w "$base" "${stage[@]}" --json > "$OUT/collect.json"
for m in $METHODS; do
  ws="$OUT/$m"; mkdir -p "$ws"
  for f in data cache losses.safetensors stage1; do [ -e "$ws/$f" ] || ln -s "$(realpath "$base/$f")" "$ws/$f"; done
  start=$(date +%s)
  mlrnet train -w "$ws" --method "$m" --meta-per-class "$META" "${stage[@]}" --json > "$OUT/$m-train.json"
  echo "$m train: $(( $(date +%s) - start )) s" >&2
  mlrnet eval -w "$ws" --device "$DEVICE" --json > "$OUT/$m-eval.json"
  case "$m" in mwnet|mlrnet) mlrnet weights -w "$ws" --json > "$OUT/$m-weights.json" ;; esac
done
python - "$OUT" $METHODS <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
print(f"| method | accuracy % | macro-F1 % | weight AUROC |\n|---|---|---|---|")
for m in methods:
    e = json.load(open(f"{out}/{m}-eval.json"))
    try:
        au = json.load(open(f"{out}/{m}-weights.json"))["summary"]["noise_detection"]["roc_auc"]
        au = f"{au:.3f}"
    except (OSError, KeyError, TypeError):
        au = "-"
    print(f"| {m} | {100 * e['accuracy']:.2f} | {100 * e['macro_f1']:.2f} | {au} |")
PY
