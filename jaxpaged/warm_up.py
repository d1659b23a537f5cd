"""Start-up compilation of a :class:`~jaxpaged.model_runner.ModelRunner`'s programs.

Every program the runner can run is compiled before serving (the engine's compilation counter then
stays at zero): the step of every bucket, every sampler variant, the prompt-logprob programs and the
KV block programs. They first compile side by side on a thread pool (XLA's compiler releases the
GIL) while this thread lowers the next one; then each program runs once, from jit's cache.
``$JAXPAGED_COMPILE_THREADS`` sets the pool (default ``min(8, CPUs)``; 1 compiles one program at a
time). Figures: RESULTS.md, "Start-up".

``WarmUp`` reads the runner's programs and packing helpers directly: it is the runner's start-up
half, kept in its own file.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged import tensor_parallel
from jaxpaged.buckets import Bucket, geometric_range


def compile_threads() -> int:
    """Threads that compile the start-up programs (``$JAXPAGED_COMPILE_THREADS``, default
    ``min(8, CPUs)``)."""
    value = os.environ.get("JAXPAGED_COMPILE_THREADS")
    if value is None:
        return min(8, os.cpu_count() or 1)
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"JAXPAGED_COMPILE_THREADS must be a whole number >= 1, got {value!r}")
    return threads


class WarmUp:
    """Compiles and runs once every program of ``runner``."""

    def __init__(self, runner: Any):  # a ModelRunner (not imported: it imports this module)
        self.runner = runner
        self.precompile_seconds = 0.0
        self._hidden: dict[int, jax.Array] = {}  # each mixed bucket's step output, for prompt logprobs
        self._hidden_info: dict[int, jax.ShapeDtypeStruct] = {}  # its shape and dtype, from the lowering

    def run(self, progress: Callable[[str, int, int], None] | None = None) -> float:
        """Compiles (and runs once) every program; returns the seconds it took."""
        r = self.runner
        t0 = time.perf_counter()
        self._precompile(progress)
        self.precompile_seconds = time.perf_counter() - t0
        jobs: list[tuple[str, Callable[[], None]]] = []
        for b in r.buckets:
            jobs.append((f"step {b}", functools.partial(self._step, b)))
        for rows in geometric_range(8, r.max_rows):
            for profile in r.PROFILES:
                jobs.append((f"sampler {profile} rows={rows}", functools.partial(self._sampler, rows, profile)))
        for b in r.buckets:
            if not b.decode_only:  # decode steps never carry prompt tokens
                jobs.append((f"prompt logprobs {b.num_tokens}", functools.partial(self._prompt_lp, b.num_tokens)))
        jobs.append(("kv block programs", lambda: r.kv.warm_up(r.max_blocks_per_seq)))
        for i, (name, job) in enumerate(jobs):
            if progress:
                progress(name, i, len(jobs))
            job()
        jax.block_until_ready(r.kv.caches)
        self._hidden = {}
        return time.perf_counter() - t0

    def _precompile(self, progress: Callable[[str, int, int], None] | None) -> None:
        """Compiles every program side by side before :meth:`run` runs them. ``lower().compile()``
        fills the same cache as a call, so the runs that follow compile nothing (the engine's
        compilation counter shows it)."""
        threads = compile_threads()
        if threads <= 1:
            return
        lowerings = list(self._lowerings())
        with ThreadPoolExecutor(threads, thread_name_prefix="jaxpaged-compile") as pool:
            futures = []
            for i, (name, lower) in enumerate(lowerings):
                if progress:
                    progress(f"compile {name}", i, len(lowerings))
                futures.append(pool.submit(lower().compile))  # lowering here, compiling there
            for f in futures:
                f.result()  # a failed compilation raises here, as the call in run() would

    def _lowerings(self) -> Iterator[tuple[str, Callable[[], Any]]]:
        """(name, lower) for each program, with arguments like those :meth:`run` calls it with (same
        shapes, dtypes, placements and committedness: same cache entries)."""
        r = self.runner
        for b in sorted(r.buckets, key=lambda b: -b.num_tokens):  # the longest compilations first
            yield f"step {b.num_tokens}{'d' if b.decode_only else ''}", functools.partial(self._lower_step, b)
        for b in r.buckets:
            if not b.decode_only:  # after the steps: each takes its step's output shape
                yield f"prompt logprobs {b.num_tokens}", functools.partial(self._lower_prompt_lp, b.num_tokens)
        for rows in geometric_range(8, r.max_rows):
            for profile in r.PROFILES:
                yield f"sampler {profile} rows={rows}", functools.partial(self._lower_sampler, rows, profile)
        yield from r.kv.lowerings(r.max_blocks_per_seq)

    # The arguments each program is lowered with and then run with: one place for each, so the
    # pool's programs are the ones the runs look up.
    def _step_arguments(self, b: Bucket) -> tuple:
        ids, md, positions = self.runner._pack_arrays([], b)
        return self.runner.step_arguments(ids, positions, md)

    def _sampler_arguments(self, num_rows: int, profile: str) -> tuple:
        r = self.runner
        # Logits laid out as the step's are (replicated over the mesh), so serving reuses the program.
        logits = tensor_parallel.zeros((r.max_rows, r.vocab_size), jnp.float32, r._replicated)
        return logits, jnp.zeros(num_rows, jnp.int32), r._tensors([], num_rows, profile), r._flags(profile)

    def _prompt_lp_arguments(self, hidden: Any, num_tokens: int) -> tuple:
        z = np.zeros(num_tokens, np.int32)
        return self.runner.lm.params, hidden, z, z, self.runner.max_logprobs

    def _lower_step(self, b: Bucket):
        lowered = self.runner._step.lower(*self._step_arguments(b))
        self._hidden_info[b.num_tokens] = lowered.out_info[1]
        return lowered

    def _lower_sampler(self, num_rows: int, profile: str):
        return self.runner._sample.lower(*self._sampler_arguments(num_rows, profile))

    def _lower_prompt_lp(self, num_tokens: int):
        # The step's hidden states as an abstract value laid out as the step lays them out
        # (replicated on a mesh); a real stand-in array would itself be a program to compile.
        info = self._hidden_info[num_tokens]
        hidden = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=self.runner._replicated)
        return self.runner._prompt_logprobs.lower(*self._prompt_lp_arguments(hidden, num_tokens))

    def _step(self, b: Bucket) -> None:
        r = self.runner
        last, hidden, r.kv.caches = r._step(*self._step_arguments(b))
        self._hidden[b.num_tokens] = hidden
        jax.block_until_ready(last)

    def _sampler(self, num_rows: int, profile: str) -> None:
        jax.block_until_ready(self.runner._sample(*self._sampler_arguments(num_rows, profile)))

    def _prompt_lp(self, num_tokens: int) -> None:
        h = self._hidden[num_tokens]  # the step's own output: same shape, dtype and placement
        jax.block_until_ready(self.runner._prompt_logprobs(*self._prompt_lp_arguments(h, num_tokens)))
