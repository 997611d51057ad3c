#!/usr/bin/env bash
# One-off GPU re-check (not committed): host time with and without direct launches, e2e, a bench
# subset with host/device columns, and the GPU-relevant tests.
set -u
unset TRITON_INTERPRET
O=${1:?out}
export PYTHONPATH=$PWD
echo "== overhead direct"; timeout 30 python3 bench/overhead.py --shape 32,64,14,14 2>&1 | tail -12
echo "== overhead triton path"; BN_TRITON_DIRECT_LAUNCH=0 timeout 30 python3 bench/overhead.py --shape 32,64,14,14 2>&1 | tail -12
echo "== e2e"; timeout 60 python3 -m bench.e2e --variants torch,bn_triton --steps 10 --warmup 3 --out "$O/e2e" 2>&1 | tail -14
echo "== bench subset"; timeout 45 python3 -m bench --shapes 64@56,2048@7,256@56 --dtypes bf16-cl,fp32-nchw --impls bn_triton,cudnn --no-fused --warmup-ms 5 --rep-ms 15 --out "$O/bench" > "$O/bench.log" 2>&1; tail -40 "$O/bench.log"
echo "== tests"; timeout 95 python3 -m pytest -q -rfE -n 12 -p no:cacheprovider tests/test_launcher.py tests/test_gpu_large.py tests/test_reliability.py tests/test_compile_cuda.py tests/test_batch_norm.py tests/test_sync_batchnorm.py tests/test_numerics.py tests/test_fused.py tests/test_modules.py tests/test_errors.py tests/test_autograd_higher.py tests/test_compile.py 2>&1 | grep -v Warning | tail -40
cd "$O" && tar czf all.tgz e2e bench bench.log 2>/dev/null; ls "$O"
