"""The HTTP side's tokenizer: prompts are tokenized before they reach the engine loop.

Tokenizing in the server (as vLLM's API server does) lets it check ``prompt + max_tokens`` against
the context before anything is queued, and keeps long prompts from stalling the engine thread. The
work runs on one dedicated worker thread so the event loop stays responsive and encodes never
overlap (HF fast tokenizers refuse a call that changes their padding/truncation state while another
call is inside). The server loads its own instance so the engine thread's one is never shared.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from typing import Any


class ServerTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxpaged-tokenizer")

    @classmethod
    def for_engine(cls, engine_tokenizer: Any) -> "ServerTokenizer":
        """A second instance loaded from the same files, so the engine thread keeps its own."""
        path = getattr(engine_tokenizer, "name_or_path", "")
        if path and os.path.isdir(path):
            from transformers import AutoTokenizer

            return cls(AutoTokenizer.from_pretrained(path))
        return cls(engine_tokenizer)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        fn = functools.partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return list(await loop.run_in_executor(self._pool, fn))

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        loop = asyncio.get_running_loop()
        fn = functools.partial(self.tokenizer.decode, token_ids, skip_special_tokens=skip_special_tokens)
        return await loop.run_in_executor(self._pool, fn)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server, bounded by the vocabulary
    def token_text(self, token_id: int) -> str:
        """One token as text, for logprobs when the engine gave no decoded string."""
        return self.tokenizer.decode([token_id])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
