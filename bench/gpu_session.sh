# Sourced by the lent-GPU-machine scripts (bench/gpu_e2e.sh, bench/gpu_overlap.sh):
# $OUT ready, in the repository root, the machine and versions printed, the
# extension built in place; t0 is the session's start.
OUT=${OUT:-$PWD/ktsft-bench-results}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 setup.py build_ext --inplace -q >/dev/null 2>&1 || { echo "build failed"; exit 1; }
python3 -c "import ktsft; print('isa', ktsft.cpu_info()['selected_isa'])"
echo "== built at $(( $(date +%s) - t0 )) s"
