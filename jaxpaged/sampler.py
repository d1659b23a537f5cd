"""On-device sampler: one batch of rows, each with its own SamplingParams.

Host side: `SamplingTensors.from_rows` packs per-row parameters, PRNG keys, logit biases and the
token history (for penalties) into padded NumPy arrays; `SamplerFlags.from_rows` says which stages
the batch needs, so cheap batches (all greedy, no penalties) skip the sort and the scatters.

Device side: `sample(logits, tensors, flags)` is a pure function, jit-able with `flags` static.
Order of operations (vLLM v1):
  1. logit_bias and min_tokens suppression (stop ids / EOS -> -inf) on the raw logits;
  2. repetition, frequency and presence penalties;
  3. greedy rows take the argmax here;
  4. temperature, then min_p, top_k, top_p masks (one descending sort serves top_k and top_p);
  5. Gumbel-max draw with the row's own PRNG key.
Logprobs are by default those of the raw model distribution, log_softmax of the logits before any
of the above (vLLM's default `logprobs_mode="raw_logprobs"`); `logprobs_mode="processed_logprobs"`
reports the distribution actually sampled from (after step 4).

top_k and top_p become a threshold on the logit value, so tokens tied with the last kept token are
all kept (vLLM's sort-and-scatter keeps an arbitrary subset of such ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.outputs import Logprob
from jaxpaged.sampling_params import SAMPLING_EPS, SamplingParams
from jaxpaged.scheduler_output import SamplingRow
from pallas_kernels.sizes import next_pow2

# Padding token id in the history / bias arrays: out of range for any vocab, dropped by the scatters.
PAD_TOKEN_ID = 1 << 30
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_prng_key(seed: int, step: int) -> np.ndarray:
    """Threefry key data (uint32[2]) for a seeded row at output position `step`.

    Pure function of (seed, step), computed on the host, so a seeded sequence's tokens do not depend
    on batch composition, bucket size or which rows happen to be seeded.
    """
    x = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return np.array([x >> 32, x & 0xFFFFFFFF], dtype=np.uint32)


def _needs_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _banned_ids(p: SamplingParams, num_output_tokens: int, eos_token_id: Optional[int]) -> set[int]:
    """Token ids suppressed because the sequence has not reached min_tokens yet."""
    if num_output_tokens >= p.min_tokens:
        return set()
    banned = set(p.stop_token_ids) | p.all_stop_token_ids
    if eos_token_id is not None and not p.ignore_eos:
        banned.add(eos_token_id)
    return banned


def max_bias_entries(p: SamplingParams, eos_token_id: int | None) -> int:
    """The most logit-bias slots one row of these params can fill: its ``logit_bias`` plus, while
    it is under ``min_tokens``, the banned stop ids and EOS. The engine refuses a request above
    the runner's fixed bias width at admission, so packing a row never overflows."""
    keys = set(p.logit_bias or ())
    if p.min_tokens > 0:
        keys |= _banned_ids(p, 0, eos_token_id)
    return len(keys)


def _bucket(n: int, minimum: int) -> int:
    """0 stays 0 (stage unused); otherwise the next power of two >= max(n, minimum)."""
    return 0 if n == 0 else next_pow2(n, minimum)


