"""``LLMEngine``: the loop that ties tokenizer, scheduler, block manager and model runner together.

One ``step()`` = schedule → run the step on the device (sampling included) → append tokens and
check stop conditions → detokenize incrementally and check stop strings → emit cumulative
``RequestOutput``s for the requests that progressed. Call ``step()`` from a single thread.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable

from jaxpaged.engine_args import EngineArgs
from jaxpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxpaged.request import Request, Sequence
from jaxpaged.sampler import SamplingRow, build_logprob_dict
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.detokenizer import IncrementalDetokenizer, check_stop, decode_logprob_tokens, stop_buffer_length

logger = logging.getLogger("jaxpaged")

# Sampling parameters for a row whose sequence finished after it was scheduled (async scheduling).
_DROPPED_ROW_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)


class _SeqState:
    """Engine-side state of one sequence: its text so far and its logprobs."""

    def __init__(self, seq: Sequence, req: Request, detok: IncrementalDetokenizer | None):
        self.seq = seq
        self.req = req
        self.detok = detok
        self.text = ""
        self.num_detokenized = 0
        self.logprobs: list[dict[int, Logprob]] = []


class LLMEngine:
    """vLLM-style engine. Build with ``LLMEngine.from_engine_args(EngineArgs(...))``."""

    def __init__(self, args: EngineArgs):
        self._setup_platform(args)
        import jax

        from jaxpaged.block_manager import BlockManager
        from jaxpaged.compilation_counter import CompilationCounter
        from jaxpaged.generation_config import load_generation_config
        from jaxpaged.kv_cache import KVCache
        from jaxpaged.kv_pool_sizing import num_kv_blocks
        from jaxpaged.model_loader import load_model, read_hf_config
        from jaxpaged.model_runner import ModelRunner
        from jaxpaged.model_source import resolve_model_source
        from jaxpaged.scheduler import Scheduler
        from pallas_kernels import check_attention_backend, default_attention_backend

        self.args = args
        self.compilations = CompilationCounter()
        on_gpu = jax.default_backend() == "gpu"
        if args.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size must be 1 for now (got {args.tensor_parallel_size}); "
                "sharding across devices is not implemented yet"
            )
        source = resolve_model_source(args.model, args.revision)
        logger.info("Model: %s", source.description)
        self.model_path = source.model_path
        hf_config = read_hf_config(source.config_dir)
        self.generation_config = load_generation_config(args.generation_config, source.config_dir)
        self.tokenizer = None if args.skip_tokenizer_init else self._load_tokenizer(args.tokenizer or source.config_dir)

        backend = args.attention_backend or default_attention_backend()
        check_attention_backend(backend)
        t0 = time.perf_counter()
        self.lm = load_model(self.model_path, dtype=args.dtype, load_format=args.load_format,
                             attention_backend=backend, seed=args.seed)
        config = self.lm.config
        logger.info("Loaded %s (%s, %s, load_format=%s) in %.1f s; attention backend %r", self.lm.architecture,
                    self.model_path, jax.numpy.dtype(self.lm.dtype).name, args.load_format,
                    time.perf_counter() - t0, backend)

        self.max_model_len = self._max_model_len(args, config)
        max_num_seqs = args.max_num_seqs or (256 if on_gpu else 16)
        max_tokens = args.max_num_batched_tokens or max(2048 if on_gpu else 512, max_num_seqs)
        max_tokens = max(max_tokens, max_num_seqs)
        self.vocab_size = config.vocab_size
        self.eos_token_id = self._eos_token_id(hf_config)

        block_bytes = KVCache.bytes_per_block(config.num_hidden_layers, args.block_size,
                                              config.num_key_value_heads, config.head_dim, self.lm.dtype)
        num_blocks = num_kv_blocks(self.lm, args, max_model_len=self.max_model_len, block_bytes=block_bytes,
                                   on_gpu=on_gpu, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens)
        num_host_blocks = int(args.swap_space * (1 << 30) // block_bytes)
        self.kv = KVCache(num_layers=config.num_hidden_layers, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                          block_size=args.block_size, num_kv_heads=config.num_key_value_heads,
                          head_dim=config.head_dim, dtype=self.lm.dtype)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); %d host blocks for swap; "
                    "max concurrency at max_model_len=%d: %.1f sequences", num_blocks, args.block_size,
                    num_blocks * args.block_size, num_blocks * block_bytes / (1 << 30), num_host_blocks,
                    self.max_model_len, num_blocks * args.block_size / self.max_model_len)

        self.block_manager = BlockManager(num_blocks, num_host_blocks, args.block_size)
        eos_ids = hf_config.get("eos_token_id")
        if self.eos_token_id is not None and eos_ids is None:
            eos_ids = self.eos_token_id
        # generation_config.json's EOS ids beyond the tokenizer's stop as stop_token_ids (vLLM's way)
        self._extra_eos_ids = set(self.generation_config.eos_token_ids) - {self.eos_token_id}
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_tokens, self.max_model_len,
                                   preemption_mode=args.preemption_mode, eos_token_id=eos_ids,
                                   async_scheduling=args.async_scheduling)
        self.runner = ModelRunner(self.lm, self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                                  max_model_len=self.max_model_len, max_logprobs=args.max_logprobs,
                                  eos_token_id=self.eos_token_id, seed=args.seed,
                                  with_decode_buckets=backend != "reference")
        self.num_gpu_blocks = num_blocks
        self._warm_up()
        self._states: dict[int, _SeqState] = {}
        self._next_seq_id = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._real_tokens = 0
        self._padded_tokens = 0
        self._in_flight = None  # async scheduling: the dispatched step not yet processed

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ---- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _setup_platform(args: EngineArgs) -> None:
        # JAX reserves 75% of GPU memory at start unless told otherwise; make that our budget.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{args.gpu_memory_utilization:.3f}")
        if args.compilation_cache_dir:
            import jax

            jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    @staticmethod
    def _load_tokenizer(path: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load a tokenizer from {path!r} ({e}); pass tokenizer=PATH, or "
                "skip_tokenizer_init=True to use token-id prompts only"
            ) from e

    def _eos_token_id(self, hf_config: dict) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        eos = hf_config.get("eos_token_id")
        if isinstance(eos, list):
            return int(eos[0]) if eos else None
        return eos

    @staticmethod
    def _max_model_len(args: EngineArgs, config: Any) -> int:
        limit = int(config.max_position_embeddings)
        if args.max_model_len is None:
            return limit
        if args.max_model_len > limit:
            raise ValueError(f"max_model_len must be <= {limit} (the model's max_position_embeddings), "
                             f"got {args.max_model_len}")
        return args.max_model_len

    def _warm_up(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(desc="compiling", unit="program", file=sys.stderr, disable=None)

        def progress(name: str, i: int, n: int) -> None:
            bar.total = n
            bar.set_postfix_str(name)
            bar.n = i
            bar.refresh()

        seconds = self.runner.warm_up(progress)
        bar.n = bar.total or 0
        bar.close()
        self.num_compilations_at_ready = self.compilations.count
        logger.info("Warm-up compiled %d programs in %.1f s (%d buckets: %s)", self.compilations.count, seconds,
                    len(self.runner.buckets), ", ".join(f"{b.num_tokens}{'d' if b.decode_only else ''}"
                                                        for b in self.runner.buckets))

    # ---- requests --------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:  # would still tokenize to [BOS] with many tokenizers
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt must be given as prompt_token_ids: the engine has no tokenizer "
                                 "(skip_tokenizer_init=True)")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, (list, tuple)):
            ids, text = prompt, None
        else:
            raise ValueError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        return text, list(ids)

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Validates and queues a request; raises ValueError (naming the field) before scheduling."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens long, more than max_model_len ({self.max_model_len})")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(params, field)
            if v is not None and v > self.args.max_logprobs:
                raise ValueError(f"{field} must be <= max_logprobs ({self.args.max_logprobs}), got {v}")
        params.verify_vocab(self.vocab_size)
        if self._extra_eos_ids - params.all_stop_token_ids:
            params = params.clone()  # the caller's object is left as it was
            params.update_from_generation_config(self.generation_config.fields, self.eos_token_id)
        if (params.detokenize and self.tokenizer is None) and (params.stop or params.logprobs is not None):
            raise ValueError("stop strings need a tokenizer (the engine was built with skip_tokenizer_init)")
        req = Request(request_id, ids, params, self._next_seq_id, prompt=text, arrival_time=arrival_time)
        self.scheduler.add_request(req)  # may raise (duplicate id, pool too small): nothing is kept then
        self._next_seq_id += req.n
        for seq in req.seqs:
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                               params.spaces_between_special_tokens)
            self._states[seq.seq_id] = _SeqState(seq, req, detok)
        req.prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self._prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Aborts requests in any state and frees their blocks; unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.scheduler.abort_request(rid)
            if req is not None:
                for seq in req.seqs:
                    self._states.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        # A step still in flight once every request has finished (async scheduling) only holds
        # rows of finished sequences; the next step() drops them.
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- one step ----------------------------------------------------------------------------
    def _row(self, seq_id: int) -> SamplingRow:
        st = self._states.get(seq_id)
        if st is None:  # finished after its row was scheduled (async): the token is dropped
            return SamplingRow(_DROPPED_ROW_PARAMS, [], [], 0)
        return SamplingRow(st.req.sampling_params, st.seq.prompt_token_ids, st.seq.output_token_ids, st.seq.index)

    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns cumulative outputs of the requests that progressed.

        With ``async_scheduling`` the outputs returned are those of the step before: the next
        step is scheduled and enqueued on the device before this one's tokens are read.
        """
        if self.args.async_scheduling:
            return self._step_async()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        return self._process(sched, self.runner.execute(sched, self._row))

    def _step_async(self) -> list[RequestOutput]:
        prev = self._in_flight
        self._in_flight = None
        if prev is not None and not prev.chainable:
            return self._land(prev)  # its tokens cannot feed the next step on the device
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self._land(prev) if prev is not None else []
        outputs = None
        if prev is not None and self._needs_history(sched):
            # Seeds, penalties and min_tokens read the token history: land the previous tokens
            # before building this step's sampling inputs (no overlap for this step).
            outputs = self._land(prev)
        self._in_flight = self.runner.dispatch(sched, self._row, prev)
        if outputs is None:
            outputs = self._land(prev) if prev is not None else []
        return outputs

    def _land(self, step) -> list[RequestOutput]:
        return self._process(step.sched, self.runner.collect(step))

    def _needs_history(self, sched) -> bool:
        for row in sched.scheduled:
            for sid in row.sample_seq_ids:
                st = self._states.get(sid)
                p = st.req.sampling_params if st is not None else None
                if p is not None and (p.seed is not None or p.min_tokens or p.presence_penalty
                                      or p.frequency_penalty or p.repetition_penalty != 1.0):
                    return True
        return False

    def _process(self, sched, out) -> list[RequestOutput]:
        """Hands a finished step's tokens to the scheduler; detokenizes and builds outputs."""
        self._real_tokens += out.num_tokens
        self._padded_tokens += out.num_padded_tokens
        for sid, plp in out.prompt_logprobs.items():
            self._record_prompt_logprobs(sid, plp)
        sampled = {sid: (t.token_id, t.logprob, t) for sid, t in out.sampled.items()}
        touched = self.scheduler.update_from_output(sched, sampled)
        self._generation_tokens_total += len(sampled)
        results = []
        for req in touched:
            for seq in req.seqs:
                st = self._states.get(seq.seq_id)
                if st is not None:
                    self._process_new_tokens(st)
            finished = req.is_finished()
            if finished or req.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
                results.append(self._request_output(req))
            if finished:
                for seq in req.seqs:
                    self._states.pop(seq.seq_id, None)
        return results

    def _record_prompt_logprobs(self, seq_id: int, plp) -> None:
        st = self._states.get(seq_id)
        if st is None or st.req.prompt_logprobs is None:
            return
        req, k = st.req, st.req.sampling_params.prompt_logprobs
        entries = []
        for j, (lp, rank) in enumerate(zip(plp.token_logprobs, plp.ranks)):
            token = req.prompt_token_ids[plp.start + 1 + j]
            entries.append(build_logprob_dict(token, lp, rank, plp.top_ids[j], plp.top_logprobs[j], k))
        if self.tokenizer is not None:
            decode_logprob_tokens(self.tokenizer, entries)
        # Chunks arrive in order; a recompute after preemption never asks again.
        req.prompt_logprobs.extend(entries[: max(0, len(req.prompt_token_ids) - len(req.prompt_logprobs))])

    def _process_new_tokens(self, st: _SeqState) -> None:
        seq, params = st.seq, st.req.sampling_params
        new = seq.output_token_ids[st.num_detokenized :]
        if not new:
            return
        if params.logprobs is not None:
            for i, tok in enumerate(new):
                t = seq.output_top_logprobs[st.num_detokenized + i]
                entry = build_logprob_dict(tok, t.logprob, t.rank, t.top_ids, t.top_logprobs, params.logprobs)
                if self.tokenizer is not None:
                    decode_logprob_tokens(self.tokenizer, [entry])
                st.logprobs.append(entry)
        st.num_detokenized = len(seq.output_token_ids)
        if st.detok is None:
            return
        # The stop token itself (EOS / stop_token_ids) is not part of the text, as in vLLM.
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
                self.scheduler.finish_sequence(seq.seq_id, "stop", stop_str)

    def _request_output(self, req: Request) -> RequestOutput:
        params = req.sampling_params
        outputs = []
        for seq in req.seqs:
            st = self._states.get(seq.seq_id)
            text = st.text if st else ""
            if not seq.is_finished and params.stop:
                hold = stop_buffer_length(params.stop, params.include_stop_str_in_output)
                text = text[: max(0, len(text) - hold)]
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                logprobs=list(st.logprobs) if (st and params.logprobs is not None) else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=req.arrival_time, last_token_time=now, first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            time_in_queue=(req.first_scheduled_time - req.arrival_time) if req.first_scheduled_time else None,
            finished_time=req.finished_time,
        )
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids),
                             list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             outputs, req.is_finished(), metrics)

    # ---- stats -------------------------------------------------------------------------------
    def get_stats(self) -> dict:
        s = self.scheduler.get_stats()
        waste = (self._padded_tokens - self._real_tokens) / self._real_tokens if self._real_tokens else 0.0
        return {
            "num_running": s.num_running_reqs, "num_waiting": s.num_waiting_reqs, "num_swapped": s.num_swapped_reqs,
            "num_running_seqs": s.num_running_seqs, "kv_cache_usage": s.kv_cache_usage,
            "num_free_blocks": s.num_free_blocks, "num_gpu_blocks": self.num_gpu_blocks,
            "num_kv_cache_tokens": s.num_kv_cache_tokens, "num_computed_tokens_total": self._real_tokens,
            "num_preemptions_total": s.num_preemptions, "prompt_tokens_total": self._prompt_tokens_total,
            "generation_tokens_total": self._generation_tokens_total, "padding_waste": waste,
            "num_compilations": self.compilations.count,
            "num_compilations_after_warmup": self.compilations.count - self.num_compilations_at_ready,
        }
