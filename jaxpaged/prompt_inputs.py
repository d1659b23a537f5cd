"""The prompt forms ``LLMEngine.add_request`` accepts (vLLM's): a string, a list of token ids, or a
dict with ``prompt`` or ``prompt_token_ids`` (and optionally ``cache_salt``)."""

from __future__ import annotations

from typing import Any


def cache_salt(prompt: Any) -> str | None:
    """The prompt's ``cache_salt`` (prefix-cache isolation between tenants), if it has one."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def parse_prompt(prompt: Any, tokenizer: Any) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids); a ValueError naming what is wrong with the prompt."""
    if isinstance(prompt, str):
        if not prompt:  # would still tokenize to [BOS] with many tokenizers
            raise ValueError("prompt must not be empty")
        if tokenizer is None:
            raise ValueError("prompt must be given as prompt_token_ids: the engine has no tokenizer "
                             "(skip_tokenizer_init=True)")
        return prompt, list(tokenizer(prompt).input_ids)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
        elif "prompt" in prompt:
            return parse_prompt(prompt["prompt"], tokenizer)
        else:
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
    elif isinstance(prompt, (list, tuple)):
        ids, text = prompt, None
    else:
        raise ValueError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids must be a list of integers")
    return text, list(ids)
