"""Runs one scheduled step on the device.

The runner packs a :class:`~jaxpaged.scheduler_output.SchedulerOutput` into NumPy arrays padded to a
bucket (tokens, positions, slot mapping, block tables, sequence lengths), runs the bucket's
jit-compiled step with the KV cache donated (updated in place), and samples on the device. Every
program it can run is compiled in :meth:`ModelRunner.warm_up`; the engine's compilation counter
shows that nothing compiles afterwards.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged import tensor_parallel
from jaxpaged.buckets import Bucket, make_buckets, pick_bucket
from jaxpaged.kv_cache import KVCache
from jaxpaged.model_loader import LoadedModel
from jaxpaged.scheduler_output import SamplingRow, ScheduledSequence, SchedulerOutput
from jaxpaged.step_errors import SequenceError
from jaxpaged.step_timeline import StepTimeline
from jaxpaged.warm_up import WarmUp
from jaxpaged.sampler import (
    SamplerFlags,
    SamplingTensors,
    compute_prompt_logprobs,
    sample,
)
from models.attention_metadata import AttentionMetadata, pack_attention_metadata
from pallas_kernels.sizes import cdiv, next_pow2

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclasses.dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens ``start + 1 .. start + len`` (each from the previous position)."""

    start: int
    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclasses.dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken]
    prompt_logprobs: dict[int, PromptLogprobs]
    num_tokens: int  # real tokens computed
    num_padded_tokens: int  # tokens of the bucket actually run


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose results are still on the device."""

    sched: SchedulerOutput  # the step it runs
    bucket: Bucket | None
    chunks: list  # (seq ids, (sampler output, padded token ids), with logprobs) per sampler call
    token_row: dict[int, int]  # seq id -> index into ``tokens`` (empty: tokens not chainable)
    num_tokens: int  # real tokens computed
    tokens: jax.Array | None = None  # [max_rows] device array of sampled ids, for the next step's pending inputs
    prompt_logprobs: Callable[[], dict] | None = None

    @property
    def label(self) -> str | None:
        """The bucket it ran in ("256d": decode-only, 256 rows; "512": mixed, 512 tokens)."""
        if self.bucket is None:
            return None
        return f"{self.bucket.num_tokens}{'d' if self.bucket.decode_only else ''}"

    @property
    def chainable(self) -> bool:
        """Whether the next step can take this one's sampled tokens on the device (one sampler call)."""
        return len(self.chunks) <= 1


def forward_step(model: Any, params: Any, caches: Any, input_ids, positions, md: AttentionMetadata):
    """One forward pass: (last-token logits [S, V] float32, hidden [T, H], updated caches)."""
    hidden, caches = model.apply({"params": params}, input_ids, positions, caches, md)
    last = model.apply({"params": params}, hidden[md.logits_indices], method="compute_logits")
    return last, hidden, caches


# Every part of the flat step input starts on a 256-byte boundary: XLA may hand a slice of the
# input to a custom call as a view at its offset (no copy), and Mosaic GPU kernels refuse operands
# that are not 256-byte aligned.
STEP_INPUT_ALIGN = 64  # int32 elements


def _step_input_offsets(T: int, S: int, MB: int) -> tuple[tuple[int, ...], list[int], int]:
    """(sizes, offsets, total length) of the flat input's parts: ids, positions, prev_idx,
    slot_mapping [T] each, query_start_loc [S + 1], seq_lens, logits_indices [S], block_tables [S*MB]."""
    sizes = (T, T, T, T, S + 1, S, S, S * MB)
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += cdiv(n, STEP_INPUT_ALIGN) * STEP_INPUT_ALIGN
    return sizes, offsets, at


def _pack_step_inputs(ids: np.ndarray, positions: np.ndarray, prev_idx: np.ndarray,
                      md: AttentionMetadata) -> tuple[np.ndarray, tuple]:
    """The step's int32 inputs as one flat array, and the static layout that cuts it back (with the
    metadata's static fields: decode_only, the backend and the tensor-parallel mesh)."""
    T, (S, MB) = len(ids), md.block_tables.shape
    sizes, offsets, total = _step_input_offsets(T, S, MB)
    flat = np.zeros(total, np.int32)
    parts = (ids, positions, prev_idx, md.slot_mapping, md.query_start_loc, md.seq_lens, md.logits_indices,
             np.asarray(md.block_tables).reshape(-1))
    for part, n, at in zip(parts, sizes, offsets):
        flat[at : at + n] = part
    return flat, (T, S, MB, md.decode_only, md.attention_backend, md.mesh)


