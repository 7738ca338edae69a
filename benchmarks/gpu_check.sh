#!/usr/bin/env bash
# The GPU checks of one session, in about 6 minutes (accel.py --quick took about 4 minutes on an H200
# on 2026-12-04): the tests marked `gpu`, then the GPU benchmark (benchmarks/accel.py on CUDA -> accel_gpu.json). Meant for the device machine, run
# from the repository root after `make gpu-wheels` here (carry .gpu_wheels):
#
#     bash benchmarks/gpu_check.sh            # results into $OUT (the device tool's) or benchmarks/results
#
# The machine's image has torch (CUDA), transformers, peft and pytest; it lacks tomli_w and tenseal (carried as
# wheels) and flwr (only the Flower engines need it: their tests are not run here). The GPU
# settings use random models of MiniLM-L6's and roberta-base's shapes, so no offline assets are needed;
# where .gpu_assets was carried (`make gpu-assets`), one more setting runs the real MiniLM-L6 on real text.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -d .gpu_assets/cache ]; then  # carried: accel.py adds a real-text setting (the real MiniLM-L6 on Rotten Tomatoes)
    export PF2LORA_CACHE="$PWD/.gpu_assets/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    $PY -m pip install --no-index --no-deps -q --no-compile --target /tmp/site .gpu_wheels/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'PY' 2>&1 | tee "$OUT/gpu_env.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name())
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_device.py tests/test_batched.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 280 $PY benchmarks/accel.py --device cuda --quick --reps 2 --out "$OUT/accel_gpu.json" 2>&1 | tee "$OUT/accel_gpu.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
