"""Profilers for the benchmarks' figures: device time by Nsight Compute, one step's GPU kernels,
the host's share of a step."""
