"""``LLMEngine``: the loop that ties tokenizer, scheduler, block manager and model runner together.

One ``step()`` = schedule → run the step on the device (sampling included) → the scheduler appends
tokens and checks stop conditions → the output processor detokenizes, finds stop strings (the
scheduler finishes those sequences) and builds the ``RequestOutput``s of the requests that
progressed. A step that fails is contained (``_recover``). Call ``step()`` from a single thread.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable

from jaxpaged import distributed
from jaxpaged.beam_search import num_beam_candidates
from jaxpaged.engine_args import EngineArgs
from jaxpaged.engine_setup import eos_token_id, load_tokenizer, resolve_max_model_len, setup_platform
from jaxpaged.output_processor import OutputProcessor
from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.prompt_inputs import cache_salt, parse_prompt
from jaxpaged.request import Request
from jaxpaged.sampler import max_bias_entries
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler_output import SchedulerOutput
from jaxpaged.step_errors import EngineDeadError, SequenceError
from jaxpaged.step_timeline import StepTimeline

if TYPE_CHECKING:  # the runner imports JAX, which the engine loads only once the platform is set
    from jaxpaged.model_runner import InFlightStep, RunnerOutput

logger = logging.getLogger("jaxpaged")

# Steps in a row that may fail (each recovered from) before the engine declares itself dead.
MAX_CONSECUTIVE_FAILED_STEPS = 3


class LLMEngine:
    """vLLM-style engine. Build with ``LLMEngine.from_engine_args(EngineArgs(...))``."""

    def __init__(self, args: EngineArgs):
        self.distributed = setup_platform(args)
        import jax

        from jaxpaged.block_manager import BlockManager
        from jaxpaged.compilation_counter import CompilationCounter
        from jaxpaged.generation_config import load_generation_config
        from jaxpaged.kv_cache import KVCache, resolve_kv_cache_dtype
        from jaxpaged.kv_pool_sizing import num_kv_blocks
        from jaxpaged.model_loader import load_model, read_hf_config
        from jaxpaged.model_runner import ModelRunner
        from jaxpaged.model_source import resolve_model_source
        from jaxpaged.scheduler import Scheduler
        from jaxpaged.tensor_parallel import kv_cache_sharding, make_mesh
        from models.sharding import kv_cache_heads
        from pallas_kernels import check_attention_backend, default_attention_backend

        self.args = args
        self.compilations = CompilationCounter()
        on_gpu = jax.default_backend() == "gpu"
        self.mesh = make_mesh(args.tensor_parallel_size)  # None at 1 (jaxpaged/tensor_parallel.py)
        source = resolve_model_source(args.model, args.revision)
        logger.info("Model: %s", source.description)
        self.model_path = source.model_path
        hf_config = read_hf_config(source.config_dir)
        self.generation_config = load_generation_config(args.generation_config, source.config_dir)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer or source.config_dir)

        backend = args.attention_backend or default_attention_backend()
        check_attention_backend(backend)
        t0 = time.perf_counter()
        self.lm = load_model(self.model_path, dtype=args.dtype, load_format=args.load_format,
                             attention_backend=backend, seed=args.seed, mesh=self.mesh)
        config = self.lm.config
        logger.info("Loaded %s (%s, %s, load_format=%s) in %.1f s; attention backend %r; tensor_parallel_size %d",
                    self.lm.architecture, self.model_path, jax.numpy.dtype(self.lm.dtype).name, args.load_format,
                    time.perf_counter() - t0, backend, args.tensor_parallel_size)

        self.max_model_len = resolve_max_model_len(args, config)
        max_num_seqs = args.max_num_seqs or (256 if on_gpu else 16)
        max_tokens = args.max_num_batched_tokens or max(2048 if on_gpu else 512, max_num_seqs)
        max_tokens = max(max_tokens, max_num_seqs)
        self.vocab_size = config.vocab_size
        self.eos_token_id = eos_token_id(self.tokenizer, hf_config)

        # Under tensor parallelism the pool holds kv_cache_heads (KV heads replicated when fewer than
        # the devices), split by head; swap_space is per device, as in vLLM.
        kv_heads = kv_cache_heads(config)
        self.kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.lm.dtype)
        block_bytes = KVCache.bytes_per_block(config.num_hidden_layers, args.block_size, kv_heads, config.head_dim,
                                              self.kv_dtype)
        num_blocks = num_kv_blocks(self.lm, args, max_model_len=self.max_model_len, block_bytes=block_bytes,
                                   on_gpu=on_gpu, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens)
        num_host_blocks = int(args.swap_space * (1 << 30) * args.tensor_parallel_size // block_bytes)
        self.kv = KVCache(num_layers=config.num_hidden_layers, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                          block_size=args.block_size, num_kv_heads=kv_heads, head_dim=config.head_dim,
                          dtype=self.kv_dtype, sharding=None if self.mesh is None else kv_cache_sharding(self.mesh))
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); %d host blocks for swap; "
                    "max concurrency at max_model_len=%d: %.1f sequences", num_blocks, args.block_size,
                    num_blocks * args.block_size, num_blocks * block_bytes / (1 << 30), num_host_blocks,
                    self.max_model_len, num_blocks * args.block_size / self.max_model_len)

        self.block_manager = BlockManager(num_blocks, num_host_blocks, args.block_size,
                                          enable_caching=args.enable_prefix_caching)
        eos_ids = hf_config.get("eos_token_id")
        if self.eos_token_id is not None and eos_ids is None:
            eos_ids = self.eos_token_id
        # generation_config.json's EOS ids beyond the tokenizer's stop as stop_token_ids (vLLM's way)
        self._extra_eos_ids = set(self.generation_config.eos_token_ids) - {self.eos_token_id}
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_tokens, self.max_model_len,
                                   preemption_mode=args.preemption_mode, eos_token_id=eos_ids,
                                   async_scheduling=args.async_scheduling)
        # The sampler's bias width covers the largest request admission lets through: its
        # logit_bias, plus (under min_tokens) its stop ids and every EOS id.
        self.max_bias_entries = (args.max_logit_bias + args.max_stop_token_ids
                                 + len(self.scheduler.eos_token_ids | self._extra_eos_ids) + 1)
        self.runner = ModelRunner(self.lm, self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                                  max_model_len=self.max_model_len, max_logprobs=args.max_logprobs,
                                  eos_token_id=self.eos_token_id, seed=args.seed,
                                  with_decode_buckets=backend != "reference", bias_width=self.max_bias_entries)
        self.num_gpu_blocks = num_blocks
        self.channel = None if self.distributed is None else distributed.StepChannel.open(self.distributed)
        self._warm_up()
        self.output_processor = OutputProcessor(self.tokenizer)
        self._next_seq_id = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._real_tokens = 0
        self._padded_tokens = 0
        self._in_flight = None  # async scheduling: the dispatched step not yet processed
        self._open_steps: list[SchedulerOutput] = []  # scheduled, results not yet processed
        self._outputs: list[RequestOutput] = []  # what the current step() returns
        self.timeline = self.runner.timeline = StepTimeline()  # off unless enabled (benchmarks)
        if self.distributed is not None and self.distributed.is_leader:
            self.runner = distributed.LeaderRunner(self.runner, self.channel)  # workers replay each step
            self.kv = self.runner.kv
        self._num_failed_steps = 0  # consecutive
        self.num_failed_steps_total = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ---- set-up ------------------------------------------------------------------------------
    def serve_worker(self) -> int:
        """On a process other than 0 of a multi-host engine: replay the leader's steps until it stops;
        returns how many it replayed."""
        if self.distributed is None or self.distributed.is_leader:
            raise ValueError("serve_worker runs on the processes other than 0 of a multi-host engine "
                             "(coordinator_address, num_processes, process_id > 0)")
        return distributed.serve_worker(self.runner, self.channel)

    def _warm_up(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(desc="compiling", unit="program", file=sys.stderr, disable=None)

        def progress(name: str, i: int, n: int) -> None:
            bar.total = n
            bar.set_postfix_str(name)
            bar.n = i
            bar.refresh()

        self.warm_up_seconds = seconds = self.runner.warm_up(progress)
        bar.n = bar.total or 0
        bar.close()
        self.num_compilations_at_ready = self.compilations.count
        logger.info("Warm-up compiled %d programs in %.1f s (%d buckets: %s)", self.compilations.count, seconds,
                    len(self.runner.buckets), ", ".join(f"{b.num_tokens}{'d' if b.decode_only else ''}"
                                                        for b in self.runner.buckets))

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Validates and queues a request; raises ValueError (naming the field) before scheduling.

        This is the only place a request can be refused: every limit a step relies on is checked
        here (see ``_check_params``), and the request keeps its own copy of ``params`` so a caller
        mutating theirs later cannot change what the steps see.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        params._verify_args()  # again: the fields may have been assigned after construction
        text, ids = parse_prompt(prompt, self.tokenizer)
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens long, more than max_model_len ({self.max_model_len})")
        self._check_params(params)
        if self._extra_eos_ids - params.all_stop_token_ids:
            params.update_from_generation_config(self.generation_config.fields, self.eos_token_id)
        # Implied by the caps; checked on the exact set the sampler packs (EOS ids folded in).
        width = max_bias_entries(params, self.eos_token_id)
        if width > self.max_bias_entries:
            raise ValueError(f"logit_bias and the stop ids banned under min_tokens come to {width} entries, "
                             f"more than the {self.max_bias_entries} the sampler holds")
        if params.use_beam_search:
            stops = (set() if params.ignore_eos else set(self.scheduler.eos_token_ids)) | set(params.stop_token_ids)
            need = num_beam_candidates(params.n, stops)
            if need > self.args.max_logprobs:
                raise ValueError(f"n (the beam width, {params.n}) needs the top {need} logprobs of every beam "
                                 f"(max(2, 1 + {len(stops)} stop ids) x n), more than max_logprobs "
                                 f"({self.args.max_logprobs}); lower n or raise max_logprobs")
        req = Request(request_id, ids, params, self._next_seq_id, prompt=text, arrival_time=arrival_time,
                      cache_salt=cache_salt(prompt))
        self.scheduler.add_request(req)  # may raise (duplicate id, pool too small): nothing is kept then
        self._next_seq_id += req.n
        self.output_processor.add_request(req)
        self._prompt_tokens_total += len(ids)

    def _check_params(self, params: SamplingParams) -> None:
        """The engine's caps on sampling parameters (SamplingParams checked the ranges)."""
        args = self.args
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(params, field)
            if v is not None and v > args.max_logprobs:
                raise ValueError(f"{field} must be <= max_logprobs ({args.max_logprobs}), got {v}")
        if params.logit_bias is not None and len(params.logit_bias) > args.max_logit_bias:
            raise ValueError(f"logit_bias may hold at most {args.max_logit_bias} entries (max_logit_bias), "
                             f"got {len(params.logit_bias)}")
        if len(params.stop_token_ids) > args.max_stop_token_ids:
            raise ValueError(f"stop_token_ids may hold at most {args.max_stop_token_ids} ids (max_stop_token_ids), "
                             f"got {len(params.stop_token_ids)}")
        params.verify_vocab(self.vocab_size)
        if (params.detokenize and self.tokenizer is None) and (params.stop or params.logprobs is not None):
            raise ValueError("stop strings need a tokenizer (the engine was built with skip_tokenizer_init)")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Aborts requests in any state and frees their blocks; unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self.scheduler.abort_request(rid) is not None:
                self.output_processor.remove_request(rid)

    @property
    def max_num_seqs(self) -> int:
        """Most sequences running at once (the batch's sequence slots)."""
        return self.scheduler.max_num_seqs

    def has_unfinished_requests(self) -> bool:
        # A step still in flight once every request has finished (async scheduling) only holds
        # rows of finished sequences; the next step() drops them.
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns cumulative outputs of the requests that progressed.

        With ``async_scheduling`` the outputs returned are those of the step before: the next
        step is scheduled and enqueued on the device before this one's tokens are read.

        A step that raises does not end the engine (see ``_recover``): the requests that caused
        it (all of the step's, when the cause is unknown) finish with ``finish_reason="error"``,
        and the step's other requests are recomputed. Only ``EngineDeadError`` escapes.
        """
        self._outputs = []
        try:
            if self.args.async_scheduling:
                self._step_async()
            else:
                self._step_sync()
        except EngineDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - contained: no request may take the engine down
            self._recover(exc)
        else:
            self._num_failed_steps = 0
        return self._outputs

    def _step_sync(self) -> None:
        tl = self.timeline
        tl.start()
        sched = self.scheduler.schedule()
        tl.mark("schedule")
        if sched.is_empty:
            return
        self._open_steps = [sched]
        step = self.runner.dispatch(sched)
        tl.mark("dispatch")
        self._land(step)
        tl.end(step.label, step.num_tokens, step.bucket.num_tokens if step.bucket else 0)

    def _step_async(self) -> None:
        tl = self.timeline
        tl.start()
        prev = self._in_flight
        self._in_flight = None
        if prev is not None and not prev.chainable:
            self._land(prev)  # its tokens cannot feed the next step on the device
            return tl.end(prev.label)
        sched = self.scheduler.schedule()
        tl.mark("schedule")
        if sched.is_empty:
            if prev is not None:
                self._land(prev)
                tl.end(prev.label)
            return
        landed = False
        if prev is not None and self._needs_history(sched):
            # Seeds, penalties and min_tokens read the token history: land the previous tokens
            # before building this step's sampling inputs (no overlap for this step).
            self._land(prev)
            landed = True
        self._open_steps.append(sched)
        step = self._in_flight = self.runner.dispatch(sched, prev)
        tl.mark("dispatch")
        if prev is not None and not landed:
            self._land(prev)
        tl.end(step.label, step.num_tokens, step.bucket.num_tokens if step.bucket else 0)

    def _land(self, step: InFlightStep) -> None:
        out = self.runner.collect(step)
        self.timeline.mark("wait")
        self._process(step.sched, out)
        self.timeline.mark("process")

    @staticmethod
    def _needs_history(sched: SchedulerOutput) -> bool:
        for row in sched.scheduled:
            for sample in row.sample_rows:
                p = sample.params
                if (p.seed is not None or p.min_tokens or p.presence_penalty or p.frequency_penalty
                        or p.repetition_penalty != 1.0):
                    return True
        return False

    def _process(self, sched: SchedulerOutput, out: RunnerOutput) -> None:
        """Hands a finished step's tokens to the scheduler, then to the output processor.

        Once the scheduler has taken the tokens the step is committed; what follows is per
        request, and a request whose output processing raises fails alone."""
        self._real_tokens += out.num_tokens
        self._padded_tokens += out.num_padded_tokens
        failed: dict[str, BaseException] = {}
        for sid, plp in out.prompt_logprobs.items():
            try:
                self.output_processor.record_prompt_logprobs(sid, plp)
            except Exception as exc:  # noqa: BLE001 - blamed on that request alone
                req = self.output_processor.request_of(sid)
                if req is not None:
                    failed.setdefault(req.request_id, exc)
        sampled = {sid: (t.token_id, t.logprob, t) for sid, t in out.sampled.items()}
        touched = self.scheduler.update_from_output(sched, sampled)
        self._open_steps = [s for s in self._open_steps if s is not sched]
        self._generation_tokens_total += len(sampled)
        for req in touched:
            if req.request_id in failed:
                continue
            try:
                for seq_id, stop_str in self.output_processor.process_tokens(req):
                    self.scheduler.finish_sequence(seq_id, "stop", stop_str)
                output = self.output_processor.make_output(req)
            except Exception as exc:  # noqa: BLE001 - blamed on that request alone
                failed[req.request_id] = exc
                continue
            if output is not None:
                self._outputs.append(output)
            if req.is_finished():
                self.output_processor.remove_request(req.request_id)
        for rid, exc in failed.items():
            logger.error("request %r failed while its output was processed; finishing it with an error",
                         rid, exc_info=exc)
            self._fail_request(rid, exc)

    # ---- containment -------------------------------------------------------------------------
    def _recover(self, exc: Exception) -> None:
        """Contains a failed step: finishes the requests that caused it with "error", recomputes
        the step's other requests, rebuilds the KV pool if the failure consumed it, and goes on.

        Raises ``EngineDeadError`` when the pool cannot be rebuilt or ``MAX_CONSECUTIVE_FAILED_STEPS``
        steps in a row failed (the cause is not in any one request: a lost device, an OOM that
        repeats): the caller should stop and be restarted.
        """
        self._num_failed_steps += 1
        self.num_failed_steps_total += 1
        steps, self._open_steps, self._in_flight = self._open_steps, [], None
        touched = {req.request_id: req for sched in steps for sid in sched.touched_seq_ids()
                   if (req := self.scheduler.request_of(sid)) is not None}
        if isinstance(exc, SequenceError):
            culprits = {req.request_id for sid in exc.seq_ids if (req := self.scheduler.request_of(sid)) is not None}
            cause: BaseException = exc.cause
        else:
            culprits, cause = set(touched), exc
        logger.error("step failed (%d in a row): %s: %s; finishing %d request(s) with an error (%s), "
                     "recomputing %d", self._num_failed_steps, type(cause).__name__, cause, len(culprits),
                     ", ".join(sorted(culprits)[:8]), len(set(touched) - culprits), exc_info=exc)
        if self._num_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise EngineDeadError(f"{self._num_failed_steps} steps in a row failed; the last with "
                                  f"{type(cause).__name__}: {cause}") from exc
        pool_lost = self.kv.is_lost()
        if pool_lost:  # the failed call had consumed the donated pool: every block is gone
            try:
                self.kv.reset()
            except Exception as reset_exc:
                raise EngineDeadError(f"the KV pool was lost and could not be rebuilt: {reset_exc}") from exc
            touched.update({r.request_id: r for r in self.scheduler.requests_with_device_blocks()})
        for rid in sorted(culprits):
            self._fail_request(rid, cause)
        self.scheduler.reset_requests(rid for rid in touched if rid not in culprits)
        if pool_lost:  # the cached blocks' contents went with the pool (no table holds one now)
            self.scheduler.reset_prefix_cache()

    def _fail_request(self, request_id: str, exc: BaseException) -> None:
        """Finishes the request with "error", frees its blocks and emits its final output."""
        req = self.scheduler.fail_request(request_id)
        if req is None:
            return
        error = f"{type(exc).__name__}: {exc}"
        try:
            out = self.output_processor.make_output(req, error=error)
        except Exception:  # noqa: BLE001 - its text may be what failed: report it without
            out = RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), None,
                                [CompletionOutput(s.index, "", list(s.output_token_ids), None, None, "error")
                                 for s in req.seqs], True, error=error)
        if out is not None:
            self._outputs.append(out)
        self.output_processor.remove_request(request_id)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix: later requests recompute them (blocks in use stay with
        their sequences). Returns True (vLLM's signature; it cannot fail here)."""
        self.scheduler.reset_prefix_cache()
        return True

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
            "num_failed_steps_total": self.num_failed_steps_total,
            "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
            "num_used_blocks": s.num_used_blocks, "num_logical_blocks": s.num_logical_blocks,
        }
