"""Reading HF ``config.json`` dicts whose keys changed spelling across model families and
transformers versions (``n_embd`` vs ``hidden_size``, ``rotary_pct`` vs
``rope_parameters.partial_rotary_factor``, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_MISSING = object()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PortConfig:
    """The fields every port's config carries, read alike from every family's ``config.json``
    (:func:`common_fields`). Keyword-only, so that a family's own fields come first."""

    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype ("auto" loads it)
    # Devices the model is split over (models/sharding.py); set by the loader, not read from the
    # checkpoint. Packed projections are held in a per-device layout when it is above 1.
    tensor_parallel_size: int = 1


def common_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`PortConfig`'s fields from an HF config dict, for a family's ``from_hf_config``."""
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=eos_token_id(hf), torch_dtype=torch_dtype(hf))


def divisible_head_dim(hidden: int, heads: int, hidden_name: str, heads_name: str) -> int:
    """``hidden // heads``; ValueError naming both config keys when the heads do not split it."""
    if hidden % heads:
        raise ValueError(f"{hidden_name}={hidden} must be divisible by {heads_name}={heads}")
    return hidden // heads


def hf_get(hf: Mapping[str, Any], *names: str, default: Any = _MISSING) -> Any:
    """The value of the first of ``names`` present (and not None) in ``hf``; else ``default``.

    Without a default, a config lacking every spelling raises a ValueError naming them.
    """
    for name in names:
        value = hf.get(name)
        if value is not None:
            return value
    if default is _MISSING:
        raise ValueError(f"config.json lacks {' / '.join(names)} (needed by this architecture)")
    return default


def eos_token_id(hf: Mapping[str, Any]) -> int | tuple[int, ...] | None:
    eos = hf.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else eos


def torch_dtype(hf: Mapping[str, Any]) -> str | None:
    return hf.get("dtype") or hf.get("torch_dtype")


def partial_rotary_factor(hf: Mapping[str, Any], *legacy_names: str, default: float) -> float:
    """The fraction of each head's features that RoPE rotates: transformers 5 keeps it in
    ``rope_parameters``; older configs use a top-level key (``rotary_pct``, ``partial_rotary_factor``)."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(hf_get(hf, *legacy_names, "partial_rotary_factor", default=default))
