#!/usr/bin/env bash
# The AMX session on the lent Xeon (issue 7): build, AMX tests, then the
# incumbent comparison.  Results go to $OUT (or bench/results).
OUT=${OUT:-bench/results}
set -x
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-300
gcc --version | head -1
python3 setup.py build_ext --inplace -q 2>&1 | grep -v "^\s*$" | grep -iv "^gcc\|^copying\|^building\|^creating" | tail -5
objdump -d ktsft/_kernels/moe_sft*.so | grep -c -E "ldtilecfg|tdpbf16ps"
python3 -c "import ktsft, json; i = ktsft.cpu_info(); print(json.dumps({k: i[k] for k in ('selected_isa', 'runnable_isas', 'amx')}))"
timeout 300 python3 -m pytest -q -x tests/test_amx.py tests/test_kernels.py tests/test_determinism.py 2>&1 | tail -5
timeout 900 python3 -m bench.incumbent --accuracy --out "$OUT" --tag incumbent_xeon "$@" 2>&1 | grep -v "^|"
