#!/usr/bin/env bash
# Issue 13's GPU benchmarks as one short job: the janus-1.3b preset in bf16 on one GPU.
# From the repository root, on the device machine (docs/benchmarks.md, "GPU job"):
#
#   OUT=$OUT bash benchmarks/gpu.sh                                   # janus-1.3b, cuda, bf16
#   PRESET=tiny DEVICE=cpu DTYPE=fp32 OUT=/tmp/gpu-smoke bash benchmarks/gpu.sh   # CPU smoke run
#
# Steps, each under its own time limit (`timeout`) so that one cannot eat the others' time, each
# writing $OUT/<step>.log and $OUT/<step>.json; the learner first (its MFU is the figure least
# known), the policy last (the longest):
#   learner  the PPO update under DeepSpeed ZeRO-2: seconds, tokens/s, MFU (learner_engine.py)
#   sync     one weight sync of the whole policy without Ray: seconds, GB/s (sync.py --no-ray)
#   policy   act transitions/s at batch 1, 16, 64; imagined frames/s (576 codes for janus-1.3b);
#            evaluate + backward, KV cache (policy.py; act with lookahead only if LOOKAHEAD > 0:
#            2 imagined frames per call would take most of the step's time)
# If the learner fails (not by its time limit), e.g. out of memory, it runs once more with half
# the rows (learner-half.*). Wheels in .whl/ (benchmarks/device_wheels.sh) are installed first
# when the packages they hold are missing (the device has no network). Exit status: the number
# of steps that failed.
#
# Settings (environment): OUT (required), PRESET (janus-1.3b), DEVICE (cuda), DTYPE (bf16),
# ROWS (8: learner rows per micro-step), BATCH (16: imagine/evaluate/lookahead batch),
# LOOKAHEAD (0), REPEATS (3), STEPS ("learner sync policy": a rerun may name fewer), THREADS
# (torch threads; 1 on the CPU, else every core), PYTHON (python3), SITE (/tmp/site: where the
# wheels go), LEARNER_S / SYNC_S / POLICY_S (time limits in seconds: 180 / 120 / 200, 500 in
# all, inside a 10-minute device call).
set -uo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the results folder}"
PRESET=${PRESET:-janus-1.3b} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16}
ROWS=${ROWS:-8} BATCH=${BATCH:-16} LOOKAHEAD=${LOOKAHEAD:-0} REPEATS=${REPEATS:-3}
PY=${PYTHON:-python3} LEARNER_S=${LEARNER_S:-180} SYNC_S=${SYNC_S:-120} POLICY_S=${POLICY_S:-200}
STEPS=" ${STEPS:-learner sync policy} "
[ "$DEVICE" = cpu ] && THREADS=${THREADS:-1}
THREAD_ARGS=(${THREADS:+--threads "$THREADS"})
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT"

# -- the packages the device lacks, from carried wheels ------------------------------------------
have() {  # have MODULE...: all importable (found, not imported: importing deepspeed takes seconds)
    "$PY" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' "$@"
}
if ! have deepspeed pydantic gymnasium && [ -d .whl ]; then
    SITE=${SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

# -- the machine and the versions ----------------------------------------------------------------
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" - <<'EOF'
import importlib.metadata as md, importlib.util as iu, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "tokenizers", "numpy", "deepspeed", "pydantic", "gymnasium"):
    spec = iu.find_spec(name)
    print(f"{name:12s} {md.version(name) if spec else '-':12s} {spec.origin if spec else 'MISSING'}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    echo "PRESET=$PRESET DEVICE=$DEVICE DTYPE=$DTYPE ROWS=$ROWS BATCH=$BATCH" \
        "LOOKAHEAD=$LOOKAHEAD REPEATS=$REPEATS THREADS=${THREADS:-all} STEPS=$STEPS"
} 2>&1 | tee "$OUT/env.log"

# -- the steps -----------------------------------------------------------------------------------
step() {  # step NAME LIMIT_S ARGS...: run python ARGS under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $PY $*"
    timeout --kill-after=10 "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ', out of time')"
    return $rc
}
failed=0
wanted() { [[ $STEPS == *" $1 "* ]]; }

learner() {  # learner NAME ROWS
    step "$1" "$LEARNER_S" -m benchmarks.learner_engine --model policy --preset "$PRESET" \
        --stages 2 --precision "$DTYPE" --rows "$2" --accum 1 --repeats "$REPEATS" --warmup 2 \
        --engines deepspeed --device "$DEVICE" "${THREAD_ARGS[@]}" --json "$OUT/$1.json"
}
if wanted learner; then
    learner learner "$ROWS"
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ "$ROWS" -gt 1 ]; then
        learner learner-half $((ROWS / 2)) || failed=$((failed + 1))
    elif [ $rc -ne 0 ]; then
        failed=$((failed + 1))
    fi
fi

if wanted sync; then
    step sync "$SYNC_S" -m benchmarks.sync --no-ray --presets "$PRESET" --device "$DEVICE" \
        --dtype "$DTYPE" --repeats "$REPEATS" --json "$OUT/sync.json" || failed=$((failed + 1))
fi

if wanted policy; then
    step policy "$POLICY_S" -m benchmarks.policy --preset "$PRESET" --batch-sizes 1 16 64 \
        --batch "$BATCH" --lookahead "$LOOKAHEAD" --repeats "$REPEATS" --device "$DEVICE" \
        --dtype "$DTYPE" "${THREAD_ARGS[@]}" --json "$OUT/policy.json" || failed=$((failed + 1))
fi

echo "== done in $SECONDS s, $failed step(s) failed; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $failed
