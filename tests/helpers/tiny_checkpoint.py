"""A tiny random Llama checkpoint with a real (trained) byte-level BPE tokenizer and a chat template.

Built offline in a few seconds: the tokenizer is trained on a short built-in corpus so that text
round-trips, the model has 2 layers of width 64, and `save_pretrained` writes the HF layout the
loader reads (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
"""

from __future__ import annotations

import os

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores the key value cache in fixed size blocks.",
    "A scheduler batches requests at the iteration level; continuous batching keeps the device busy.",
    "Hello world! How are you today? I am fine, thank you.",
    "JAX compiles step functions with XLA; buckets keep shapes fixed after warm-up.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2048.",
    "Once upon a time there was a small model that generated random text.",
    "The server streams tokens over server-sent events to many clients at once.",
]


def make_tiny_checkpoint(path: str, *, vocab_size: int = 512, max_position_embeddings: int = 256,
                         chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> str:
    """Writes the checkpoint under ``path`` (created) and returns it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full byte alphabet: every token is printable ASCII, so token texts concatenate to the
    # output text exactly (a random model would otherwise emit lone UTF-8 continuation bytes).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        initializer_range=0.1, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return path
