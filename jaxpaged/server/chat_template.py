"""Chat templates rendered in a sandboxed Jinja environment.

A chat template ships inside a downloaded checkpoint, so it is untrusted code: it is rendered in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no
mutation of the objects passed in) with the variables and helpers Hugging Face passes
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ..., ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or refused the conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def load_template_arg(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template text itself (vLLM accepts both)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template must be a file or a Jinja template, got {value!r} (no such file)")
    return value


def tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: HF uses "default" for plain chat
        template = template.get("default")
    return template or None


class ChatTemplate:
    """One compiled template plus the tokenizer's special tokens."""

    def __init__(self, source: str, tokenizer: Any) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
        self._special = {}
        for name in _SPECIAL_TOKEN_NAMES:
            token = getattr(tokenizer, name, None)
            self._special[name] = token if isinstance(token, str) else ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> str:
        """The prompt text. ``continue_final_message`` cuts the text after the last message's
        content so the model continues it (vLLM's behaviour)."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true")
        variables: dict[str, Any] = dict(extra or {})
        variables.update(self._special)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        try:
            text = self._template.render(**variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the (untrusted) template does with the request's data
            raise ChatTemplateError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
        if continue_final_message:
            final = messages[-1].get("content") or ""
            cut = text.rfind(final.strip()) if final.strip() else -1
            if cut < 0:
                raise ChatTemplateError("continue_final_message: the final message's content is not in the rendered prompt")
            text = text[: cut + len(final.strip())]
        return text
