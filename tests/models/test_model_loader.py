"""Checkpoint loading: formats, dtypes, dummy weights and every documented error."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from jaxpaged.model_loader import load_model
from jaxpaged.safetensors_file import CheckpointError, SafetensorsFile, save_safetensors
from tests.helpers.paged_driver import hf_reference, max_rel_err, paged_greedy

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny") / "single"
    model.save_pretrained(path)
    sharded = path.parent / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    return str(path), str(sharded)


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def _params_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_sharded_checkpoint_loads_identically(hf_dir):
    single, sharded = hf_dir
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a = load_model(single, dtype="float32")
    b = load_model(sharded, dtype="float32")
    assert _params_equal(a.params, b.params)
    prompt = [5, 17, 42, 99, 7, 3, 250]
    ref_tokens, ref_logits = hf_reference(single, prompt, 8)
    tokens, logits = paged_greedy(b, prompt, 8)
    assert tokens == ref_tokens
    assert max_rel_err(logits, ref_logits) <= 1e-4


@pytest.mark.parametrize("dtype,expected", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16)])
def test_dtype_conversion(hf_dir, dtype, expected):
    lm = load_model(hf_dir[0], dtype=dtype)
    emb = lm.params["model"]["embed_tokens"]["embedding"]
    assert emb.dtype == expected
    ref = SafetensorsFile(os.path.join(hf_dir[0], "model.safetensors")).get("model.embed_tokens.weight")
    np.testing.assert_array_equal(np.asarray(emb), ref.astype(np.dtype(expected)))


def test_auto_dtype_follows_config(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["dtype"] = "bfloat16"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    assert load_model(path, dtype="auto").dtype == jnp.bfloat16


def test_bf16_checkpoint_reads_exact_values(tmp_path, hf_dir):
    path = _copy(hf_dir[0], tmp_path)
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: f.get(k).astype(ml_dtypes.bfloat16) for k in f.keys()}
    os.remove(os.path.join(path, "model.safetensors"))
    save_safetensors(tensors, os.path.join(path, "model.safetensors"))
    lm = load_model(path, dtype="float32")
    got = np.asarray(lm.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_array_equal(got, tensors["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T)


def test_dummy_load_needs_only_config(hf_dir, tmp_path):
    path = tmp_path / "cfg_only"
    path.mkdir()
    shutil.copy(os.path.join(hf_dir[0], "config.json"), path)
    lm = load_model(str(path), load_format="dummy", dtype="bfloat16")
    real = load_model(hf_dir[0], dtype="bfloat16")
    import jax

    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), lm.params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), real.params)
    w = np.asarray(lm.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float32)
    assert 0.01 < w.std() < 0.04 and np.isfinite(w).all()
    tokens, _ = paged_greedy(lm, [1, 2, 3], 4)
    assert len(tokens) == 4


# ---- errors -------------------------------------------------------------------------------

def test_missing_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path / "x"))


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(str(tmp_path / "nope"))


def test_missing_weights(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_model(path)


def _rewrite(path, edit):
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    edit(tensors)
    save_safetensors(tensors, os.path.join(path, "model.safetensors"))


def test_missing_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*layers_1/mlp/up_proj/kernel"):
        load_model(path)


def test_unexpected_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.bogus.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.bogus\.weight'"):
        load_model(path)


def test_unexpected_layer_beyond_config(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", np.zeros((64, 32), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'.*layers_7"):
        load_model(path)


def test_shape_mismatch(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", np.ones(31, np.float32)))
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor 'model\.norm\.weight'.*\(31,\).*\(32,\)"):
        load_model(path)


def test_unsupported_architecture_lists_supported(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["T5ForConditionalGeneration"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"'T5ForConditionalGeneration' is not supported; supported architectures: .*LlamaForCausalLM"):
        load_model(path)


def test_corrupt_safetensors_header(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(path)


def test_truncated_safetensors(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    p = os.path.join(path, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_malformed_config_json(hf_dir, tmp_path):
    path = _copy(hf_dir[0], tmp_path)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)


def test_sharded_index_names_missing_file(hf_dir, tmp_path):
    path = _copy(hf_dir[1], tmp_path)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"missing: {shard}"):
        load_model(path)


def test_bad_dtype_and_load_format(hf_dir):
    with pytest.raises(ValueError, match="dtype='float8'.*allowed: auto, float32, bfloat16, float16"):
        load_model(hf_dir[0], dtype="float8")
    with pytest.raises(ValueError, match="load_format='pt'.*allowed: auto, safetensors, gguf, dummy"):
        load_model(hf_dir[0], load_format="pt")
