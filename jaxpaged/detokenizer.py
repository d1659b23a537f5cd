"""Incremental detokenization and stop-string matching (vLLM's prefix_offset / read_offset scheme).

Decoding one token at a time is wrong for byte-level BPE: a multi-byte UTF-8 character can be split
over several tokens, and SentencePiece-style decoders drop a leading space at the start of the text
they are given. So each step decodes a short window of ids twice, `ids[prefix_offset:read_offset]`
(text already emitted) and `ids[prefix_offset:]`, and emits the difference, holding it back while
the window ends in U+FFFD (an incomplete character). The window starts in the prompt's last few
tokens so the first output token is decoded with its left context.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from jaxpaged.outputs import Logprob

# How many prompt tokens of left context the first output tokens are decoded with (vLLM's value).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT_CHAR = "\ufffd"
# Drop ids left of the window once this many have piled up (they are never decoded again).
_TRIM_AT = 256


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a few tokens at a time.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).
        prompt_token_ids: the prompt; its last few tokens are the left context of the output.
        skip_special_tokens: leave special tokens out of the text.
        spaces_between_special_tokens: passed to slow tokenizers only; fast tokenizers decode
            special tokens as their decoder does (as in vLLM).

    Decoding never cleans up tokenization spaces (`clean_up_tokenization_spaces=False`): the clean-up
    is not local and would make the windows disagree; the text equals
    `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
    whenever that does not end in an incomplete character, and always after `flush()`.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._decode_kwargs: dict[str, Any] = {
            "skip_special_tokens": skip_special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        if not getattr(tokenizer, "is_fast", False):
            self._decode_kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
        context = [int(t) for t in prompt_token_ids][-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.output_token_ids: list[int] = []
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self._decode_kwargs) if ids else ""

    def append(self, token_ids: Iterable[int]) -> str:
        """Add generated token ids; return the text they complete (possibly "")."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self.output_token_ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # Incomplete character, or a token that adds no text (a skipped special token): wait.
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self.output_text += new_text
        return new_text

    def flush(self) -> str:
        """Emit text still held back (a trailing incomplete character decodes as U+FFFD).

        Call when the sequence finishes; afterwards `output_text` equals the full decode.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.output_text += new_text
        return new_text


def check_stop(
    text: str, new_text_len: int, stop: Sequence[str], include_stop_str_in_output: bool
) -> Optional[tuple[str, str]]:
    """Find a stop string in `text` whose match ends inside its last `new_text_len` characters.

    Only the new text (plus the len(stop)-1 characters before it, so a stop string straddling two
    increments is found) is searched. The earliest match wins (ties: first in `stop`). Returns
    (stop string, text truncated before the stop string, or just after it when
    include_stop_str_in_output), or None.
    """
    if new_text_len <= 0 or not stop:
        return None
    best: Optional[tuple[int, str]] = None
    for stop_str in stop:
        start = max(0, len(text) - new_text_len - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    if best is None:
        return None
    index, stop_str = best
    end = index + len(stop_str) if include_stop_str_in_output else index
    return stop_str, text[:end]


def stop_buffer_length(stop: Sequence[str], include_stop_str_in_output: bool) -> int:
    """Characters a streaming client must be kept from seeing until the sequence finishes.

    The tail of the text could be the start of a stop string that is cut off later (vLLM v1).
    """
    if not stop or include_stop_str_in_output:
        return 0
    return max(len(s) for s in stop) - 1


def decode_logprob_tokens(tokenizer: Any, logprobs: Iterable[Optional[dict[int, Logprob]]]) -> None:
    """Fill `decoded_token` of each Logprob in place with its token's text (special tokens kept)."""
    cache: dict[int, str] = {}
    for entry in logprobs:
        if entry is None:
            continue
        for token_id, lp in entry.items():
            if token_id not in cache:
                cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
            lp.decoded_token = cache[token_id]
