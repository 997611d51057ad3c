"""Benchmarks of bn_triton against cuDNN, torch's native kernels and torch.compile.

Run ``python -m bench`` (see __main__.py). Modules, one job each:
  suite.py    shapes (suite v1, --quick, the smoke's tiny cases), dtype/layout configs, passes
  traffic.py  the minimal-traffic byte model behind every GB/s number
  impls.py    the implementations, defined once, and detection of the backend that actually ran
  runner.py   inputs, float64 reference, correctness check, timing with triton.testing.do_bench
  report.py   CSV, tables, PNG plots, environment JSON
  gpu_check.sh  one call on a GPU machine: versions, the test suite on the GPU, the quick bench

Nothing here imports bn_triton at import time: on CPU, TRITON_INTERPRET must be set first.
"""
