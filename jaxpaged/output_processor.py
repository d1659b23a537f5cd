"""``OutputProcessor``: what the scheduler recorded for a request, turned into vLLM's ``RequestOutput``.

It owns everything between sampled token ids and what a caller sees: incremental detokenization,
stop strings, the hold-back of text that could still become a stop string, logprob dicts (token
texts included), prompt logprobs, and the three output kinds. One processor serves both callers:
the offline engine (``CUMULATIVE`` / ``FINAL_ONLY``) and the server (``DELTA``: only what is new
since the request's previous output, so the server keeps no text state of its own).

Decisions:
  - It finds stop strings but does not finish sequences: ``process_tokens`` returns the hits and
    the engine hands them to the scheduler, which owns finishing (and freeing blocks).
  - Text that could be the start of a stop string is held back (``stop_buffer_length``) until the
    string is ruled out or the sequence finishes, in every output kind, so a streamed response
    never shows text that is cut later.
  - The stop token itself (EOS / ``stop_token_ids``) is not part of the text, as in vLLM.
  - A request that ranks its sequences - ``best_of`` > ``n`` (by cumulative logprob), or a beam
    search (its finished hypotheses, by length-penalised score) - is only output once finished,
    whatever its kind: the ranking is not known before. Its ``n`` outputs are numbered 0..n-1 in
    rank order and carry their ``cumulative_logprob``. A beam's text is decoded at the end (beams
    swap histories while they run, so nothing is decoded incrementally).
"""

from __future__ import annotations

import time
from typing import Any

from jaxpaged.beam_search import BeamHypothesis
from jaxpaged.detokenizer import IncrementalDetokenizer, check_stop, decode_logprob_tokens, stop_buffer_length
from jaxpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxpaged.request import Request, Sequence
from jaxpaged.sampler import build_logprob_dict
from jaxpaged.sampling_params import RequestOutputKind


