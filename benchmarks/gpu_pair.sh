#!/usr/bin/env bash
# The GPU loss pair (issue 27, item 6): dense vs MoT at the MoT paper's 37M shape (preset size
# `small`: width 256, 4 layers, 8 heads) on one GPU, trained for as many tokens as the budget
# allows, then `sparsefusion compare`. Run it after gpu_check.sh on the same warm machine.
#
#   benchmarks/gpu_pair.sh [--dry-run] [OUT_DIR]      (run from anywhere; default OUT_DIR gpu_pair/)
#
# The whole script keeps inside SF_PAIR_BUDGET seconds (default 420), every step time-boxed
# (benchmarks/gpu_box.sh). In order:
#   env.json        GPU, torch and CUDA versions, git commit
#   tokenize        the built-in corpus pre-tokenized once by parallel workers (shards in work/)
#   probe           MoT trained a few steps: its tokens/s after compilation and its start-up time
#   plan.json       the steps both runs take: what fits half of the budget left, less start-up
#   dense, mot      the pair, the same steps, data and schedule (cosine, warm-up 5%), validation
#                   ten times; each writes metrics.jsonl as it goes
#   pair.json       steps reached, tokens, epochs over the shards, final validation loss overall
#                   and per modality of each run, MoT - dense, and compare's savings
#   compare.md, compare.json   `sparsefusion compare dense mot` (step-matched, FLOPs savings)
#   dense.jsonl, mot.jsonl     the two runs' metrics
#   steps.json      every step: ok / timed out / failed / skipped, and its seconds
# A run cut off by its box stops at a step (SIGINT saves and exits) and pair.json compares what
# both reached. The same schedule as the CPU studies (lr 2e-3, cosine to 10%), with 32 rows of 512
# a step (16k tokens); the CPU twin is docs/results/scale_cpu/ (width 256 at 4,800 steps).
# --dry-run runs the same steps at debug sizes on the CPU in about a minute (tests/bench/).
# Overrides: PYTHON, SF_TOKENIZER_CACHE, SF_PAIR_BUDGET, PAIR_PRESET (size, default small),
# PAIR_STEPS (steps of each run instead of the plan's), PAIR_DOCS (documents to pre-tokenize),
# PAIR_WORKERS (tokenize processes).
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="$(mkdir -p "${1:-gpu_pair}" && cd "${1:-gpu_pair}" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
SF=("$PY" -m sparsefusion)
CACHE="${SF_TOKENIZER_CACHE:-$ROOT/.cache/sparsefusion/tokenizers}"
TOK=("tokenizer.cache_dir=$CACHE")
START=$(date +%s)
WORK="$OUT/work"
mkdir -p "$WORK"
echo "[]" > "$OUT/steps.json"
source "$ROOT/benchmarks/gpu_box.sh"

if [[ $DRY == 1 ]]; then
  BUDGET="${SF_PAIR_BUDGET:-900}"; SIZE="${PAIR_PRESET:-debug}"; FORCE_STEPS="${PAIR_STEPS:-12}"
  DOCS="${PAIR_DOCS:-64}"; WORKERS="${PAIR_WORKERS:-2}"; VAL_DOCS=16; PER_SHARD=16
  TRAIN=(train.device=cpu train.threads=1 data.seq_len=64 data.batch_size=2 data.val_batches=2)
  PROBE_STEPS=4; PROBE_LOG=1; BOX_TOKENIZE=300; BOX_PROBE=300; RESERVE=120
else
  BUDGET="${SF_PAIR_BUDGET:-420}"; SIZE="${PAIR_PRESET:-small}"; FORCE_STEPS="${PAIR_STEPS:-0}"
  WORKERS="${PAIR_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}"
  DOCS="${PAIR_DOCS:-1000000}"; VAL_DOCS=512; PER_SHARD=1024
  TRAIN=(train.device=cuda train.precision=bf16 dist.compile=true data.seq_len=512
         data.batch_size=32 data.workers=1 data.prefetch=4 data.val_batches=8)
  PROBE_STEPS=40; PROBE_LOG=5; BOX_TOKENIZE=90; BOX_PROBE=120; RESERVE=30
fi
# The CPU studies' optimizer; the preset's warm-up and length are replaced by the plan's.
TRAIN+=(optim.lr=0.002 optim.schedule=cosine optim.min_lr_ratio=0.1 run.progress=log
        run.tensorboard=false "${TOK[@]}")

echo "== environment"
write_env "$OUT/env.json"

SHARDS="$WORK/shards"
# One document first, in one process: trains the tokenizer into the cache (or finds it there), so
# the parallel workers below never race to train it.
box "tokenizer" "$BOX_TOKENIZE" \
  "${SF[@]}" data tokenize scenes --out "$WORK/one" --preset "mot-$SIZE" --quiet --docs 1 \
  --val-docs 1 "${TOK[@]}"
# WORKERS processes write one shard folder (the last one to finish writes the manifest).
box "tokenize $DOCS documents ($WORKERS workers)" "$BOX_TOKENIZE" bash -c '
  n=$1; shift; rc=0; pids=()
  for (( w = 0; w < n; w++ )); do "$@" --worker "$w" --num-workers "$n" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  exit $rc' _ "$WORKERS" "${SF[@]}" data tokenize scenes --out "$SHARDS" --preset "mot-$SIZE" \
  --quiet --docs "$DOCS" --val-docs "$VAL_DOCS" --docs-per-shard "$PER_SHARD" "${TOK[@]}"

