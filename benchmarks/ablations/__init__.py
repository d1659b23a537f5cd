"""Kernels measured beside the shipped ones and not used by the engine (verdicts in
benchmarks/HISTORY.md). Tested on CPU in interpret mode and, marked ``gpu``, on the device."""
