#!/usr/bin/env bash
# The prepared GPU check (issue 16): about 10 minutes on one H100 or H200.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (run from anywhere; default OUT_DIR gpu_check/)
#
# Writes every result as JSON into OUT_DIR:
#   env.json           GPU, torch and CUDA versions, git commit
#   bench_545m.json    `sparsefusion bench` rows at the bench-545m shape (bf16, compiled)
#   pytest_gpu.json    `pytest -m gpu` counts (and pytest_gpu.xml, the JUnit report)
#   pipeline.json      loader tokens/s per worker and what one GPU consumes (benchmarks/pipeline.py)
#   pair.json          a dense/MoT training pair (about a minute each, from pre-tokenized shards):
#                      tokens/s and MFU from `sparsefusion train`'s own metrics
# --dry-run runs the same steps at debug sizes on the CPU in well under a minute (CI runs it,
# tests/bench/test_gpu_check.py), so the script cannot rot unnoticed.
# Overrides: PYTHON (interpreter), SF_TOKENIZER_CACHE, BENCH_ARCHS, PAIR_STEPS, PAIR_PRESET.
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
step() { echo "== $* ($(date -u +%H:%M:%S))"; }

if [[ $DRY == 1 ]]; then
  BENCH=(--archs "${BENCH_ARCHS:-dense,mot}" --size debug --seq-len 64 --batch-size 2
         --steps 1 --warmup 1 --device cpu --precision fp32)
  PAIR_PRESET="${PAIR_PRESET:-debug}"; PAIR_STEPS="${PAIR_STEPS:-4}"
  PAIR=(train.device=cpu train.threads=1 data.seq_len=64 data.batch_size=2)
  TOKENIZE=(--docs 64 --val-docs 8 --docs-per-shard 32)
  PIPELINE=(--tiny)
else
  BENCH=(--archs "${BENCH_ARCHS:-dense,mot,naive-mot,moe-8x,moma-4t4i,mod,moma-4t4i-mod}"
         --size bench-545m --seq-len 4096 --batch-size 4 --compile --precision bf16
         --steps 20 --warmup 5 --device cuda)
  PAIR_PRESET="${PAIR_PRESET:-94m}"; PAIR_STEPS="${PAIR_STEPS:-300}"
  PAIR=(train.device=cuda train.precision=bf16 dist.compile=true data.seq_len=2048
        data.batch_size=8 data.workers=1 data.prefetch=4)
  TOKENIZE=(--docs 40000 --val-docs 256 --docs-per-shard 2048)
  PIPELINE=(--sections loader,gpu --rounds 2)
fi

step "environment"
"$PY" - "$OUT/env.json" <<'EOF'
import json, subprocess, sys, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
except OSError:
    env["commit"] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
EOF

step "bench rows"
"${SF[@]}" bench "${BENCH[@]}" --out "$OUT/bench_545m.json"

step "pytest -m gpu"
set +e
"$PY" -m pytest -q -m gpu tests/ --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider
set -e
"$PY" - "$OUT/pytest_gpu.xml" "$OUT/pytest_gpu.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
keys = ("tests", "failures", "errors", "skipped")
counts = {k: int(suite.get(k, 0)) for k in keys}
counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
json.dump(counts, open(sys.argv[2], "w"), indent=2)
print(counts)
EOF

step "input pipeline"
"$PY" benchmarks/pipeline.py "${PIPELINE[@]}" --cache "$CACHE" --out "$OUT"

step "dense/MoT pair: tokenize once"
SHARDS="$OUT/tokens-$PAIR_PRESET"
"${SF[@]}" data tokenize scenes --out "$SHARDS" --preset "mot-$PAIR_PRESET" --quiet \
  "${TOKENIZE[@]}" "tokenizer.cache_dir=$CACHE"
for arch in dense mot; do
  step "dense/MoT pair: $arch"
  rm -rf "$OUT/pair-$arch"
  "${SF[@]}" train "$arch-$PAIR_PRESET" "run.dir=$OUT/pair-$arch" "data.path=$SHARDS" \
    "train.steps=$PAIR_STEPS" run.log_every=10 run.eval_every=0 "run.save_every=$PAIR_STEPS" \
    run.progress=log run.tensorboard=false data.val_batches=1 "tokenizer.cache_dir=$CACHE" \
    "${PAIR[@]}"
done
"$PY" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from pipeline import PEAK_BF16
out, pair = Path(sys.argv[1]), {}
for arch in ("dense", "mot"):
    rows = [json.loads(l) for l in open(out / f"pair-{arch}" / "metrics.jsonl")]
    rows = [r for r in rows if "split" not in r]
    rates, mfus = [], []
    for a, b in zip(rows, rows[1:]):  # the first window includes compilation
        seconds = (b["tokens"] - a["tokens"]) / b["tokens_per_s"]
        rates.append(b["tokens_per_s"])
        mfus.append((b["flops"] - a["flops"]) / seconds / PEAK_BF16)
    pair[arch] = {"tokens_per_s": statistics.median(rates or [rows[-1]["tokens_per_s"]]),
                  "mfu_vs_989tflops": statistics.median(mfus) if mfus else None,
                  "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"]}
pair["mot_over_dense_tokens_per_s"] = pair["mot"]["tokens_per_s"] / pair["dense"]["tokens_per_s"]
json.dump(pair, open(out / "pair.json", "w"), indent=2)
print(json.dumps(pair, indent=2))
EOF
step "done: results in $OUT"