@dataclass(frozen=True)
class SamplerFlags:
    """Static (compile-time) switches of `sample`; hashable, one compilation per distinct value.

    A superset of what a batch needs is always correct (a stage whose per-row values are neutral is
    a no-op), so a runner may pin some flags on to compile fewer variants.

    Args:
        all_greedy: every row is greedy: skip temperature, masks and random draws.
        do_min_p: some row has min_p > 0.
        do_top_k_top_p: some row has top_k or top_p set (needs a sort over the vocab).
        do_penalties: some row has a repetition / presence / frequency penalty.
        do_logit_bias: some row has logit_bias or is still under min_tokens.
        return_logprobs: compute the sampled token's logprob and rank.
        num_top_logprobs: width K of the returned top-k logprobs (0 = none).
        logprobs_mode: "raw_logprobs" (model distribution) or "processed_logprobs".
    """

    all_greedy: bool = True
    do_min_p: bool = False
    do_top_k_top_p: bool = False
    do_penalties: bool = False
    do_logit_bias: bool = False
    return_logprobs: bool = False
    num_top_logprobs: int = 0
    logprobs_mode: str = "raw_logprobs"

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.num_top_logprobs < 0:
            raise ValueError(f"num_top_logprobs must be >= 0, got {self.num_top_logprobs}")

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[SamplingRow | tuple],
        num_top_logprobs: Optional[int] = None,
        logprobs_mode: str = "raw_logprobs",
        eos_token_id: Optional[int] = None,
    ) -> SamplerFlags:
        """The smallest flags that sample `rows` correctly.

        `num_top_logprobs`: fixed top-k width (e.g. the engine's max_logprobs, to compile once);
        default: the largest `logprobs` any row asked for.
        """
        rows = [SamplingRow(*r) for r in rows]
        params = [r.params for r in rows]
        wanted = max((p.logprobs or 0 for p in params), default=0)
        # best_of and beam search rank sequences by logprob, whether or not the caller asked for them
        any_logprobs = any(p.needs_sample_logprobs for p in params)
        if num_top_logprobs is None:
            num_top_logprobs = wanted
        elif any_logprobs and num_top_logprobs < wanted:
            raise ValueError(f"logprobs must be at most {num_top_logprobs}, got {wanted}")
        random = [p for p in params if p.temperature >= SAMPLING_EPS]
        return cls(
            all_greedy=not random,
            do_min_p=any(p.min_p > 0.0 for p in random),
            do_top_k_top_p=any(p.top_k != -1 or p.top_p < 1.0 for p in random),
            do_penalties=any(_needs_penalties(p) for p in params),
            do_logit_bias=any(
                p.logit_bias or _banned_ids(p, len(r.output_token_ids), eos_token_id)
                for p, r in zip(params, rows)
            ),
            return_logprobs=any_logprobs,
            num_top_logprobs=num_top_logprobs if any_logprobs else 0,
            logprobs_mode=logprobs_mode,
        )


@dataclass
class SamplingTensors:
    """Per-row sampling inputs, padded to `num_rows_padded` rows (a pytree of arrays).

    Padding rows are greedy with neutral parameters; their outputs are to be ignored.
    Token-id arrays are padded with PAD_TOKEN_ID, which the device scatters drop.
    """

    temperature: np.ndarray  # [S] f32, 0 for greedy rows
    top_p: np.ndarray  # [S] f32
    top_k: np.ndarray  # [S] i32, 0 = off
    min_p: np.ndarray  # [S] f32
    presence_penalty: np.ndarray  # [S] f32
    frequency_penalty: np.ndarray  # [S] f32
    repetition_penalty: np.ndarray  # [S] f32
    prng_keys: np.ndarray  # [S, 2] u32 threefry key data
    bias_token_ids: np.ndarray  # [S, B] i32
    bias_values: np.ndarray  # [S, B] f32 (-inf bans a token)
    prompt_token_ids: np.ndarray  # [S, Lp] i32, only filled when some row has penalties
    output_token_ids: np.ndarray  # [S, Lo] i32, only filled when some row has penalties

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[SamplingRow | tuple],
        vocab_size: int,
        num_rows_padded: int,
        generator: Optional[np.random.Generator] = None,
        eos_token_id: Optional[int] = None,
        history_width: Optional[int] = None,
        bias_width: Optional[int] = None,
    ) -> SamplingTensors:
        """Pack `rows` ((params, prompt_token_ids, output_token_ids[, sample_index]) each).

        Args:
            vocab_size: the logits' last dimension; token ids in params are checked against it.
            num_rows_padded: the batch bucket S (>= len(rows)).
            generator: the engine's generator, source of keys for unseeded rows (a fresh one if None).
            eos_token_id: suppressed (with stop ids) while a row is under min_tokens, unless ignore_eos.

        History and bias widths are 0 when unused, else padded to a power of two (>= 16 / >= 8),
        so the number of distinct shapes stays logarithmic.
        """
        rows = [SamplingRow(*r) for r in rows]
        if num_rows_padded < len(rows):
            raise ValueError(f"num_rows_padded must be >= {len(rows)} rows, got {num_rows_padded}")
        if generator is None:
            generator = np.random.default_rng()
        s = num_rows_padded
        f32 = np.float32
        temperature = np.zeros(s, f32)
        top_p = np.ones(s, f32)
        top_k = np.zeros(s, np.int32)
        min_p = np.zeros(s, f32)
        presence = np.zeros(s, f32)
        frequency = np.zeros(s, f32)
        repetition = np.ones(s, f32)
        # One draw for every row (one generator call per step instead of one per row); seeded rows
        # then overwrite theirs with keys that depend only on (seed, step).
        keys = generator.integers(0, 1 << 32, size=(s, 2), dtype=np.uint64).astype(np.uint32)
        biases: list[dict[int, float]] = []
        for i, r in enumerate(rows):
            p = r.params
            p.verify_vocab(vocab_size)
            if p.temperature >= SAMPLING_EPS:
                temperature[i] = p.temperature
                top_p[i] = p.top_p
                top_k[i] = 0 if p.top_k == -1 else min(p.top_k, vocab_size)
                min_p[i] = p.min_p
            presence[i] = p.presence_penalty
            frequency[i] = p.frequency_penalty
            repetition[i] = p.repetition_penalty
            if p.seed is not None:
                keys[i] = seeded_prng_key(p.seed + r.sample_index, len(r.output_token_ids))
            bias = dict(p.logit_bias or {})
            for t in _banned_ids(p, len(r.output_token_ids), eos_token_id):
                if t < vocab_size:
                    bias[t] = -np.inf
            biases.append(bias)

        width = _bucket(max((len(b) for b in biases), default=0), 8)
        if bias_width is not None:  # a runner pins the width so the program never changes shape
            if width > bias_width:  # admission (max_bias_entries) rules this out
                raise ValueError(f"logit_bias (with min_tokens bans) has more than {bias_width} entries")
            width = bias_width
        bias_ids = np.full((s, width), PAD_TOKEN_ID, np.int32)
        bias_values = np.zeros((s, width), f32)
        for i, b in enumerate(biases):
            bias_ids[i, : len(b)] = list(b.keys())
            bias_values[i, : len(b)] = list(b.values())

        penalised = [r for r in rows if _needs_penalties(r.params)]
        lp = _bucket(max((len(r.prompt_token_ids) for r in penalised), default=0), 16)
        lo = _bucket(max((len(r.output_token_ids) for r in penalised), default=0), 16)
        if history_width is not None:
            if max(lp, lo) > history_width:
                raise ValueError(f"token history longer than history_width={history_width}")
            lp = lo = history_width
        prompt_ids = np.full((s, lp), PAD_TOKEN_ID, np.int32)
        output_ids = np.full((s, lo), PAD_TOKEN_ID, np.int32)
        for i, r in enumerate(rows):
            if _needs_penalties(r.params):
                prompt_ids[i, : len(r.prompt_token_ids)] = r.prompt_token_ids
                output_ids[i, : len(r.output_token_ids)] = r.output_token_ids
        return cls(temperature, top_p, top_k, min_p, presence, frequency, repetition, keys,
                   bias_ids, bias_values, prompt_ids, output_ids)