def _unpack_step_inputs(flat: jax.Array, layout: tuple):
    T, S, MB, decode_only, backend, mesh = layout
    sizes, offsets, _ = _step_input_offsets(T, S, MB)
    ids, positions, prev_idx, slots, qsl, seq_lens, logits_idx, tables = (
        flat[at : at + n] for n, at in zip(sizes, offsets))
    md = AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens,
                           block_tables=tables.reshape(S, MB), logits_indices=logits_idx,
                           decode_only=decode_only, attention_backend=backend, mesh=mesh)
    return ids, positions, prev_idx, md


class ModelRunner:
    """Owns the KV pool and the compiled step/sampler programs for one loaded model."""

    # Sampler variants compiled at start-up: a superset of what a batch needs is always correct,
    # so four profiles cover every request mix with a handful of programs. Each sends the device
    # only what it reads: greedy nothing but the logits' row indices; random the temperatures and
    # keys (and top-k / top-p / min-p); full also the token history and logit biases.
    GREEDY = "greedy"
    RANDOM = "random"
    TOPKP = "topkp"
    FULL = "full"
    PROFILES = (GREEDY, RANDOM, TOPKP, FULL)

    def __init__(
        self,
        lm: LoadedModel,
        kv: KVCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_logprobs: int,
        eos_token_id: int | None,
        seed: int,
        with_decode_buckets: bool,
        bias_width: int = 64,
    ):
        self.lm = lm
        self.kv = kv
        self.block_size = kv.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = cdiv(max_model_len, kv.block_size)
        self.max_num_seqs = max_num_seqs
        self.max_logprobs = max_logprobs
        self.eos_token_id = eos_token_id
        self.vocab_size = lm.config.vocab_size
        # Kernel backends (GPU) get decode buckets and coarser mixed ones: see make_buckets.
        self.buckets = make_buckets(
            max_num_batched_tokens, max_num_seqs, with_decode_buckets,
            min_mixed_tokens=256 if with_decode_buckets else None, decode_growth=4 if with_decode_buckets else 2,
        )
        self.max_rows = next_pow2(max(b.num_seqs for b in self.buckets), 8)
        self.generator = np.random.default_rng(seed)
        self.history_width = next_pow2(max_model_len, 16)
        # Logit-bias slots per row in the full sampler: sized by the engine from its admission caps.
        self.bias_width = next_pow2(bias_width, 8)
        # Tensor parallelism (lm.mesh): parameters and cache keep their shardings through the step,
        # everything else (inputs, logits, sampled tokens) is replicated (jaxpaged/tensor_parallel.py).
        mesh = lm.mesh
        self._replicated = None if mesh is None else tensor_parallel.replicated(mesh)
        self._step = jax.jit(self._step_impl, donate_argnums=(1,), static_argnums=(4,),
                             **tensor_parallel.step_jit_kwargs(mesh, lm.params, kv.caches, 2))
        self._no_prev_tokens = tensor_parallel.zeros((self.max_rows,), jnp.int32, self._replicated)
        self._sample = jax.jit(self._sample_impl, static_argnums=(3,), **tensor_parallel.replicated_out_kwargs(mesh))
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_impl, static_argnums=(4,),
                                        **tensor_parallel.replicated_out_kwargs(mesh))
        self.timeline = StepTimeline()  # the engine's, when it profiles its steps
        self.precompile_seconds = 0.0  # set by warm_up

    # ---- device programs ------------------------------------------------------------------
    def _step_impl(self, params, caches, flat, prev_tokens, layout: tuple):
        # The host packs every int32 input of the step into one array (one host-to-device copy a
        # step instead of eight); ``layout`` (static) says how to cut it.
        input_ids, positions, prev_idx, md = _unpack_step_inputs(flat, layout)
        # Async scheduling: an input id the previous step samples is read from its output here
        # (prev_idx >= 0), so the host never waits for it.
        input_ids = jnp.where(prev_idx >= 0, prev_tokens[jnp.maximum(prev_idx, 0)], input_ids)
        last, hidden, caches = forward_step(self.lm.model, params, caches, input_ids, positions, md)
        # Pad to a fixed row count so the sampler compiles per row bucket only, not per step bucket.
        last = jnp.pad(last, ((0, self.max_rows - last.shape[0]), (0, 0)))
        return last, hidden, caches

    def _sample_impl(self, logits, rows, tensors, flags):
        out = sample(logits[rows], tensors, flags)
        # The token ids again at a fixed length: the next step's input when scheduling runs ahead.
        return out, jnp.pad(out.token_ids, (0, self.max_rows - out.token_ids.shape[0]))

    def _prompt_logprobs_impl(self, params, hidden, idx, next_ids, k):
        logits = self.lm.model.apply({"params": params}, hidden[idx], method="compute_logits")
        return compute_prompt_logprobs(logits, next_ids, k)

    def _flags(self, profile: str) -> SamplerFlags:
        if profile == self.GREEDY:
            return SamplerFlags()
        if profile == self.RANDOM:
            return SamplerFlags(all_greedy=False)
        if profile == self.TOPKP:
            return SamplerFlags(all_greedy=False, do_min_p=True, do_top_k_top_p=True)
        return SamplerFlags(
            all_greedy=False, do_min_p=True, do_top_k_top_p=True, do_penalties=True, do_logit_bias=True,
            return_logprobs=True, num_top_logprobs=self.max_logprobs,
        )

    def _profile_for(self, rows: Sequence[SamplingRow]) -> str:
        need = SamplerFlags.from_rows(rows, num_top_logprobs=self.max_logprobs, eos_token_id=self.eos_token_id)
        if need == SamplerFlags():
            return self.GREEDY
        if need == SamplerFlags(all_greedy=False):
            return self.RANDOM
        if not (need.do_penalties or need.do_logit_bias or need.return_logprobs):
            return self.TOPKP
        return self.FULL

    def _tensors(self, rows: Sequence[SamplingRow], num_rows: int, profile: str) -> SamplingTensors | None:
        if profile == self.GREEDY:
            for r in rows:  # what from_rows would check, for the same error at the same place
                r.params.verify_vocab(self.vocab_size)
            return None  # argmax of the logits: the sampler reads nothing else
        full = profile == self.FULL
        return SamplingTensors.from_rows(
            rows, self.vocab_size, num_rows, generator=self.generator, eos_token_id=self.eos_token_id,
            history_width=self.history_width if full else None, bias_width=self.bias_width if full else None,
        )

    # ---- warm-up ------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[str, int, int], None] | None = None) -> float:
        """Compiles every program the runner can run (and runs each once); returns the seconds it
        took. See :class:`~jaxpaged.warm_up.WarmUp`."""
        warm = WarmUp(self)
        seconds = warm.run(progress)
        self.precompile_seconds = warm.precompile_seconds
        return seconds

    # ---- one step -----------------------------------------------------------------------------
    def run_step(self, ids, positions, md: AttentionMetadata, prev_tokens=None, prev_idx=None):
        """Enqueues the compiled forward step on packed inputs (the cache is updated in place);
        returns (last-token logits padded to ``max_rows``, hidden states), both on the device."""
        last, hidden, self.kv.caches = self._step(*self.step_arguments(ids, positions, md, prev_tokens, prev_idx))
        return last, hidden

    def step_arguments(self, ids, positions, md: AttentionMetadata, prev_tokens=None, prev_idx=None) -> tuple:
        """The compiled step's arguments for these inputs (:meth:`run_step` calls it with them; the
        start-up pool lowers it with them, so both find the same program)."""
        if prev_idx is None:
            prev_idx = np.full(len(ids), -1, np.int32)
        flat, layout = _pack_step_inputs(ids, positions, prev_idx, md)
        return (self.lm.params, self.kv.caches, flat, self._no_prev_tokens if prev_tokens is None else prev_tokens,
                layout)

    def _pack_arrays(self, scheduled: Sequence[ScheduledSequence], bucket: Bucket):
        """Token ids, attention metadata and positions of the scheduled rows, padded to ``bucket``."""
        n = len(scheduled)
        q_lens = np.fromiter((len(x.token_ids) for x in scheduled), np.int64, n)
        total = int(q_lens.sum())
        ids = np.zeros(bucket.num_tokens, np.int32)
        ids[:total] = np.fromiter(itertools.chain.from_iterable(x.token_ids for x in scheduled), np.int32, total)
        md, positions = pack_attention_metadata(
            q_lens, np.fromiter((x.num_computed_tokens for x in scheduled), np.int64, n),
            [x.block_table for x in scheduled], block_size=self.block_size, num_tokens=bucket.num_tokens,
            num_seqs=bucket.num_seqs, max_blocks_per_seq=self.max_blocks_per_seq, decode_only=bucket.decode_only,
            attention_backend=self.lm.attention_backend, mesh=self.lm.mesh,
        )
        return ids, md, positions

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Runs the block operations and the forward step of ``sched``, then samples."""
        return self.collect(self.dispatch(sched))

    def dispatch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Enqueues ``sched`` on the device and returns without waiting for it.

        ``prev``: the step before, still in flight, whose sampled tokens fill this step's
        ``PENDING_TOKEN`` (negative) inputs (async scheduling); every pending input must belong to a
        sequence ``prev`` sampled.
        """
        tl = self.timeline
        self.kv.swap_out(sched.blocks_to_swap_out)
        self.kv.swap_in(sched.blocks_to_swap_in)
        self.kv.copy(sched.blocks_to_copy)
        tl.mark("dispatch.blocks")
        scheduled = sched.scheduled
        if not scheduled:
            return InFlightStep(sched, None, [], {}, 0)
        num_tokens = sum(len(s.token_ids) for s in scheduled)
        decode_only = all(len(s.token_ids) == 1 for s in scheduled)
        bucket = pick_bucket(self.buckets, num_tokens, len(scheduled), decode_only)
        ids, md, positions = self._pack_arrays(scheduled, bucket)
        prev_idx = np.full(bucket.num_tokens, -1, np.int32)
        pending = np.flatnonzero(ids < 0)
        if pending.size:
            if prev is None or prev.tokens is None:
                raise ValueError("a step with pending input tokens needs the previous step in flight")
            row_of = np.repeat(np.arange(len(scheduled)), [len(s.token_ids) for s in scheduled])
            prev_idx[pending] = [prev.token_row[scheduled[r].seq_id] for r in row_of[pending]]
            ids[pending] = 0
        tl.mark("dispatch.pack")
        # Rows to sample: one per (scheduled row, sequence drawing from it). Their inputs are
        # packed before the step runs, so a row that cannot be packed fails nothing on the device.
        row_idx: list[int] = []
        rows: list[SamplingRow] = []
        seq_ids: list[int] = []
        for i, sch in enumerate(scheduled):
            row_idx.extend([i] * len(sch.sample_seq_ids))
            rows.extend(sch.sample_rows)
            seq_ids.extend(sch.sample_seq_ids)
        packed = []
        # More rows than the largest row bucket only happens when several requests fork at once.
        for a in range(0, len(rows), self.max_rows):
            chunk = rows[a : a + self.max_rows]
            num_rows = next_pow2(len(chunk), 8)
            try:
                profile = self._profile_for(chunk)
                tensors = self._tensors(chunk, num_rows, profile)
            except Exception as exc:
                raise SequenceError(self._unpackable(chunk, seq_ids[a : a + self.max_rows]), exc) from exc
            ridx = np.zeros(num_rows, np.int32)
            ridx[: len(chunk)] = row_idx[a : a + self.max_rows]
            packed.append((seq_ids[a : a + self.max_rows], ridx, tensors, self._flags(profile)))

        tl.mark("dispatch.sampling_inputs")
        last, hidden = self.run_step(ids, positions, md, prev.tokens if pending.size else None, prev_idx)
        tl.mark("dispatch.step_call")
        chunks = [(sids, self._sample(last, ridx, tensors, flags), flags.return_logprobs)
                  for sids, ridx, tensors, flags in packed]
        tl.mark("dispatch.sample_call")
        # One chunk (the rule): its padded token ids can feed the next step on the device.
        token_row = {sid: j for j, sid in enumerate(chunks[0][0])} if len(chunks) == 1 else {}
        tokens = chunks[0][1][1] if len(chunks) == 1 else None
        prompt_lp = self._dispatch_prompt_logprobs(scheduled, hidden, bucket)
        return InFlightStep(sched, bucket, chunks, token_row, num_tokens, tokens, prompt_lp)

    def _unpackable(self, rows: Sequence[SamplingRow], seq_ids: Sequence[int]) -> list[int]:
        """The sequences whose rows fail to pack on their own (all of them if none does alone)."""
        bad = []
        for row, sid in zip(rows, seq_ids):
            try:
                self._tensors([row], 8, self._profile_for([row]))
            except Exception:  # noqa: BLE001 - any failure blames the row
                bad.append(sid)
        return bad or list(seq_ids)

    def collect(self, step: InFlightStep) -> RunnerOutput:
        """Waits for a dispatched step and returns its sampled tokens (and prompt logprobs)."""
        sampled: dict[int, SampledToken] = {}
        for sids, (out, _), with_logprobs in step.chunks:
            # Whole-array tolist() once: per-element NumPy indexing dominated this loop. Without
            # logprobs only the token ids cross back (one device-to-host copy, not five).
            toks = jax.device_get(out.token_ids).tolist()
            if with_logprobs:
                out = jax.device_get(out)
                lps, ranks = out.logprobs.tolist(), out.ranks.tolist()
                top_ids, top_lps = out.topk_ids.tolist(), out.topk_logprobs.tolist()
                for j, sid in enumerate(sids):
                    sampled[sid] = SampledToken(toks[j], lps[j], ranks[j], top_ids[j], top_lps[j])
            else:
                for j, sid in enumerate(sids):
                    sampled[sid] = SampledToken(toks[j], 0.0, 0, [], [])
        prompt_lp = step.prompt_logprobs() if step.prompt_logprobs else {}
        padded = step.bucket.num_tokens if step.bucket else 0
        return RunnerOutput(sampled, prompt_lp, step.num_tokens, padded)

    def _dispatch_prompt_logprobs(self, scheduled: Sequence[ScheduledSequence], hidden: jax.Array,
                                  bucket: Bucket) -> Callable[[], dict[int, PromptLogprobs]] | None:
        """Enqueues the prompt-logprob program; returns a function that reads its result."""
        want = [(i, s) for i, s in enumerate(scheduled) if s.want_prompt_logprobs]
        if not want:
            return None
        T = bucket.num_tokens
        idx = np.zeros(T, np.int32)
        next_ids = np.zeros(T, np.int32)
        spans = []
        off_all = 0
        offs = []
        for s in scheduled:
            offs.append(off_all)
            off_all += len(s.token_ids)
        n = 0
        for i, s in want:
            prompt = s.prompt_token_ids
            start = s.num_computed_tokens
            # Position p predicts prompt token p + 1; the prompt's last position predicts nothing.
            count = min(len(s.token_ids), len(prompt) - 1 - start)
            if count <= 0:
                spans.append((s.seq_id, start, n, 0))
                continue
            idx[n : n + count] = np.arange(offs[i], offs[i] + count)
            next_ids[n : n + count] = prompt[start + 1 : start + 1 + count]
            spans.append((s.seq_id, start, n, count))
            n += count
        pending = self._prompt_logprobs(self.lm.params, hidden, idx, next_ids, self.max_logprobs)

        def read() -> dict[int, PromptLogprobs]:
            out = jax.device_get(pending)
            result = {}
            for sid, start, a, count in spans:
                result[sid] = PromptLogprobs(
                    start, out.token_logprobs[a : a + count].tolist(), out.ranks[a : a + count].tolist(),
                    out.topk_ids[a : a + count].tolist(), out.topk_logprobs[a : a + count].tolist(),
                )
            return result

        return read
