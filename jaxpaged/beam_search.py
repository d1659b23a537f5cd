"""Beam search: the decision of each step, taken exactly as Hugging Face transformers'
``generate(num_beams=k, do_sample=False, length_penalty=..., early_stopping=...)`` takes it
(transformers 5's ``_beam_search``), on candidates the engine's sampler already returns.

The engine runs a beam search as one request whose ``k`` sequences are the beams: they share the
prompt's blocks and every common prefix, as parallel samples do. Each running beam's row returns
the top ``K = max(2, 1 + #stop ids) * k`` log-probabilities of its next token (the sampler's top
logprobs: ``log_softmax`` of the raw logits, HF's ``log_softmax(logits)``); the global top ``K``
over all beams is always among them. ``BeamSearchState.step`` turns them into the ``k`` (parent
beam, token) pairs that run next and the finished hypotheses; the scheduler then applies that to
sequences and blocks (``assign_beams``): a beam no one continues is freed, a beam continued ``c``
times is forked ``c - 1`` times (its blocks shared, the last partial block copied on the next
write), and each continues with its new token.

HF's rules, step by step, with ``g`` tokens generated so far:
  - candidates: the top K of ``beam score + token logprob`` over the running beams (at the first
    step only the prompt's beam exists);
  - a candidate *hits* if its token is a stop id (EOS unless ``ignore_eos``, ``stop_token_ids``),
    or every candidate hits when ``g + 1`` reaches the length limit;
  - finished: among the best k candidates, those that hit join the finished hypotheses with score
    ``cumulative logprob / (g + 1) ** length_penalty`` (the stop token counts), unless the k
    finished slots are full under ``early_stopping=True`` or no improvement is possible; the best
    k are kept;
  - next beams: the best k candidates that do not hit;
  - "no improvement possible" (only once k hypotheses are finished): the best running score over
    ``(g + 1) ** length_penalty`` - over ``max_new_tokens ** length_penalty`` under
    ``early_stopping="never"`` with a positive penalty - is not above the worst finished score;
  - the search ends at the length limit, when no improvement is possible, or (``early_stopping``
    True) as soon as k hypotheses are finished; the result is the finished hypotheses, best first.
Width 1 is greedy decoding, as ``generate(num_beams=1)`` is: the search ends at the first stop
token (HF's rules with ``early_stopping=True``, which for one beam are exactly greedy decoding).

Pure Python; no JAX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


def num_beam_candidates(beam_width: int, stop_ids: frozenset[int] | set[int]) -> int:
    """K = max(2, 1 + #stop ids) * beam_width (HF's ``beams_to_keep``): enough candidates that k of
    them continue even when the best ones all stop."""
    return max(2, 1 + len(stop_ids)) * beam_width


class BeamToken(NamedTuple):
    """The token a beam took and its own distribution's top logprobs (the fields of the runner's
    ``SampledToken`` that output logprobs read)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class BeamHypothesis:
    """A finished beam: its generated tokens (the stop token included when one ended it)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[Any]  # a BeamToken per token
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty: what ranks it
    finish_reason: str  # "stop" (a stop id) or "length"
    stop_reason: int | None  # the stop token id when it is not EOS


class _Beam(Protocol):
    seq_id: int
    output_token_ids: list[int]
    output_logprobs: list[float]
    output_top_logprobs: list[Any]
    cumulative_logprob: float


@dataclass
class BeamChoice:
    """One beam of the next step: ``parent`` continued with ``token``."""

    parent: Any
    token: BeamToken


@dataclass
class BeamSearchState:
    """One request's beam search (see the module docstring for the rules).

    Args:
        beam_width: k.
        length_penalty: exponent of the generated length that divides a finished score.
        early_stopping: True, False or "never" (HF's meanings).
        max_new_tokens: the length limit (the request's max_tokens, capped by max_model_len).
        eos_token_ids: stop ids that end a beam with stop_reason None.
        stop_token_ids: further stop ids (stop_reason = the id).
    """

    beam_width: int
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    finished: list[BeamHypothesis] = field(default_factory=list)  # best first, at most k
    num_generated: int = 0
    improvable: bool = True
    done: bool = False
    candidates: dict[int, Any] = field(default_factory=dict)  # seq id -> its row's top logprobs

    @property
    def num_candidates(self) -> int:
        """K: candidates kept per step (and the top logprobs each beam's row must return)."""
        return num_beam_candidates(self.beam_width, self.eos_token_ids | self.stop_token_ids)

    def add_candidates(self, seq_id: int, top: Any) -> None:
        """Records a beam's next-token distribution (``top.top_ids`` / ``top.top_logprobs``, best
        first, at least K long). Beams of a step may arrive in different engine steps."""
        self.candidates[seq_id] = top

    def drop_candidates(self, seq_ids: list[int]) -> None:
        """Forgets candidates of beams whose cache is being recomputed (they will return them again)."""
        for sid in seq_ids:
            self.candidates.pop(sid, None)

    def ready(self, beams: list[_Beam]) -> bool:
        return bool(beams) and all(b.seq_id in self.candidates for b in beams)

    def step(self, beams: list[_Beam]) -> list[BeamChoice]:
        """One beam-search step over the running ``beams`` (all ``ready``); returns the k beams of
        the next step, or [] once the search is done (``results`` then holds the answer)."""
        k, num = self.beam_width, self.num_candidates
        cands = []  # (score, beam index, token, logprob, rank)
        for i, beam in enumerate(beams):
            top = self.candidates[beam.seq_id]
            for rank, (token, lp) in enumerate(zip(top.top_ids[:num], top.top_logprobs[:num])):
                cands.append((beam.cumulative_logprob + lp, i, int(token), float(lp), rank + 1))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:num]
        stops = self.eos_token_ids | self.stop_token_ids
        at_limit = self.num_generated + 1 >= self.max_new_tokens
        hits = [at_limit or c[2] in stops for c in cands]
        length = self.num_generated + 1

        def token_of(c: tuple) -> BeamToken:  # the row's whole top list: output logprobs may want more than K
            top = self.candidates[beams[c[1]].seq_id]
            return BeamToken(c[2], c[3], c[4], list(top.top_ids), list(top.top_logprobs))

        early_stopping = True if k == 1 else self.early_stopping
        full = len(self.finished) == k
        if self.improvable and not (full and early_stopping is True):
            for c, hit in zip(cands[:k], hits[:k]):
                if hit:
                    parent = beams[c[1]]
                    stopped = c[2] in stops
                    self.finished.append(BeamHypothesis(
                        parent.output_token_ids + [c[2]], parent.output_logprobs + [c[3]],
                        parent.output_top_logprobs + [token_of(c)], c[0], c[0] / length**self.length_penalty,
                        "stop" if stopped else "length",
                        c[2] if stopped and c[2] not in self.eos_token_ids else None))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[k:]
        running = [c for c, hit in zip(cands, hits) if not hit][:k]
        self.num_generated = length
        if len(self.finished) == k and running:
            horizon = self.max_new_tokens if (early_stopping == "never" and self.length_penalty > 0) else length
            best_possible = running[0][0] / horizon**self.length_penalty
            self.improvable = self.improvable and best_possible > self.finished[-1].score
        self.done = (at_limit or not running or not self.improvable
                     or (early_stopping is True and len(self.finished) == k))
        choices = [] if self.done else [BeamChoice(beams[c[1]], token_of(c)) for c in running]
        self.candidates.clear()
        return choices

    def results(self) -> list[BeamHypothesis]:
        """The finished hypotheses, best first."""
        return list(self.finished)


def assign_beams(beams: list[Any], spare: list[Any], choices: list[BeamChoice]) -> list[tuple[Any, Any, BeamToken]]:
    """Which sequence holds each next beam: ``(holder, parent, token)`` per choice. A parent's first
    choice stays in the parent; further ones take a spare sequence - a beam no choice continues, or
    one never started (before the first step) - which the caller frees, makes a copy of the
    parent's history and blocks (fork), then extends with the token."""
    chosen = {id(c.parent) for c in choices}
    free = [b for b in beams if id(b) not in chosen] + list(spare)
    seen: set[int] = set()
    out = []
    for c in choices:
        if id(c.parent) in seen:
            out.append((free.pop(0), c.parent, c.token))
        else:
            seen.add(id(c.parent))
            out.append((c.parent, c.parent, c.token))
    return out
