"""The embedded default model is built deterministically and loads through the real loader."""

import hashlib
import os

from jaxpaged.default_model import build_default_model
from jaxpaged.model_loader import load_model


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
