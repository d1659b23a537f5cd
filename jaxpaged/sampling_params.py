"""Per-request sampling parameters, with vLLM's names, defaults and validation."""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# A seed is a 64-bit signed integer, as vLLM's API (torch.long) and OpenAI's take it.
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1


class RequestOutputKind(enum.IntEnum):
    """Which outputs ``LLMEngine.step`` emits for a request (vLLM's names)."""

    CUMULATIVE = 0  # every step: everything so far
    DELTA = 1  # every step: only what is new since the request's previous output (the server)
    FINAL_ONLY = 2  # only when the request finishes (what offline ``LLM.generate`` needs)


class SamplingType(enum.IntEnum):
    """How a request draws its tokens."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _check_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass, but `n=True` is a bug at the call site, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


@dataclass
class SamplingParams:
    """Sampling parameters for one request (vLLM's `SamplingParams`).

    Args:
        n: number of sequences returned for the prompt (with ``use_beam_search``: the beam width).
        best_of: sequences generated (>= n, default n), sharing the prompt's blocks; the ``n``
            with the highest cumulative logprob (of the model's raw distribution) are returned,
            best first, once all have finished (so they are not streamed).
        use_beam_search: beam search of width ``n`` (greedy: temperature must be 0) instead of
            sampling, with Hugging Face's rules (``jaxpaged/beam_search.py``); the ``n`` best
            beams are returned when the search ends. Takes ``max_tokens``, ``ignore_eos``,
            ``stop_token_ids``, ``length_penalty``, ``early_stopping``, ``logprobs``,
            ``prompt_logprobs`` and the detokenization fields; penalties, ``logit_bias``,
            ``min_tokens`` and stop strings are refused.
        length_penalty: beam search: a finished beam scores cumulative logprob / length **
            length_penalty.
        early_stopping: beam search: True (stop once n beams finished), False (stop when no
            running beam can beat the finished ones, at their current length) or "never" (... at
            the longest length they could reach).
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token already generated.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it was generated.
        repetition_penalty: > 0; logits of tokens seen in prompt or output are divided by it when
            positive and multiplied by it when negative (1 = off).
        temperature: >= 0; below 1e-5 the request is greedy.
        top_p: in (0, 1]; smallest set of tokens whose probability mass reaches top_p.
        top_k: 0 or -1 (off; 0 is current vLLM's spelling, stored as -1) or >= 1; the k most likely tokens.
        min_p: in [0, 1]; drop tokens whose probability is below min_p times the top token's.
        seed: makes the request's tokens reproducible, independent of the rest of the batch.
        stop: strings that end generation (normalised to a list).
        stop_token_ids: token ids that end generation.
        ignore_eos: keep generating after the EOS token.
        max_tokens: most tokens to generate (None: up to the model's context length).
        min_tokens: stop tokens / EOS are suppressed until this many tokens are generated.
        logprobs: number of top log-probabilities returned per generated token (plus the sampled one).
        prompt_logprobs: number of top log-probabilities returned per prompt token.
        include_stop_str_in_output: keep the matched stop string in the output text.
        skip_special_tokens: leave special tokens out of the output text.
        spaces_between_special_tokens: join special tokens with spaces (slow tokenizers only, as vLLM).
        logit_bias: token id -> value added to that token's logit before sampling.
        detokenize: produce output text (stop strings need it).
        output_kind: CUMULATIVE (everything so far, every step), DELTA (only what is new) or
            FINAL_ONLY (only the finished output).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # Stop ids plus EOS ids, kept even when ignore_eos (min_tokens suppresses them all).
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logit_bias is not None:
            # JSON clients send string keys; normalise so the sampler sees ints.
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(
                    f"logit_bias must map integer token ids to numbers, got {self.logit_bias!r}"
                ) from None
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs are meaningless, reset them so the sampler can skip them.
            self.top_p = 1.0
            self.top_k = -1
            self.min_p = 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify_args(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        _check_int("best_of", self.best_of, allow_none=True)
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n ({self.n}), got {self.best_of}")
        self.presence_penalty = _check_number("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _check_number("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _check_number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be in (0, inf), got {self.repetition_penalty}"
            )
        self.temperature = _check_number("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be in [0, inf), got {self.temperature}")
        self.top_p = _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disable) or at least 1, got {self.top_k}")
        if self.top_k == 0:
            self.top_k = -1
        self.min_p = _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("seed", self.seed, allow_none=True)
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}] (a 64-bit integer), got {self.seed}")
        _check_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check_int(name, value, allow_none=True)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if not s:
                raise ValueError("stop cannot contain an empty string")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(
                    f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
                )
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                if token_id < 0:
                    raise ValueError(f"logit_bias token ids must be non-negative, got {token_id}")
                value = _check_number(f"logit_bias[{token_id}]", bias)
                if not math.isfinite(value):
                    raise ValueError(f"logit_bias[{token_id}] must be finite, got {value}")
                self.logit_bias[token_id] = value
        self._verify_beam_search()

    def _verify_beam_search(self) -> None:
        if not isinstance(self.use_beam_search, bool):
            raise ValueError(f"use_beam_search must be a boolean, got {self.use_beam_search!r}")
        self.length_penalty = _check_number("length_penalty", self.length_penalty)
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not self.use_beam_search:
            if self.early_stopping is not False:
                raise ValueError("early_stopping is only used by beam search (use_beam_search=True)")
            if self.length_penalty != 1.0:
                raise ValueError("length_penalty is only used by beam search (use_beam_search=True)")
            return
        if self.temperature >= SAMPLING_EPS:
            raise ValueError(f"temperature must be 0 when using beam search, got {self.temperature}")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n (the beam width) with beam search, got best_of={self.best_of}, n={self.n}")
        unsupported = [name for name, on in (
            ("presence_penalty", self.presence_penalty != 0.0), ("frequency_penalty", self.frequency_penalty != 0.0),
            ("repetition_penalty", self.repetition_penalty != 1.0), ("logit_bias", bool(self.logit_bias)),
            ("min_tokens", self.min_tokens > 0), ("stop", bool(self.stop))) if on]
        if unsupported:
            raise ValueError(f"{unsupported[0]} is not supported with beam search (use_beam_search=True)")

    def verify_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id given in these params is outside [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            for token_id in ids:
                if token_id >= vocab_size:
                    raise ValueError(
                        f"{name} token id must be in [0, {vocab_size}), got {token_id}"
                    )

    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Fold the model's EOS id(s) into the stop ids, as vLLM does.

        `model_eos_token_id` (the tokenizer's EOS) is only recorded in `all_stop_token_ids` (the
        scheduler checks it itself unless ignore_eos); extra EOS ids from generation_config become
        stop_token_ids unless ignore_eos.
        """
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                eos_ids.update(self.stop_token_ids)
                self.stop_token_ids = sorted(eos_ids)

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids plus the model's EOS ids (filled by update_from_generation_config)."""
        return self._all_stop_token_ids

    @property
    def num_seqs(self) -> int:
        """Sequences the request runs: best_of, else n."""
        return self.best_of or self.n

    @property
    def needs_sample_logprobs(self) -> bool:
        """Whether the sampler must return logprobs for this request's rows: asked for, or
        needed to rank best_of samples or beams."""
        return self.logprobs is not None or self.use_beam_search or self.num_seqs > self.n

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def clone(self) -> SamplingParams:
        """A deep copy (requests must not share mutable params)."""
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """``LLM.beam_search``'s parameters (vLLM's ``BeamSearchParams``).

    Args:
        beam_width: beams kept at every step, and sequences returned.
        max_tokens: most tokens a beam generates.
        ignore_eos: EOS is an ordinary token (no beam finishes before max_tokens).
        temperature: must be 0 (beam search ranks the model's own distribution).
        length_penalty: a finished beam scores cumulative logprob / length ** length_penalty.
        include_stop_str_in_output: keep the EOS token's text in the output text.
        early_stopping: True, False or "never" (Hugging Face's meanings; see SamplingParams).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def to_sampling_params(self, **kwargs: Any) -> SamplingParams:
        return SamplingParams(
            n=self.beam_width, use_beam_search=True, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
            temperature=self.temperature, length_penalty=self.length_penalty, early_stopping=self.early_stopping,
            include_stop_str_in_output=self.include_stop_str_in_output, **kwargs)
