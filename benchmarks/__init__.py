"""Benchmarks run on the GPU machine from the repository root (``PYTHONPATH=.``); figures in
``benchmarks/RESULTS.md``, their history in ``benchmarks/HISTORY.md``.

- ``kernels.py``, ``throughput.py``, ``serve.py``: the three benchmarks (``common.py``: their shared
  workload and roofline code);
- ``tools/``: profilers (Nsight Compute device time, one step's GPU kernels, host time per step);
- ``ablations/``: kernels measured beside the shipped ones and not used by the engine.
"""
