"""``LLM``: offline batched generation, vLLM's notebook-facing class."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from jaxpaged.engine_args import EngineArgs
from jaxpaged.gc_heap import frozen_gc_heap
from jaxpaged.llm_engine import LLMEngine
from jaxpaged.outputs import BeamSearchOutput, BeamSearchSequence, Logprob, RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    """Generate text for a batch of prompts with a paged-KV continuous-batching engine.

    Args mirror vLLM's ``LLM`` (``model=None`` uses the default model, SmolLM2-135M-Instruct); any other
    :class:`~jaxpaged.engine_args.EngineArgs` field (``attention_backend``, ``max_logprobs``,
    ``skip_tokenizer_init``, ...) can be passed by keyword.
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
        swap_space: float = 4,
        preemption_mode: str = "recompute",
        load_format: str = "auto",
        tensor_parallel_size: int = 1,
        **kwargs: Any,
    ):
        args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, num_gpu_blocks_override=num_gpu_blocks_override,
            swap_space=swap_space, preemption_mode=preemption_mode, load_format=load_format,
            tensor_parallel_size=tensor_parallel_size, **kwargs,
        )
        self.llm_engine = LLMEngine.from_engine_args(args)
        self._counter = itertools.count()

    @property
    def model_path(self) -> str:
        return self.llm_engine.model_path

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_stats(self) -> dict:
        return self.llm_engine.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (``enable_prefix_caching``); later requests recompute them."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate``/``chat`` use when given none: the model's generation_config.json
        defaults (``generation_config="auto"``), else SamplingParams' own (vLLM's rule)."""
        return SamplingParams(**self.llm_engine.generation_config.default_sampling_params)

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (a str, ``{"prompt_token_ids": [...]}``, or a list of them);
        returns one finished ``RequestOutput`` per prompt, in input order.

        Every prompt is validated before any is scheduled: one bad prompt raises ValueError and
        nothing runs.
        """
        if prompt_token_ids is not None:
            prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("prompts must be given (a str, a dict with prompt_token_ids, or a list)")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        # Offline generation only reads finished outputs: skip building the per-step ones.
        params_list = [_final_only(p) for p in params_list]
        engine = self.llm_engine
        ids = [str(next(self._counter)) for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, params in zip(ids, prompts, params_list):
                engine.add_request(rid, prompt, params)
                added.append(rid)
        except Exception:
            engine.abort_request(added)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: str | dict | Sequence[str | dict],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search of ``params.beam_width`` beams for every prompt (vLLM's ``LLM.beam_search``).

        Each prompt runs as one engine request whose sequences are the beams (they share blocks and
        fork/free them as the search goes); the steps follow Hugging Face's ``generate(num_beams=k,
        do_sample=False)``. Returns, per prompt, the ``beam_width`` best finished beams, best first,
        each with prompt + generated tokens and the decoded text of both.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        sampling = params.to_sampling_params(logprobs=0)
        outs = self.generate(list(prompts), sampling, use_tqdm=use_tqdm)
        tok = self.llm_engine.tokenizer
        results = []
        for out in outs:
            if out.error is not None:
                raise RuntimeError(f"beam search of request {out.request_id} failed: {out.error}")
            seqs = []
            for c in out.outputs:
                tokens = list(out.prompt_token_ids) + list(c.token_ids)
                logprobs = [{t: Logprob(lp.logprob, lp.rank, lp.decoded_token) for t, lp in entry.items()}
                            for entry in (c.logprobs or [])]
                length = max(1, len(c.token_ids))
                seqs.append(BeamSearchSequence(
                    tokens, logprobs, c.cumulative_logprob, tok.decode(tokens) if tok is not None else None,
                    c.finish_reason, c.stop_reason, c.cumulative_logprob / length**params.length_penalty))
            results.append(BeamSearchOutput(seqs))
        return results

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Renders each conversation with the tokenizer's chat template, then generates."""
        tok = self.llm_engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer (the engine was built with skip_tokenizer_init)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            text = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt_token_ids": list(ids), "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.llm_engine
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            with frozen_gc_heap():  # no full collections of the caller's heap between steps
                while len(done) < len(ids) and engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _final_only(params: SamplingParams) -> SamplingParams:
    final = params.clone()  # the caller's object is left as it was
    final.output_kind = RequestOutputKind.FINAL_ONLY
    return final
