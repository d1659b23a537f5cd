"""A model's ``generation_config.json``, used the way vLLM uses it (``generation_config`` argument).

- ``"auto"`` (the default): the model's file gives the default sampling parameters of requests that
  set none: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, and
  ``max_new_tokens`` (as ``max_tokens``; the server also caps every request by it, as vLLM does).
- ``"vllm"``: SamplingParams' own defaults.
- a folder: its ``generation_config.json`` instead of the model's.

In every mode each ``eos_token_id`` the file lists stops generation (Llama-3 lists several).
Only keys present in the file count: HF's class defaults (``top_k=50`` ...) are not the model's choice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxpaged.sampling_params import SamplingParams

GENERATION_CONFIG_MODES = ("auto", "vllm")
# generation_config.json key -> SamplingParams field
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
FILE_NAME = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    fields: dict[str, Any]  # the file as read ({} when absent)
    default_sampling_params: dict[str, Any]  # SamplingParams keyword arguments

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.fields.get("eos_token_id")
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _read(folder: str, required: bool) -> dict[str, Any]:
    path = os.path.join(folder, FILE_NAME)
    if not os.path.isfile(path):
        if required:
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding {FILE_NAME}; "
                             f"{folder!r} has none")
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"generation_config: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} must hold a JSON object")
    return data


def load_generation_config(setting: str, model_dir: str) -> GenerationConfig:
    """Reads the file ``setting`` selects; ValueError naming ``generation_config`` when unusable."""
    if setting not in GENERATION_CONFIG_MODES and not os.path.isdir(setting):
        raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_MODES} or a folder, got {setting!r}")
    fields = _read(model_dir if setting in GENERATION_CONFIG_MODES else setting,
                   required=setting not in GENERATION_CONFIG_MODES)
    defaults: dict[str, Any] = {}
    if setting != "vllm":
        defaults = {ours: fields[theirs] for theirs, ours in SAMPLING_KEYS.items() if fields.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"generation_config: the model's {FILE_NAME} gives invalid defaults ({e})") from e
    return GenerationConfig(fields, defaults)
