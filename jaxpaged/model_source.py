"""What ``model=`` names, resolved to the files the engine reads.

- ``None``: the default model, SmolLM2-135M-Instruct from its GGUF (``default_gguf``); when that
  cannot be fetched, the random tiny model (``default_model``), with the reason in the log.
- a ``.gguf`` file: its weights, and side files (config, generation config, tokenizer) built from
  its metadata into the cache.
- a directory: an HF checkpoint.
- ``org/name``: a Hugging Face Hub repository (``hub_model``: local cache first).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from jaxpaged.cache_dir import cache_root
from jaxpaged.default_gguf import DEFAULT_GGUF_DESCRIPTION, DefaultModelUnavailable, ensure_default_gguf
from jaxpaged.default_model import TINY_MODEL_NOTE, ensure_tiny_model
from jaxpaged.gguf_checkpoint import gguf_side_dir
from jaxpaged.gguf_file import is_gguf_path
from jaxpaged.hub_model import looks_like_repo_id, resolve_hub_model

logger = logging.getLogger("jaxpaged")

# The name the server gives the default model, whichever of the two is in use.
DEFAULT_SERVED_MODEL_NAME = "default-model-v1"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    model_path: str  # what the loader reads: an HF checkpoint directory or a .gguf file
    config_dir: str  # config.json, generation_config.json and the tokenizer files
    description: str


def default_model_source() -> ModelSource:
    try:
        path = ensure_default_gguf()
    except DefaultModelUnavailable as e:
        logger.warning("The default model %s is unavailable (%s); using the random tiny model instead: %s",
                       DEFAULT_GGUF_DESCRIPTION, e, TINY_MODEL_NOTE)
        tiny = ensure_tiny_model()
        return ModelSource(tiny, tiny, "the random tiny model (fallback)")
    return ModelSource(path, os.path.dirname(path), DEFAULT_GGUF_DESCRIPTION)


def resolve_model_source(model: str | None, revision: str | None = None) -> ModelSource:
    """Where ``model``'s weights, config and tokenizer are; ValueError naming ``model`` if nowhere."""
    if model is None:
        return default_model_source()
    if is_gguf_path(model):
        if not os.path.isfile(model):
            raise ValueError(f"model {model!r} is not a file (a .gguf model must be a path to the file)")
        return ModelSource(model, gguf_side_dir(model, cache_root()), f"GGUF file {model}")
    if os.path.isdir(model):
        return ModelSource(model, model, f"HF checkpoint {model}")
    if looks_like_repo_id(model):
        path = resolve_hub_model(model, revision)
        return ModelSource(path, path, f"Hugging Face Hub model {model}" + (f"@{revision}" if revision else ""))
    raise ValueError(f"model {model!r} is neither an HF checkpoint directory, a .gguf file, nor a Hugging Face "
                     "Hub name (org/name)")
