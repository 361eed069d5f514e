#!/usr/bin/env bash
# The prepared GPU check (issues 16 and 27): at most 8 minutes on one H100 or H200, compilation
# included.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (run from anywhere; default OUT_DIR gpu_check/)
#
# A lent GPU comes in slices of minutes and a command is cut off after 10, so every step is
# time-boxed (SF_GPU_BUDGET seconds in all, default 480) and the steps run most useful first. Each
# step writes its JSON as soon as it has it; a step that runs out of time is stopped (SIGINT, then
# SIGKILL) and the next one starts, so a check that is cut off still leaves every figure it reached.
# In order:
#   env.json             GPU, torch and CUDA versions, git commit
#   bench_545m.json      `sparsefusion bench` rows of dense and MoT at the bench-545m shape (bf16,
#                        compiled), written row by row
#   pytest_gpu.json      `pytest -m gpu` counts (and pytest_gpu.xml, the JUnit report)
#   pair.json            a dense/MoT training pair from pre-tokenized shards: tokens/s and MFU from
#                        `sparsefusion train`'s own metrics, over whatever steps ran in its box
#   pipeline.json        loader tokens/s per worker and what one GPU consumes (benchmarks/pipeline.py)
#   bench_545m_more.json the other architectures' rows, as far as the budget goes
#   steps.json           every step: ok / timed out / failed / skipped, and its seconds
# --dry-run runs the same steps at debug sizes on the CPU in well under a minute (CI runs it,
# tests/bench/test_gpu_check.py), so the script cannot rot unnoticed.
# Overrides: PYTHON (interpreter), SF_TOKENIZER_CACHE, SF_GPU_BUDGET, BENCH_ARCHS (first rows),
# BENCH_MORE (the rest), PAIR_STEPS, PAIR_PRESET.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
CACHE="${SF_TOKENIZER_CACHE:-$ROOT/.cache/sparsefusion/tokenizers}"
SF=("$PY" -m sparsefusion)
BUDGET="${SF_GPU_BUDGET:-$(( DRY ? 1500 : 480 ))}"  # loose in the dry run: a loaded CPU is slow
START=$(date +%s)
echo "[]" > "$OUT/steps.json"

source "$ROOT/benchmarks/gpu_box.sh"

if [[ $DRY == 1 ]]; then
  BENCH=(--size debug --seq-len 64 --batch-size 2 --steps 1 --warmup 1 --device cpu
         --precision fp32)
  FIRST="${BENCH_ARCHS:-dense,mot}"; MORE="${BENCH_MORE:-moe-8x}"
  PAIR_PRESET="${PAIR_PRESET:-debug}"; PAIR_STEPS="${PAIR_STEPS:-4}"
  PAIR=(train.device=cpu train.threads=1 data.seq_len=64 data.batch_size=2)
  TOKENIZE=(--docs 64 --val-docs 8 --docs-per-shard 32)
  PIPELINE=(--tiny)
  BOX_BENCH=300; BOX_PYTEST=300; BOX_TOKENIZE=150; BOX_PAIR=300; BOX_PIPELINE=300
else
  BENCH=(--size bench-545m --seq-len 4096 --batch-size 4 --compile --precision bf16
         --steps 20 --warmup 5 --device cuda)
  FIRST="${BENCH_ARCHS:-dense,mot}"
  MORE="${BENCH_MORE:-moma-4t4i,moe-8x,moma-4t4i-mod,mod,naive-mot}"
  PAIR_PRESET="${PAIR_PRESET:-94m}"; PAIR_STEPS="${PAIR_STEPS:-300}"
  PAIR=(train.device=cuda train.precision=bf16 dist.compile=true data.seq_len=2048
        data.batch_size=8 data.workers=1 data.prefetch=4)
  TOKENIZE=(--docs 40000 --val-docs 256 --docs-per-shard 2048)
  PIPELINE=(--sections loader,gpu --rounds 2)
  BOX_BENCH=150; BOX_PYTEST=60; BOX_TOKENIZE=40; BOX_PAIR=75; BOX_PIPELINE=45
