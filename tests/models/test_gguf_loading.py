"""GGUF files as models: tiny random Llama / Qwen2 checkpoints written the way llama.cpp's converter
writes them (``tests/gguf_writer.py``) load through ``load_format="gguf"`` and match transformers'
own GGUF loader (prefill logits and a greedy continuation through the paged cache); the engine
serves one with the tokenizer and chat template rebuilt from its metadata; unsupported
architectures and tensor types are refused by name."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("gguf")
import gguf  # noqa: E402
import torch  # noqa: E402

from jaxpaged.gguf_checkpoint import gguf_side_dir  # noqa: E402
from jaxpaged.model_loader import load_model  # noqa: E402
from jaxpaged.safetensors_file import CheckpointError  # noqa: E402
from tests.helpers.gguf_writer import random_k_blocks, write_gguf  # noqa: E402
from tests.helpers.parity_helpers import (  # noqa: E402
    NEW_TOKENS, assert_port_matches, make_hf_model, prompt_for, save_hf, torch_reference,
)
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def _transformers_gguf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1", "Q4_0", "Q5_1"])
def test_llama_gguf_matches_transformers_gguf_loader(tiny_dir, tmp_path, qtype):
    path = write_gguf(tiny_dir, str(tmp_path / f"tiny-{qtype}.gguf"), qtype)
    ref = _transformers_gguf(path)
    prompt = prompt_for(ref.config.vocab_size)
    ref_tokens, ref_logits = torch_reference(ref, prompt, NEW_TOKENS)
    lm = assert_port_matches(path, prompt, ref_tokens, ref_logits, "LlamaForCausalLM")
    assert lm.hf_config["tie_word_embeddings"] is False and lm.dtype == np.float32
    if qtype == "F32":  # lossless: the original HF model gives the same logits too
        from transformers import AutoModelForCausalLM

        orig = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        orig_tokens, orig_logits = torch_reference(orig, prompt, NEW_TOKENS)
        assert orig_tokens == ref_tokens
        np.testing.assert_allclose(ref_logits, orig_logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Rows of 256 values, the K-quants' super-block."""
    model = make_hf_model("LlamaConfig", dict(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05))
    return save_hf(model, str(tmp_path_factory.mktemp("wide")))


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_gguf_matches_transformers_gguf_loader(wide_dir, tmp_path, qtype):
    # gguf has no K-quant quantiser: the blocks are random bytes with small float16 scales
    path = write_gguf(wide_dir, str(tmp_path / f"wide-{qtype}.gguf"), qtype, with_tokenizer=False,
                      quantize=random_k_blocks)
    ref = _transformers_gguf(path)
    prompt = prompt_for(256)
    ref_tokens, ref_logits = torch_reference(ref, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "LlamaForCausalLM")


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen2_gguf_tied_with_biases_matches_transformers(tmp_path, qtype):
    model = make_hf_model("Qwen2Config", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1e5))
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    src = save_hf(model, str(tmp_path / "qwen2"))
    path = write_gguf(src, str(tmp_path / f"qwen2-{qtype}.gguf"), qtype, arch="qwen2", with_tokenizer=False)
    ref = _transformers_gguf(path)
    prompt = prompt_for(256)
    ref_tokens, ref_logits = torch_reference(ref, prompt, NEW_TOKENS)
    lm = assert_port_matches(path, prompt, ref_tokens, ref_logits, "Qwen2ForCausalLM")
    assert lm.config.tie_word_embeddings and lm.config.qkv_bias


def test_side_files_tokenizer_and_eos_list(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tiny_dir, str(tmp_path / "tiny.gguf"), "Q8_0")
    side = gguf_side_dir(path, str(tmp_path / "cache"))
    assert gguf_side_dir(path, str(tmp_path / "cache")) == side  # cached: built once
    config = json.load(open(os.path.join(side, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    ours, ref = AutoTokenizer.from_pretrained(side), AutoTokenizer.from_pretrained(tiny_dir)
    # (the tiny vocabulary lacks "\n" and "\t": both tokenizers give <unk> for them)
    for text in ["The quick brown fox.", "Hello world! 42 and 2048", "<|im_start|>user\nHi<|im_end|>\n  x\ty"]:
        assert ours(text).input_ids == ref(text).input_ids
    for text in ["The quick brown fox.", "<|im_start|>user Hi<|im_end|> there"]:
        assert ours.decode(ours(text).input_ids, skip_special_tokens=False) == "<s>" + text
    conv = [{"role": "user", "content": "Hello there"}]
    assert ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # llama.cpp ends a turn at EOS and at the control token <|im_end|>: both are EOS ids
    gen = json.load(open(os.path.join(side, "generation_config.json")))
    assert gen["eos_token_id"] == [ref.eos_token_id, ref.convert_tokens_to_ids("<|im_end|>")]


def test_engine_serves_a_gguf_file_like_its_hf_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from jaxpaged import LLM, SamplingParams
    from jaxpaged.engine_args import EngineArgs
    from jaxpaged.server.api_server import make_arg_parser

    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_dir, str(tmp_path / "tiny.gguf"), "F32")
    args = EngineArgs.from_cli_args(make_arg_parser().parse_args(["--model", path]))
    assert args.model == path and args.load_format == "auto"
    kw = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The quick brown fox", "Paged attention stores"]
    hf_llm = LLM(model=tiny_dir, **kw)
    want = [o.outputs[0].token_ids for o in hf_llm.generate(prompts, params, use_tqdm=False)]
    want_chat = hf_llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False)[0]
    del hf_llm
    llm = LLM(model=path, load_format="gguf", **kw)
    assert llm.model_path == path
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [o.prompt_token_ids for o in outs] == [list(llm.get_tokenizer()(p).input_ids) for p in prompts]
    chat = llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False)[0]
    assert chat.prompt == want_chat.prompt and chat.outputs[0].token_ids == want_chat.outputs[0].token_ids


def _write_minimal(path: str, arch: str, tensors: dict) -> str:
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    for name, (data, kind) in tensors.items():
        if kind is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_and_tensor_type_are_refused_by_name(tmp_path):
    emb = np.zeros((64, 32), np.float32)
    bad_arch = _write_minimal(str(tmp_path / "m.gguf"), "mamba", {"token_embd.weight": (emb, None)})
    with pytest.raises(CheckpointError, match=r"GGUF architecture 'mamba' .* supported: llama, qwen2"):
        load_model(bad_arch)
    # IQ4_NL: 32 values in 18 bytes per block, a type jaxpaged does not dequantise
    iq = np.zeros((64, 18), np.uint8)
    bad_type = _write_minimal(str(tmp_path / "t.gguf"), "llama", {"token_embd.weight": (iq, "IQ4_NL")})
    with pytest.raises(CheckpointError, match=r"type IQ4_NL \(e\.g\. 'token_embd\.weight'\).*supported types: F32"):
        load_model(bad_type)
    with pytest.raises(CheckpointError, match="load_format='gguf' needs a .gguf file"):
        load_model(str(tmp_path), load_format="gguf")
    with pytest.raises(CheckpointError, match="load_format='safetensors' cannot read the GGUF file"):
        load_model(bad_arch, load_format="safetensors")
    no_embedding = _write_minimal(str(tmp_path / "e.gguf"), "llama", {"output_norm.weight": (np.ones(32, np.float32), None)})
    with pytest.raises(CheckpointError, match="has no 'token_embd.weight' tensor"):
        load_model(no_embedding)
