#!/usr/bin/env bash
# The shared-experts overlap on the lent GPU machine (issue 15): build, the
# CUDA tests (the overlap's device path among them), then bench.e2e on the
# DeepSeek-V3 shape (a shared expert per layer; as many layers as host
# memory allows) with and without the overlap, taking turns in one run.
# Results go to $OUT (default ./ktsft-bench-results).
source "$(dirname "$0")/gpu_session.sh"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_shared_overlap.py 2>&1 | tail -15
echo "== tests done at $(( $(date +%s) - t0 )) s"
timeout ${DSV3_S:-360} python3 -m bench.e2e --preset deepseek-v3 --tokens ${TOKENS:-512,2048} --steps ${STEPS:-3} --threads 16 --overlap both --no-gpu-baseline --out "$OUT" 2>&1 | grep -v Warning
echo "== deepseek done at $(( $(date +%s) - t0 )) s"