fi

echo "== environment"
write_env "$OUT/env.json"

box "bench rows ($FIRST)" "$BOX_BENCH" \
  "${SF[@]}" bench --archs "$FIRST" "${BENCH[@]}" --out "$OUT/bench_545m.json"

box "pytest -m gpu" "$BOX_PYTEST" \
  "$PY" -m pytest -q -m gpu tests/ --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider
"$PY" - "$OUT/pytest_gpu.xml" "$OUT/pytest_gpu.json" <<'PYEOF'
import json, os, sys, xml.etree.ElementTree as ET
if not os.path.exists(sys.argv[1]):  # cut off before pytest wrote its report
    json.dump({"complete": False}, open(sys.argv[2], "w"), indent=2)
    sys.exit(0)
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
keys = ("tests", "failures", "errors", "skipped")
counts = {k: int(suite.get(k, 0)) for k in keys}
counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
counts["complete"] = True
json.dump(counts, open(sys.argv[2], "w"), indent=2)
print(counts)
PYEOF

SHARDS="$OUT/tokens-$PAIR_PRESET"
box "dense/MoT pair: tokenize once" "$BOX_TOKENIZE" \
  "${SF[@]}" data tokenize scenes --out "$SHARDS" --preset "mot-$PAIR_PRESET" --quiet \
  "${TOKENIZE[@]}" "tokenizer.cache_dir=$CACHE"
for arch in dense mot; do
  rm -rf "$OUT/pair-$arch"
  box "dense/MoT pair: $arch" "$BOX_PAIR" \
    "${SF[@]}" train "$arch-$PAIR_PRESET" "run.dir=$OUT/pair-$arch" "data.path=$SHARDS" \
    "train.steps=$PAIR_STEPS" run.log_every=10 run.eval_every=0 "run.save_every=$PAIR_STEPS" \
    run.progress=log run.tensorboard=false data.val_batches=1 "tokenizer.cache_dir=$CACHE" \
    "${PAIR[@]}"
done
"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from pipeline import PEAK_BF16
out, pair = Path(sys.argv[1]), {}
for arch in ("dense", "mot"):
    path = out / f"pair-{arch}" / "metrics.jsonl"
    rows = [json.loads(l) for l in open(path)] if path.exists() else []
    rows = [r for r in rows if "split" not in r and "tokens_per_s" in r]
    if not rows:  # cut off before its first logged step
        pair[arch] = {"tokens_per_s": None, "mfu_vs_989tflops": None, "steps": 0}
        continue
    rates, mfus = [], []
    for a, b in zip(rows, rows[1:]):  # the first window includes compilation
        seconds = (b["tokens"] - a["tokens"]) / b["tokens_per_s"]
        rates.append(b["tokens_per_s"])
        mfus.append((b["flops"] - a["flops"]) / seconds / PEAK_BF16)
    pair[arch] = {"tokens_per_s": statistics.median(rates or [rows[-1]["tokens_per_s"]]),
                  "mfu_vs_989tflops": statistics.median(mfus) if mfus else None,
                  "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"]}
rates = [pair[a]["tokens_per_s"] for a in ("dense", "mot")]
pair["mot_over_dense_tokens_per_s"] = rates[1] / rates[0] if all(rates) else None
json.dump(pair, open(out / "pair.json", "w"), indent=2)
print(json.dumps(pair, indent=2))
PYEOF

box "input pipeline" "$BOX_PIPELINE" \
  "$PY" benchmarks/pipeline.py "${PIPELINE[@]}" --cache "$CACHE" --out "$OUT"

box "bench rows ($MORE)" "$BUDGET" \
  "${SF[@]}" bench --archs "$MORE" "${BENCH[@]}" --out "$OUT/bench_545m_more.json"
echo "== done in $(( $(date +%s) - START )) s: results in $OUT"
cat "$OUT/steps.json"