rm -rf "$WORK/probe"
PROBE_T0=$(date +%s)
box "probe: mot-$SIZE, $PROBE_STEPS steps" "$BOX_PROBE" \
  "${SF[@]}" train "mot-$SIZE" "run.dir=$WORK/probe" "data.path=$SHARDS" \
  "train.steps=$PROBE_STEPS" "run.log_every=$PROBE_LOG" run.eval_every=0 "run.save_every=$PROBE_STEPS" \
  "${TRAIN[@]}"

# The plan: each run gets half of what is left (less a reserve for compare), and trains for
# that box less the probe's start-up time (its wall time less its steps at the steady rate:
# process start, compilation, the checkpoint) and 15% for validation.
# PAIR_STEPS fixes the steps instead (the dry run does, so its pair is the same on any machine).
"$PY" - "$WORK/probe/metrics.jsonl" "$OUT/plan.json" "$(budget_left)" "$RESERVE" "$FORCE_STEPS" \
  "$(( $(date +%s) - PROBE_T0 ))" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
metrics, out = Path(sys.argv[1]), sys.argv[2]
left, reserve, force, probe_wall = (int(a) for a in sys.argv[3:7])
rows = [json.loads(l) for l in open(metrics)] if metrics.exists() else []
rows = [r for r in rows if "split" not in r and "tokens_per_s" in r]
plan = {"budget_left_s": left, "probe_rows": len(rows)}
if len(rows) >= 2:
    rate = statistics.median(r["tokens_per_s"] for r in rows[1:])
    per_step = rows[-1]["tokens"] / rows[-1]["step"]
    startup = max(0.0, probe_wall - rows[-1]["tokens"] / rate)  # start, compile, save
    box = (left - reserve) // 2
    train_s = max(0.0, 0.85 * (box - startup))
    steps = int(train_s * rate / per_step)
    plan.update(tokens_per_s=rate, tokens_per_step=per_step, startup_s=startup, box_s=box,
                steps=steps if steps >= 20 else 0)
else:
    plan.update(steps=0, why="the probe logged fewer than two windows")
if force > 0:
    plan.update(planned_steps=plan["steps"], steps=force, box_s=(left - reserve) // 2)
json.dump(plan, open(out, "w"), indent=2)
print(plan)
PYEOF
STEPS=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"])' "$OUT/plan.json")
BOX_RUN=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("box_s", 0))' "$OUT/plan.json")

if (( STEPS > 0 )); then
  EVAL=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
  for arch in dense mot; do
    rm -rf "$WORK/$arch"
    box "$arch-$SIZE: $STEPS steps" "$BOX_RUN" \
      "${SF[@]}" train "$arch-$SIZE" "run.dir=$WORK/$arch" "data.path=$SHARDS" \
      "train.steps=$STEPS" "optim.warmup_steps=$(( STEPS / 20 ))" "run.eval_every=$EVAL" \
      "run.log_every=$EVAL" "run.save_every=$STEPS" "${TRAIN[@]}"
    [[ -f "$WORK/$arch/metrics.jsonl" ]] && cp "$WORK/$arch/metrics.jsonl" "$OUT/$arch.jsonl"
  done
  box "compare" "$RESERVE" \
    "${SF[@]}" compare "$WORK/dense" "$WORK/mot" --out "$WORK/compare" val_smoothing=0.0
  for f in compare.md compare.json; do
    [[ -f "$WORK/compare/$f" ]] && cp "$WORK/compare/$f" "$OUT/$f"
  done
else
  record "pair" "skipped: no plan (see plan.json)" 0
fi

"$PY" - "$OUT" "$SHARDS/manifest.json" <<'PYEOF'
import json, sys
from pathlib import Path
out, manifest = Path(sys.argv[1]), Path(sys.argv[2])
shard_tokens = None
if manifest.exists():
    split = json.loads(manifest.read_text())["splits"]["train"]
    shard_tokens = split["tokens"]
pair = {"plan": json.loads((out / "plan.json").read_text()), "shard_tokens": shard_tokens}
for arch in ("dense", "mot"):
    path = out / f"{arch}.jsonl"
    rows = [json.loads(l) for l in open(path)] if path.exists() else []
    train = [r for r in rows if "split" not in r and "tokens" in r]
    val = [r for r in rows if r.get("split") == "val"]
    last = train[-1] if train else {}
    pair[arch] = {"steps": last.get("step", 0), "tokens": last.get("tokens", 0),
                  "epochs": last["tokens"] / shard_tokens if last and shard_tokens else None,
                  "tokens_per_s": last.get("tokens_per_s"),
                  "val": {k: v for k, v in val[-1].items() if k.startswith("loss")} if val else {},
                  "val_step": val[-1]["step"] if val else None}
d, m = pair["dense"], pair["mot"]
if d["val"] and m["val"] and d["val_step"] == m["val_step"]:
    pair["mot_minus_dense"] = {k: m["val"][k] - d["val"][k] for k in d["val"] if k in m["val"]}
cmp = out / "compare.json"
if cmp.exists():
    val = json.loads(cmp.read_text())["runs"][0]["splits"].get("val", {})
    pair["savings_val"] = {k: {"flops_savings": v["savings_factor"]["text"],
                               "step_slope": v["step_slope"]["text"]} for k, v in val.items()}
json.dump(pair, open(out / "pair.json", "w"), indent=2)
print(json.dumps({k: pair[k] for k in ("dense", "mot")}, indent=1))
PYEOF
echo "== done in $(( $(date +%s) - START )) s: results in $OUT"
cat "$OUT/steps.json"