class _SeqState:
    """One sequence's text and logprobs so far, and (DELTA) how much of it was handed out."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None) -> None:
        self.seq = seq
        self.detok = detok
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] = []
        self.num_processed = 0  # output tokens already detokenized
        self.sent_chars = 0
        self.sent_tokens = 0
        self.sent_final = False


class _RequestState:
    def __init__(self, req: Request, seqs: list[_SeqState]) -> None:
        self.req = req
        self.seqs = seqs
        self.hold = stop_buffer_length(req.sampling_params.stop, req.sampling_params.include_stop_str_in_output)
        # Prompt logprobs as they arrive (a chunk at a time); the first entry is None.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if req.sampling_params.prompt_logprobs is not None else None)
        self.sent_prompt_logprobs = False


class OutputProcessor:
    """Builds ``RequestOutput``s. ``tokenizer`` None: no text (token ids and logprobs only)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._by_seq: dict[int, _RequestState] = {}

    def add_request(self, req: Request) -> None:
        params = req.sampling_params
        seqs = []
        for seq in req.seqs:
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.skip_special_tokens,
                                               params.spaces_between_special_tokens)
            seqs.append(_SeqState(seq, detok))
        state = _RequestState(req, seqs)
        self._requests[req.request_id] = state
        for seq in req.seqs:
            self._by_seq[seq.seq_id] = state

    def remove_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None:
            for seq in state.req.seqs:
                self._by_seq.pop(seq.seq_id, None)

    def request_of(self, seq_id: int) -> Request | None:
        state = self._by_seq.get(seq_id)
        return None if state is None else state.req

    # ---- after a step ------------------------------------------------------------------------
    def record_prompt_logprobs(self, seq_id: int, plp: Any) -> None:
        """Adds a chunk's prompt logprobs (``model_runner.PromptLogprobs``); chunks arrive in order,
        and a recompute after preemption never asks again."""
        state = self._by_seq.get(seq_id)
        if state is None or state.prompt_logprobs is None:
            return
        req, k = state.req, state.req.sampling_params.prompt_logprobs
        entries = []
        for j, (lp, rank) in enumerate(zip(plp.token_logprobs, plp.ranks)):
            token = req.prompt_token_ids[plp.start + 1 + j]
            entries.append(build_logprob_dict(token, lp, rank, plp.top_ids[j], plp.top_logprobs[j], k))
        if self.tokenizer is not None:
            decode_logprob_tokens(self.tokenizer, entries)
        room = max(0, len(req.prompt_token_ids) - len(state.prompt_logprobs))
        state.prompt_logprobs.extend(entries[:room])

    def process_tokens(self, req: Request) -> list[tuple[int, str]]:
        """Detokenizes the sequences' new tokens and builds their logprob dicts; returns the stop
        strings found, as ``(seq_id, stop string)``, for the scheduler to finish those sequences."""
        state = self._requests[req.request_id]
        params = req.sampling_params
        hits = []
        if req.beam_search is not None:  # decoded once the search is over (make_output)
            return hits
        for st in state.seqs:
            seq = st.seq
            new = seq.output_token_ids[st.num_processed :]
            if not new:
                continue
            if params.logprobs is not None:
                for i, tok in enumerate(new):
                    t = seq.output_top_logprobs[st.num_processed + i]
                    entry = build_logprob_dict(tok, t.logprob, t.rank, t.top_ids, t.top_logprobs, params.logprobs)
                    if self.tokenizer is not None:
                        decode_logprob_tokens(self.tokenizer, [entry])
                    st.logprobs.append(entry)
            st.num_processed = len(seq.output_token_ids)
            if st.detok is None:
                continue
            visible = new
            if seq.is_finished and seq.finish_reason == "stop" and not params.include_stop_str_in_output:
                visible = new[:-1] if (seq.stop_reason is None or seq.stop_reason == new[-1]) else new
            delta = st.detok.append(visible)
            if seq.is_finished:
                delta += st.detok.flush()
            st.text += delta
            if params.stop and not seq.is_finished:
                hit = check_stop(st.text, len(delta), params.stop, params.include_stop_str_in_output)
                if hit is not None:
                    stop_str, st.text = hit
                    hits.append((seq.seq_id, stop_str))
        return hits

    def make_output(self, req: Request, error: str | None = None) -> RequestOutput | None:
        """The request's output in its ``output_kind``; None when there is nothing to hand out
        (FINAL_ONLY before the end, DELTA with nothing new)."""
        state = self._requests[req.request_id]
        kind = req.sampling_params.output_kind
        finished = req.is_finished()
        ranked = req.beam_search is not None or req.n > req.num_returned
        if (kind == RequestOutputKind.FINAL_ONLY or ranked) and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        if req.beam_search is not None and req.beam_search.results():
            outputs = [self._beam_completion(h, i, req) for i, h in enumerate(req.beam_search.results())]
        elif ranked:  # best_of: the n highest cumulative logprobs, numbered by rank
            best = sorted(state.seqs, key=lambda st: -st.seq.cumulative_logprob)[: req.num_returned]
            outputs = [self._completion(st, req, False, state.hold, rank=i) for i, st in enumerate(best)]
        else:
            outputs = [o for o in (self._completion(st, req, delta, state.hold) for st in state.seqs) if o is not None]
        prompt_logprobs = None
        if state.prompt_logprobs is not None and (not delta or not state.sent_prompt_logprobs):
            if not delta or len(state.prompt_logprobs) >= len(req.prompt_token_ids) or finished:
                prompt_logprobs = list(state.prompt_logprobs)
                state.sent_prompt_logprobs = True
        if delta and not outputs and prompt_logprobs is None and not finished:
            return None
        # DELTA hands out the request's own prompt list (as vLLM does): a copy per step and request
        # was the largest allocation of a served step. The other kinds copy it (once, for FINAL_ONLY).
        prompt_ids = req.prompt_token_ids if delta else list(req.prompt_token_ids)
        out = RequestOutput(req.request_id, req.prompt, prompt_ids, prompt_logprobs, outputs,
                           finished, self._metrics(req), num_cached_tokens=req.num_cached_tokens)
        out.error = error
        return out

    def _beam_completion(self, hyp: BeamHypothesis, rank: int, req: Request) -> CompletionOutput:
        params = req.sampling_params
        text = ""
        if params.detokenize and self.tokenizer is not None:
            visible = hyp.token_ids
            if hyp.finish_reason == "stop" and not params.include_stop_str_in_output:
                visible = visible[:-1]
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.skip_special_tokens,
                                           params.spaces_between_special_tokens)
            text = detok.append(visible) + detok.flush()
        logprobs = None
        if params.logprobs is not None:
            logprobs = [build_logprob_dict(t.token_id, t.logprob, t.rank, t.top_ids, t.top_logprobs, params.logprobs)
                        for t in hyp.top_logprobs]
            if self.tokenizer is not None:
                decode_logprob_tokens(self.tokenizer, logprobs)
        return CompletionOutput(index=rank, text=text, token_ids=list(hyp.token_ids),
                                cumulative_logprob=hyp.cumulative_logprob, logprobs=logprobs,
                                finish_reason=hyp.finish_reason, stop_reason=hyp.stop_reason)

    @staticmethod
    def _completion(st: _SeqState, req: Request, delta: bool, hold: int, rank: int | None = None) -> CompletionOutput | None:
        seq, params = st.seq, req.sampling_params
        text = st.text
        if not seq.is_finished and hold:
            text = text[: max(0, len(text) - hold)]
        logprobs = st.logprobs if params.logprobs is not None else None
        if delta:  # slices of the new part only: a step copies O(new tokens), not O(output so far)
            if st.sent_final:
                return None
            start_chars, start_tokens = st.sent_chars, st.sent_tokens
            end_tokens = min(st.num_processed, len(seq.output_token_ids))
            if len(text) <= start_chars and end_tokens <= start_tokens and not seq.is_finished:
                return None
            st.sent_chars, st.sent_tokens = max(start_chars, len(text)), end_tokens
            st.sent_final = seq.is_finished
            text, token_ids = text[start_chars:], seq.output_token_ids[start_tokens:end_tokens]
            logprobs = logprobs[start_tokens : len(st.logprobs)] if logprobs is not None else None
        else:
            token_ids = seq.output_token_ids[: st.num_processed]
        return CompletionOutput(
            index=seq.index if rank is None else rank, text=text, token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None or rank is not None else None,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        )

    @staticmethod
    def _metrics(req: Request) -> RequestMetrics:
        return RequestMetrics(
            arrival_time=req.arrival_time, last_token_time=time.time(), first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            time_in_queue=(req.first_scheduled_time - req.arrival_time) if req.first_scheduled_time else None,
            finished_time=req.finished_time,
        )
