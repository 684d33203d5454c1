#!/usr/bin/env bash
# The whole-model session on the lent GPU machine (issue 15): build, the
# optimizer/step components at the Qwen3-30B-A3B layer shape, then bench.e2e
# for Qwen3-30B-A3B (48 layers) and DeepSeek-V3 (as many layers as host
# memory allows), each beside the all-on-GPU PEFT baseline.  Results go to
# $OUT (default ./ktsft-bench-results).
source "$(dirname "$0")/gpu_session.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optim.py tests/test_grads_in_place.py 2>&1 | tail -3
echo "== cuda tests done at $(( $(date +%s) - t0 )) s"
timeout 60 python3 -m bench.step --threads 16 --repeats 5 --out "$OUT" 2>&1 | tail -12
echo "== step done at $(( $(date +%s) - t0 )) s"
timeout ${QWEN_S:-270} python3 -m bench.e2e --preset qwen3-30b-a3b --tokens 512,2048 --steps 3 --threads 16 --out "$OUT" 2>&1 | grep -v Warning
echo "== qwen done at $(( $(date +%s) - t0 )) s"
timeout ${DSV3_S:-200} python3 -m bench.e2e --preset deepseek-v3 --tokens 512,2048 --steps 2 --threads 16 --out "$OUT" 2>&1 | grep -v Warning
echo "== deepseek done at $(( $(date +%s) - t0 )) s"