jax.tree_util.register_dataclass(
    SamplingTensors,
    data_fields=[
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "prng_keys", "bias_token_ids", "bias_values", "prompt_token_ids",
        "output_token_ids",
    ],
    meta_fields=[],
)


class SamplerOutput(NamedTuple):
    """Result of `sample`; logprob fields are zero-filled when the flags did not ask for them."""

    token_ids: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, logprob of the sampled token
    ranks: jax.Array  # [S] i32, 1-based rank of the sampled token
    topk_ids: jax.Array  # [S, K] i32
    topk_logprobs: jax.Array  # [S, K] f32


class PromptLogprobsOutput(NamedTuple):
    token_logprobs: jax.Array  # [T] f32, logprob of the next prompt token at each position
    ranks: jax.Array  # [T] i32
    topk_ids: jax.Array  # [T, K] i32
    topk_logprobs: jax.Array  # [T, K] f32


def apply_logit_bias(logits: jax.Array, token_ids: jax.Array, values: jax.Array) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.asarray(logits).at[rows, token_ids].add(values, mode="drop")


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM semantics: repetition over prompt + output tokens, presence / frequency over output."""
    s, v = logits.shape
    rows = jnp.arange(s)[:, None]
    counts = jnp.zeros((s, v), jnp.int32).at[rows, t.output_token_ids].add(1, mode="drop")
    in_prompt = jnp.zeros((s, v), jnp.bool_).at[rows, t.prompt_token_ids].set(True, mode="drop")
    in_output = counts > 0
    rep = t.repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(in_prompt | in_output, penalised, logits)
    logits = logits - t.frequency_penalty[:, None] * counts.astype(logits.dtype)
    return logits - t.presence_penalty[:, None] * in_output.astype(logits.dtype)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens with p < min_p * p_max, i.e. logit < max_logit + log(min_p)."""
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask to the top_k tokens (0 = off), then to the top_p probability mass of what remains."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, top_k, v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    # A token stays while the mass strictly above it is < top_p; the top token always stays.
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_above < top_p[:, None], axis=-1)
    # top_p == 1 must be a no-op even where float cumsum reaches 1 before the tail.
    num_kept = jnp.where(top_p >= 1.0, k, jnp.clip(num_kept, 1, k))
    cutoff = jnp.take_along_axis(desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _token_logprob_and_rank(logprobs: jax.Array, token_ids: jax.Array):
    token_lp = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)
    rank = jnp.sum(logprobs >= token_lp, axis=-1).astype(jnp.int32)
    return token_lp[:, 0], rank


