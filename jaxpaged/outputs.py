"""What a request gives back: vLLM's `RequestOutput`, `CompletionOutput`, `Logprob`, `RequestMetrics`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Logprob:
    """Log-probability of one token.

    Args:
        logprob: log-probability of the token under the model's distribution.
        rank: 1-based rank of the token in that distribution (1 = most likely).
        decoded_token: the token's text, filled in by the detokenizer.
    """

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k ones).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts the first token).
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Args:
        index: which of the request's `n` sequences this is.
        text: the generated text.
        token_ids: the generated token ids.
        cumulative_logprob: sum of the sampled tokens' logprobs (None unless logprobs were asked).
        logprobs: per generated token, the top-k logprobs (None unless asked).
        finish_reason: None while running, then "stop" (EOS / stop string / stop token), "length",
            "abort", or "error" (a step failed because of this request; see RequestOutput.error).
        stop_reason: the stop string or stop token id that ended the sequence; None for EOS/length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
            f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason})"
        )


@dataclass
class RequestMetrics:
    """Timestamps (time.time() seconds) of one request's life."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    time_in_queue: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    """The output of one request: its prompt and its `n` completions so far.

    Args:
        request_id: the caller's id for the request.
        prompt: the prompt string (None if it was given as token ids).
        prompt_token_ids: the prompt's token ids.
        prompt_logprobs: per prompt token, the top-k logprobs; the first entry is None.
        outputs: one CompletionOutput per sequence.
        finished: whether every sequence of the request has finished.
        metrics: timestamps of the request.
        error: set when a step failed because of this request (its outputs' finish_reason is
            "error"); the engine went on serving the others.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: Optional[list[int]]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    num_cached_tokens: Optional[int] = None
    error: Optional[str] = None  # jaxpaged: why a request finished with finish_reason "error"

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
            f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )


@dataclass
class BeamSearchSequence:
    """One beam returned by ``LLM.beam_search`` (vLLM's ``BeamSearchSequence``).

    Args:
        tokens: prompt token ids followed by the beam's generated ids (its stop token included).
        logprobs: per generated token, {token id: Logprob} of the chosen token and the top ones.
        cum_logprob: sum of the generated tokens' logprobs.
        text: the decoded text of ``tokens`` (prompt and generation, as vLLM's), None without a
            tokenizer.
        finish_reason: "stop" (EOS or a stop token id) or "length".
        stop_reason: the stop token id that ended it, when it is not EOS.
        score: jaxpaged: what ranked it, cum_logprob / generated length ** length_penalty.
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    score: float = 0.0


@dataclass
class BeamSearchOutput:
    """``LLM.beam_search``'s result for one prompt: its beams, best first."""

    sequences: list[BeamSearchSequence]
