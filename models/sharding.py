"""Tensor parallelism (Megatron-style) as each family declares it: one table of parameter-path
patterns → roles beside the family's HF weight table, and the packed-projection layouts.

Roles (a Flax ``Dense`` kernel is ``[in, out]``):

* ``COLUMN``: the output features split over the devices (kernel ``[in, out/N]``, bias ``[out/N]``):
  q/k/v, MLP up/gate.
* ``ROW``: the input features split (kernel ``[in/N, out]``); the partial products are summed
  across devices (XLA's SPMD partitioner inserts the all-reduce) before the replicated bias is added:
  attention output and MLP down projections.
* ``KV_COLUMN``: ``COLUMN`` when the KV heads divide over the devices; otherwise (fewer KV heads
  than devices, MQA/GQA) replicated, each device computing every KV head and attention keeping the
  ones its query heads read (vLLM's KV-head replication).
* ``VOCAB``: the vocabulary axis split: the token embedding ``[V/N, H]`` (lookup = masked local
  gather + all-reduce), the LM head ``[H, V/N]`` and its bias; the logits are gathered for the
  sampler. Replicated when ``V`` does not divide by N.
* ``PACKED``: a projection whose output packs several segments (q, k, v heads; gate and up halves);
  the columns are re-laid out when loaded so that each device's slice holds whole heads of every
  segment — ``[q heads of device 0 | its k heads | its v heads | q heads of device 1 | …]`` — KV heads
  duplicated when there are fewer than devices. :class:`Packed` describes the checkpoint's layout;
  the model calls :meth:`Packed.width` and :meth:`Packed.split` and the loader :meth:`Packed.columns`,
  so the layout is written once.
* anything no rule matches (norms, row biases, position tables) is replicated.

A config names its tensor-parallel degree in ``tensor_parallel_size`` (:class:`~models.config_utils.
PortConfig`); :func:`check_tensor_parallel` refuses, with the reason, a model whose heads or sharded
dimensions do not divide by it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

TP_AXIS = "tp"  # the mesh axis the model is sharded over

COLUMN = "column"
ROW = "row"
KV_COLUMN = "kv_column"
VOCAB = "vocab"
PACKED = "packed"
REPLICATED = "replicated"
ROLES = (COLUMN, ROW, KV_COLUMN, VOCAB, PACKED, REPLICATED)


def _units_of_shard(units: int, tp: int, shard: int, replicable: bool, what: str) -> range:
    """The units (heads, features) of a segment that device ``shard`` holds."""
    if units % tp == 0:
        per = units // tp
        return range(shard * per, (shard + 1) * per)
    if replicable and tp % units == 0:
        u = shard // (tp // units)
        return range(u, u + 1)
    allowed = "a multiple or a divisor of" if replicable else "a multiple of"
    raise ValueError(f"{what} ({units}) must be {allowed} tensor_parallel_size={tp}")


@dataclasses.dataclass(frozen=True)
class Packed:
    """The output columns of a packed projection: ``segments`` of ``(units, unit width)`` (e.g. q
    heads, k heads, v heads of ``head_dim``), laid out in the checkpoint one segment after the other
    or, with ``grouped``, per KV group (``[q heads of group g, k_g, v_g]`` for each g: Falcon,
    BLOOM / GPT-NeoX per-head ``[q|k|v]`` is the case of one query head per group).

    Segments whose ``replicable`` flag is set (KV heads) may have fewer units than devices: each
    device then holds a copy of the one unit its query heads use."""

    segments: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    replicable: tuple[bool, ...]
    grouped: bool = False

    @staticmethod
    def qkv(num_q_heads: int, num_kv_heads: int, head_dim: int, *, grouped: bool = False) -> "Packed":
        if num_q_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
        seg = ((num_q_heads, head_dim), (num_kv_heads, head_dim), (num_kv_heads, head_dim))
        return Packed(seg, ("query heads", "KV heads", "KV heads"), (False, True, True), grouped)

    @staticmethod
    def concat(*widths: int) -> "Packed":
        """Segments of plain features (e.g. an MLP's gate and up halves), each split evenly."""
        return Packed(tuple((w, 1) for w in widths), tuple(f"packed segment {i}" for i in range(len(widths))),
                      (False,) * len(widths))

    # ---- layout ---------------------------------------------------------------------------------
    def _canonical_start(self, seg: int, unit: int) -> int:
        if not self.grouped:
            return sum(u * w for u, w in self.segments[:seg]) + unit * self.segments[seg][1]
        (hq, d), (hkv, _), _ = self.segments
        g = hq // hkv  # query heads per group
        if seg == 0:
            return ((unit // g) * (g + 2) + unit % g) * d
        return (unit * (g + 2) + g + seg - 1) * d

    def _shard_units(self, tp: int, shard: int) -> list[range]:
        return [_units_of_shard(u, tp, shard, r, n) for (u, _), r, n in zip(self.segments, self.replicable, self.names)]

    @property
    def canonical_width(self) -> int:
        return sum(u * w for u, w in self.segments)

    def width(self, tp: int) -> int:
        """Columns of the projection as the model holds it at ``tp`` devices."""
        if tp == 1:
            return self.canonical_width
        return tp * sum(len(r) * w for r, (_, w) in zip(self._shard_units(tp, 0), self.segments))

    def columns(self, tp: int) -> np.ndarray:
        """For each column held at ``tp`` devices, the checkpoint column it comes from (device-major:
        device i's contiguous slice holds its units of every segment, in segment order)."""
        if tp == 1:
            return np.arange(self.canonical_width)
        out = []
        for shard in range(tp):
            for seg, (units, (_, w)) in enumerate(zip(self._shard_units(tp, shard), self.segments)):
                for unit in units:
                    start = self._canonical_start(seg, unit)
                    out.append(np.arange(start, start + w))
        return np.concatenate(out)

    def check(self, tp: int) -> None:
        """ValueError naming the segment that cannot be split over ``tp`` devices."""
        for shard in range(tp):
            self._shard_units(tp, shard)

    def split(self, x: jnp.ndarray, tp: int) -> list[jnp.ndarray]:
        """Splits the projection's output ``[T, width(tp)]`` into its segments, each ``[T, units, w]``
        (a segment with fewer units than devices comes out with one copy per device)."""
        T = x.shape[0]
        if tp == 1 and self.grouped:
            (hq, d), (hkv, _), _ = self.segments
            g = x.reshape(T, hkv, hq // hkv + 2, d)
            return [g[:, :, :-2].reshape(T, hq, d), g[:, :, -2], g[:, :, -1]]
        if tp == 1:
            bounds = np.cumsum([u * w for u, w in self.segments])[:-1]
            return [s.reshape(T, u, w) for s, (u, w) in zip(jnp.split(x, bounds, axis=-1), self.segments)]
        local = [(len(r), w) for r, (_, w) in zip(self._shard_units(tp, 0), self.segments)]
        x = x.reshape(T, tp, -1)
        out, start = [], 0
        for units, w in local:
            out.append(x[:, :, start : start + units * w].reshape(T, tp * units, w))
            start += units * w
        return out


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """Parameters whose '/'-joined path fully matches ``pattern`` take ``role``; a ``PACKED`` rule
    names the function giving the projection's :class:`Packed` layout from the config."""

    pattern: str
    role: str
    packing: Callable[[Any], Packed] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} unknown; allowed: {', '.join(ROLES)}")
        if (self.role == PACKED) != (self.packing is not None):
            raise ValueError("a PACKED rule needs its packing function, and only a PACKED rule has one")


def shard(pattern: str, role: str, packing: Callable[[Any], Packed] | None = None) -> ShardRule:
    return ShardRule(pattern, role, packing)


_PARAMS = r"/(kernel|bias)"


def megatron_table(*, embedding: str, layers: str, qkv: str | tuple[str, Callable[[Any], Packed]], attn_out: str,
                   mlp_in: str | tuple[str, Callable[[Any], Packed]], mlp_out: str, lm_head: str,
                   kv: str | None = None) -> tuple[ShardRule, ...]:
    """A decoder's Megatron split, from its parameter names: the token ``embedding`` and the
    ``lm_head`` by vocabulary; in every layer (``layers``: the path prefix of a layer, a regex) the
    attention input ``qkv`` by column — a module, or ``(module, packing)`` for a packed projection —
    with separate ``kv`` projections split by KV head (or replicated), ``attn_out`` by row, the MLP's
    ``mlp_in`` by column (or packed) and ``mlp_out`` by row. Module paths are regexes; a module's
    kernel and bias follow it, except a row-parallel bias, which stays replicated."""

    def column(module: str | tuple[str, Callable[[Any], Packed]]) -> ShardRule:
        if isinstance(module, tuple):
            return shard(layers + module[0] + _PARAMS, PACKED, module[1])
        return shard(layers + module + _PARAMS, COLUMN)

    rules = [shard(embedding, VOCAB), column(qkv)]
    if kv is not None:
        rules.append(shard(layers + kv + _PARAMS, KV_COLUMN))
    rules += [shard(layers + attn_out + "/kernel", ROW), column(mlp_in), shard(layers + mlp_out + "/kernel", ROW),
              shard(lm_head + _PARAMS, VOCAB)]
    return tuple(rules)


def tensor_parallel_size(config: Any) -> int:
    return int(getattr(config, "tensor_parallel_size", 1))


def kv_cache_heads(config: Any) -> int:
    """KV heads the paged cache holds across all devices: the model's, or one per device when there
    are fewer KV heads than devices (each device keeps a copy of the head its query heads read)."""
    hkv, tp = config.num_key_value_heads, tensor_parallel_size(config)
    return hkv if hkv % tp == 0 else tp


@dataclasses.dataclass(frozen=True)
class ParamSharding:
    """How one parameter is held at ``tp`` devices: its partition spec over ``TP_AXIS`` and, for a
    packed projection, the checkpoint column each held column comes from."""

    spec: P
    columns: np.ndarray | None = None  # along the last axis
    canonical_width: int | None = None  # a packed projection's last axis in the checkpoint

    def relayout(self, array: Any) -> Any:
        return array if self.columns is None else array[..., self.columns]

    def canonical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the checkpoint stores for a parameter held in ``shape``."""
        return tuple(shape) if self.canonical_width is None else tuple(shape[:-1]) + (self.canonical_width,)


class ShardingPlan:
    """Every parameter's :class:`ParamSharding` for one model at its config's ``tensor_parallel_size``."""

    def __init__(self, table: Sequence[ShardRule], config: Any, shapes: Mapping[tuple[str, ...], tuple[int, ...]]):
        self.tp = tensor_parallel_size(config)
        self.params: dict[tuple[str, ...], ParamSharding] = {}
        self.replicated_vocab: list[str] = []
        for path, shape in shapes.items():
            self.params[path] = self._resolve(table, config, "/".join(path), tuple(shape))

    def __getitem__(self, path: tuple[str, ...]) -> ParamSharding:
        return self.params[path]

    def _resolve(self, table, config, name: str, shape: tuple[int, ...]) -> ParamSharding:
        rule = next((r for r in table if re.fullmatch(r.pattern, name)), None)
        role = rule.role if rule is not None else REPLICATED
        tp = self.tp
        if role == KV_COLUMN:
            role = COLUMN if config.num_key_value_heads % tp == 0 else REPLICATED
        if role == VOCAB and shape[0 if name.endswith("embedding") else -1] % tp:
            self.replicated_vocab.append(name)
            role = REPLICATED
        if role == REPLICATED or tp == 1:
            return ParamSharding(P())
        if role == VOCAB:
            axis = 0 if name.endswith("embedding") else len(shape) - 1
        elif role == ROW:
            if len(shape) == 1:  # a row layer's bias: added once, after the sum
                return ParamSharding(P())
            axis = 0
        else:  # COLUMN or PACKED: the output (last) axis
            axis = len(shape) - 1
        if shape[axis] % tp:
            raise ValueError(f"cannot shard {name} (shape {shape}) over tensor_parallel_size={tp}: "
                             f"axis {axis} ({shape[axis]}) does not divide")
        spec = P(*([None] * axis + [TP_AXIS] + [None] * (len(shape) - axis - 1)))
        if role == PACKED:
            packed = rule.packing(config)
            return ParamSharding(spec, packed.columns(tp), packed.canonical_width)
        return ParamSharding(spec)


def check_tensor_parallel(config: Any) -> None:
    """Refuses (ValueError, with the reason) a model its config's ``tensor_parallel_size`` cannot
    split: query heads must divide over the devices, KV heads must divide or be divided by them."""
    tp = tensor_parallel_size(config)
    if tp == 1:
        return
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    if h % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {h} attention heads "
                         f"(num_attention_heads); allowed: a divisor of {h}")
    if hkv % tp and tp % hkv:
        raise ValueError(f"tensor_parallel_size={tp} and the model's {hkv} KV heads: one must divide the other "
                         f"(each device holds whole KV heads, or a copy of one)")