def _top_logprobs(logprobs: jax.Array, k: int):
    if k == 0:
        n = logprobs.shape[0]
        return jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)
    values, ids = jax.lax.top_k(logprobs, k)
    return ids.astype(jnp.int32), values


def sample(logits: jax.Array, tensors: SamplingTensors, flags: SamplerFlags) -> SamplerOutput:
    """Draw one token per row of `logits` [S, V] (float32). Pure; jit with `flags` static."""
    logits = logits.astype(jnp.float32)
    raw = logits
    if flags.do_logit_bias:
        logits = apply_logit_bias(logits, tensors.bias_token_ids, tensors.bias_values)
    if flags.do_penalties:
        logits = apply_penalties(logits, tensors)
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if flags.all_greedy:
        token_ids, processed = greedy_ids, logits
    else:
        is_greedy = tensors.temperature < SAMPLING_EPS
        temperature = jnp.where(is_greedy, 1.0, tensors.temperature)
        processed = logits / temperature[:, None]
        if flags.do_min_p:
            processed = apply_min_p(processed, tensors.min_p)
        if flags.do_top_k_top_p:
            processed = apply_top_k_top_p(processed, tensors.top_k, tensors.top_p)
        keys = jax.random.wrap_key_data(tensors.prng_keys, impl="threefry2x32")
        # One key per row: a row's noise is independent of the other rows and of the batch size.
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (logits.shape[-1],), jnp.float32))(keys)
        random_ids = jnp.argmax(processed + gumbel, axis=-1).astype(jnp.int32)
        token_ids = jnp.where(is_greedy, greedy_ids, random_ids)

    s = logits.shape[0]
    if not flags.return_logprobs:
        k = flags.num_top_logprobs
        return SamplerOutput(token_ids, jnp.zeros(s, jnp.float32), jnp.zeros(s, jnp.int32),
                             jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32))
    source = raw if flags.logprobs_mode == "raw_logprobs" else processed
    logprobs = jax.nn.log_softmax(source, axis=-1)
    token_lp, rank = _token_logprob_and_rank(logprobs, token_ids)
    topk_ids, topk_lp = _top_logprobs(logprobs, flags.num_top_logprobs)
    return SamplerOutput(token_ids, token_lp, rank, topk_ids, topk_lp)


def compute_prompt_logprobs(
    logits: jax.Array, next_token_ids: jax.Array, num_top_logprobs: int
) -> PromptLogprobsOutput:
    """Prompt logprobs: at each position t, log_softmax(logits[t]) of prompt token t+1, plus top-k.

    `logits` [T, V] are the model's logits at T prompt positions and `next_token_ids` [T] the prompt
    tokens that follow them (the caller aligns chunks: a chunk's last position pairs with the first
    token of the next chunk; the prompt's last position has no prompt token after it). Pure; jit
    with `num_top_logprobs` static.
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp, rank = _token_logprob_and_rank(logprobs, next_token_ids.astype(jnp.int32))
    topk_ids, topk_lp = _top_logprobs(logprobs, num_top_logprobs)
    return PromptLogprobsOutput(token_lp, rank, topk_ids, topk_lp)


sample_jit = jax.jit(sample, static_argnums=2)
compute_prompt_logprobs_jit = jax.jit(compute_prompt_logprobs, static_argnums=2)


def build_logprob_dict(
    token_id: int,
    logprob: float,
    rank: int,
    topk_ids: Sequence[int],
    topk_logprobs: Sequence[float],
    num_logprobs: int,
) -> dict[int, Logprob]:
    """vLLM's per-token logprobs entry: the chosen token plus the `num_logprobs` most likely ones."""
    out = {int(token_id): Logprob(float(logprob), int(rank))}
    for i in range(num_logprobs):
        out.setdefault(int(topk_ids[i]), Logprob(float(topk_logprobs[i]), i + 1))
    return out
