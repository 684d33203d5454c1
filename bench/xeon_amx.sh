#!/usr/bin/env bash
# The AMX session on the lent Xeon (issues 3 and 7): build, the incumbent
# comparison, thread scaling on the AMX path, then the whole test suite.
# Results go to $OUT (default ./ktsft-bench-results; the tracked results of
# that session are in bench/results: OUT=bench/results to replace them).
OUT=${OUT:-$PWD/ktsft-bench-results}
cd "$(dirname "$0")/.."
lscpu | grep -E "Model name|^CPU\(s\)" ; gcc --version | head -1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
python3 -c "import ktsft, json; i = ktsft.cpu_info(); print(json.dumps({k: i[k] for k in ('selected_isa', 'runnable_isas', 'amx')}))"
timeout 330 python3 -m bench.incumbent --accuracy --repeats 5 --out "$OUT" --tag incumbent_xeon 2>&1 | grep -v "^|"
timeout 150 python3 -m bench.scaling --threads 1 2 4 8 16 --qlen 256 2048 --repeats 3 --out "$OUT" --tag scaling_xeon_amx 2>&1 | tail -14
timeout 150 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -3
