#!/usr/bin/env bash
# The GPU tier of benchmarks/paper.py on the device machine (all-MiniLM-L6-v2, the paper's rounds,
# every sampled client batched), for as long as a session's device time allows. Run from the
# repository root after `make gpu-wheels gpu-assets` here (carry .gpu_wheels and .gpu_assets):
#
#     bash benchmarks/gpu_paper.sh smoke [SECONDS]            # every rt_s03 method, 2 rounds on CUDA (~90 s)
#     bash benchmarks/gpu_paper.sh run SECONDS [SETTING...]   # paper.py --tier gpu (default: rt_s03)
#
# `run` keeps JOBS (default 3) runs going on the one GPU (12 at once finished none in 3 minutes on
# 2026-12-04), only METHODS where set (e.g. METHODS="pf2lora homlora"), in seed-major order with the CPU tier's step sizes, starts no new run once SECONDS
# minus 60 have passed, then packs every finished run file and
# the summary into $OUT/paper_gpu.tgz (unpack it into benchmarks/results/; paper.py skips what is
# there, so the next session with a device goes on where this one stopped). The model is the
# float16 copy that benchmarks/gpu_assets.py writes (loaded in float32; see .gpu_assets/assets.json).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
MODEL=.gpu_assets/all-MiniLM-L6-v2-fp16
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PF2LORA_CACHE="$PWD/.gpu_assets/cache"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
[ -d "$MODEL" ] || { echo "gpu_paper.sh: $MODEL is missing (run 'make gpu-assets' and carry .gpu_assets)" >&2; exit 2; }
if [ ! -d /tmp/site ] && compgen -G ".gpu_wheels/*.whl" >/dev/null; then  # (gpu_check.sh installs them too)
    $PY -m pip install --no-index --no-deps -q --no-compile --target /tmp/site .gpu_wheels/*.whl || exit 1
fi
if [ -d /tmp/site ]; then export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
mode=${1:-run}
case $mode in
smoke)
    methods='["pf2lora","pf2lora-fo","homlora","hetlora","perfedavg","local","fedsa-lora","pfedlora","fdlora","she-lora","fed-hello"]'
    rm -rf /tmp/paper_smoke
    timeout "${2:-180}" $PY -m pf2lora.cli run configs/paper/rt_s03.toml --set "task.model=$MODEL" --set device=cuda \
        --set parallel_clients=0 --set rounds=2 --set eval.every=2 --set "methods=$methods" --out /tmp/paper_smoke 2>&1 |
        tee "$OUT/paper_gpu_smoke.log"
    rc=${PIPESTATUS[0]}
    cp /tmp/paper_smoke/summary.json "$OUT/paper_gpu_smoke_summary.json" 2>/dev/null
    exit "$rc"
    ;;
run)
    budget=${2:-300}
    shift 2 || shift $#
    settings=("${@:-rt_s03}")
    hours=$(python3 -c "print(max(0.0, ($budget - 60) / 3600))")
    methods=()
    if [ -n "${METHODS:-}" ]; then read -r -a methods <<<"--methods $METHODS"; fi
    timeout "$budget" $PY benchmarks/paper.py --tier gpu --settings "${settings[@]}" "${methods[@]}" --jobs "${JOBS:-3}" \
        --hours "$hours" --set "task.model=$MODEL" 2>&1 | tee "$OUT/paper_gpu.log"
    rc=${PIPESTATUS[0]}
    tar czf "$OUT/paper_gpu.tgz" --exclude="*.partial" -C benchmarks/results paper_gpu paper_gpu.json 2>/dev/null  # not the running jobs' checkpoints
    exit "$rc"
    ;;
*)
    echo "gpu_paper.sh: unknown mode '$mode' (expected smoke or run)" >&2
    exit 2
    ;;
esac
