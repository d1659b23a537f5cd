"""The HF fast tokenizer a GGUF file's ``tokenizer.*`` metadata describes, built with ``tokenizers``.

Two tokenizer models, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE (vocabulary in GPT-2's byte alphabet, merges in the file). How text is
  split before BPE depends on the vocabulary (``tokenizer.ggml.pre``); the splits below are
  llama.cpp's for each supported name, and any other name is refused rather than guessed (a wrong
  split tokenizes numbers or newlines differently from the model's training).
- ``llama``: SentencePiece BPE (Llama-2, Mistral, TinyLlama ...): ``▁`` for spaces, byte fallback
  tokens ``<0x0A>``, merges from the file or, when absent, derived from the token scores.

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so both
are matched whole in text, as llama.cpp does. Built once per file and cached by the caller; no torch.
"""

from __future__ import annotations

from typing import Any

from jaxpaged.safetensors_file import CheckpointError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex splits applied in order (llama.cpp's llama-vocab.cpp)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # SmolLM: every digit on its own
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _split_pre_tokenizer(splits: tuple[str, ...]):
    from tokenizers import Regex, pre_tokenizers

    parts = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    return pre_tokenizers.Sequence(parts + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_bpe(meta: dict[str, Any]):
    from tokenizers import Tokenizer, decoders, models

    pre = meta.get("pre") or "default"
    if pre not in PRE_TOKENIZER_SPLITS:
        raise CheckpointError(f"GGUF tokenizer pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                              f"supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    if meta.get("merges") is None:
        raise CheckpointError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(meta["tokens"]):
        # a few converters store raw text for some tokens; BPE needs the byte-alphabet spelling
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    unk_id = meta.get("unknown_token_id")  # only reached by a vocabulary without the full byte alphabet
    unk = meta["tokens"][unk_id] if unk_id is not None and 0 <= unk_id < len(meta["tokens"]) else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _split_pre_tokenizer(PRE_TOKENIZER_SPLITS[pre])
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: every split of a token into two
    tokens, ranked by the merged token's score (higher merges first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for tok, score in zip(tokens, scores):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_bpe(meta: dict[str, Any]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokens"]
    if meta.get("merges") is not None:
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    elif meta.get("scores") is not None:
        merges = _merges_from_scores(tokens, meta["scores"])
    else:
        raise CheckpointError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    unk_id = meta.get("unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space = meta.get("add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, None


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
_META_KEYS = ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id", "eos_token_id",
              "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_space_prefix")


def read_tokenizer_metadata(gguf) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values (short names) and ``chat_template`` of a ``GGUFFile``."""
    meta = {k: gguf.get(f"tokenizer.ggml.{k}") for k in _META_KEYS}
    meta["chat_template"] = gguf.get("tokenizer.chat_template")
    return meta


def build_tokenizer(meta: dict[str, Any], model_max_length: int | None = None):
    """A ``PreTrainedTokenizerFast`` (special tokens, BOS/EOS flags, chat template) from metadata."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("model")
    if kind not in _BUILDERS:
        raise CheckpointError(f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                              f"supported: {', '.join(sorted(_BUILDERS))}")
    if not meta.get("tokens"):
        raise CheckpointError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
    tok, alphabet = _BUILDERS[kind](meta)
    tokens, types = meta["tokens"], meta.get("token_type") or []
    control = [t for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [t for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("add_bos_token", kind == "llama"))  # llama.cpp adds BOS to SPM unless told not to
    add_eos = bool(meta.get("add_eos_token", False))
    single = " ".join(([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else []))
    specials = [(t, tokens.index(t)) for t in {bos if add_bos else None, eos if add_eos else None} if t]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), model_max_length=model_max_length or int(1e30),
        clean_up_tokenization_spaces=False)
    if meta.get("chat_template"):
        fast.chat_template = meta["chat_template"]
    return fast
