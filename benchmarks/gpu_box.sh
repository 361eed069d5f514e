# Time-boxed steps for the prepared GPU scripts (gpu_check.sh, gpu_pair.sh); sourced, not run.
# The caller sets OUT (results folder), PY (interpreter), BUDGET (seconds in all) and START
# (`date +%s` at its start), and writes "[]" to $OUT/steps.json before the first box.

record() {  # record NAME STATUS SECONDS: append one entry to steps.json
  "$PY" - "$OUT/steps.json" "$@" <<'PYEOF'
import json, sys
path, name, status, seconds = sys.argv[1:]
steps = json.load(open(path))
steps.append({"step": name, "status": status, "seconds": int(seconds)})
json.dump(steps, open(path, "w"), indent=2)
PYEOF
}

budget_left() {  # seconds of BUDGET not yet spent
  echo $(( BUDGET - ($(date +%s) - START) ))
}

box() {  # box NAME MAX_SECONDS CMD...: CMD for at most MAX_SECONDS and what is left of the budget
  local name=$1 max=$2 t0 left limit rc status
  shift 2
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START) ))
  limit=$(( max < left ? max : left ))
  if (( limit < 5 )); then
    echo "== $name: skipped, the budget is spent"
    record "$name" "skipped: budget spent" 0
    return 0
  fi
  echo "== $name (at most ${limit} s; $(date -u +%H:%M:%S))"
  set +e
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  set -e
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "$name" "$status" $(( $(date +%s) - t0 ))
}

write_env() {  # write_env FILE: GPU, torch and CUDA versions, git commit
  "$PY" - "$1" <<'PYEOF'
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
PYEOF
}
