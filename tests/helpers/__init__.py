"""Shared test helpers: tiny HF checkpoints, HF-parity drivers, NumPy references, the server
harness and the simulated KV runner."""
