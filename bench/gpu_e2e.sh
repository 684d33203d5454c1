#!/usr/bin/env bash
# The whole-model session on the lent GPU machine (issue 15): build, the
# optimizer/step components at the Qwen3-30B-A3B layer shape, then bench.e2e
# for Qwen3-30B-A3B (48 layers) and DeepSeek-V3 (as many layers as host
# memory allows), each beside the all-on-GPU PEFT baseline.  Results go to
# $OUT (default ./ktsft-bench-results).
OUT=${OUT:-$PWD/ktsft-bench-results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
t0=$(date +%s)
lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 setup.py build_ext --inplace -q >/dev/null 2>&1 || { echo "build failed"; exit 1; }
python3 -c "import ktsft; print('isa', ktsft.cpu_info()['selected_isa'])"
echo "== built at $(( $(date +%s) - t0 )) s"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optim.py tests/test_grads_in_place.py 2>&1 | tail -3
echo "== cuda tests done at $(( $(date +%s) - t0 )) s"
timeout 60 python3 -m bench.step --threads 16 --repeats 5 --out "$OUT" 2>&1 | tail -12
echo "== step done at $(( $(date +%s) - t0 )) s"
timeout ${QWEN_S:-270} python3 -m bench.e2e --preset qwen3-30b-a3b --tokens 512,2048 --steps 3 --threads 16 --out "$OUT" 2>&1 | grep -v Warning
echo "== qwen done at $(( $(date +%s) - t0 )) s"
timeout ${DSV3_S:-200} python3 -m bench.e2e --preset deepseek-v3 --tokens 512,2048 --steps 2 --threads 16 --out "$OUT" 2>&1 | grep -v Warning
echo "== deepseek done at $(( $(date +%s) - t0 )) s"
