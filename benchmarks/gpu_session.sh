#!/usr/bin/env bash
# Everything a session with the device machine (one H200, 15 minutes in all, at most 600 s a call)
# should run, as one call of about 8 minutes: the GPU tests and benchmark (benchmarks/gpu_check.sh,
# about 5 minutes on 2026-12-04), then the paper benchmark's GPU tier for PAPER_SECONDS
# (benchmarks/gpu_paper.sh run). Prepare here with `make gpu-wheels gpu-assets`, then run it there
# carrying .gpu_wheels and .gpu_assets, with a timeout of about 590 s:
#
#     bash benchmarks/gpu_session.sh [PAPER_SECONDS]     # default 170
#
# It writes 6 files into $OUT (gpu_env.txt, gpu_tests.log, accel_gpu.json, accel_gpu.log,
# paper_gpu.log, paper_gpu.tgz): copy accel_gpu.json to benchmarks/results/ and unpack
# paper_gpu.tgz into benchmarks/results/, then commit both.
set -uo pipefail
bash benchmarks/gpu_check.sh
check=$?
bash benchmarks/gpu_paper.sh run "${1:-170}"
paper=$?
echo "gpu_check exit $check, gpu_paper exit $paper"
[ "$check" -eq 0 ] && [ "$paper" -eq 0 ]
