"""Loading an HF-format checkpoint directory (or a GGUF file) into a Flax port.

``config.json`` → the port's frozen config; weights from a single ``model.safetensors``, a sharded
set indexed by ``model.safetensors.index.json``, a ``.gguf`` file (``load_format="gguf"``, implied
by the suffix: config and dequantised tensors under HF names from ``gguf_checkpoint``), or
(``load_format="dummy"``) random weights of the right shapes built on the device from the config alone. Tensors stream one at a time from a
memory map to the device, so host memory never holds a second full copy of the weights.

With a ``mesh`` (tensor parallelism) the family's sharding plan (models/sharding.py) decides each
tensor's layout: packed projections are re-laid out on the host, one tensor at a time, and every
device receives only its slice; dummy weights are drawn directly into the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from jaxpaged import tensor_parallel
from jaxpaged.gguf_checkpoint import hf_config_from_gguf, hf_tensors
from jaxpaged.gguf_file import GGUFFile, is_gguf_path
from jaxpaged.safetensors_file import CheckpointError, SafetensorsFile
from models import get_model_class
from models.attention_metadata import pack_attention_metadata
from models.sharding import ShardingPlan, check_tensor_parallel, kv_cache_heads
from models.weight_table import map_hf_name

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "float": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "half": jnp.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
logger = logging.getLogger("jaxpaged")

ParamPath = tuple[str, ...]
PlaceFn = Callable[[ParamPath, np.ndarray | jax.Array], jax.Array]


@dataclasses.dataclass
class LoadedModel:
    """A port instance, its parameters on device, the configs it was built from, and the attention
    backend its steps run on (carried by each step's AttentionMetadata)."""

    model: Any  # flax.linen.Module
    params: Any  # nested dict of jax.Array
    config: Any  # the port's frozen config
    hf_config: dict
    architecture: str
    dtype: Any
    model_path: str
    attention_backend: str = "reference"
    mesh: Mesh | None = None  # tensor parallelism: the devices the parameters are split over


def read_hf_config(model_path: str) -> dict:
    """Reads ``config.json`` from a checkpoint directory (clear errors when absent or malformed)."""
    if not os.path.isdir(model_path):
        raise CheckpointError(f"model path {model_path!r} is not a directory")
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in {model_path!r}: not an HF checkpoint directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg


def resolve_dtype(dtype: Any, hf_config: dict) -> Any:
    """``"auto"`` takes the checkpoint's ``dtype``/``torch_dtype`` (float32 when absent)."""
    if dtype is None or dtype == "auto":
        name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        if name not in DTYPES:
            raise CheckpointError(f"config dtype {name!r} unsupported; allowed: float32, bfloat16, float16")
        return DTYPES[name]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: auto, float32, bfloat16, float16")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def architecture_of(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise CheckpointError("config.json has no 'architectures' entry naming the model class")
    return archs[0]


def _init_all(module, input_ids, positions, kv_caches, metadata):
    hidden, caches = module(input_ids, positions, kv_caches, metadata)
    return module.compute_logits(hidden), caches


def dummy_kv_caches(config: Any, dtype: Any, num_blocks: int = 1, block_size: int = 1) -> list:
    shape = (num_blocks, block_size, kv_cache_heads(config), config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]


def abstract_params(model: Any, config: Any, dtype: Any) -> Any:
    """Parameter shapes/dtypes the port expects (no memory allocated)."""
    md, pos = pack_attention_metadata([1], [0], [[0]], block_size=1)
    shape = (1, 1, kv_cache_heads(config), config.head_dim)
    caches = [(jax.ShapeDtypeStruct(shape, dtype),) * 2 for _ in range(config.num_hidden_layers)]

    def init(ids, positions, kv, metadata):
        return model.init(jax.random.PRNGKey(0), ids, positions, kv, metadata, method=_init_all)

    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(init, ids, jnp.asarray(pos), caches, jax.tree.map(jnp.asarray, md))["params"]


def _weight_files(model_path: str) -> list[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed (needs a 'weight_map' object): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [os.path.join(model_path, f) for f in files]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(model_path, "*.bin")) + glob.glob(os.path.join(model_path, "*.pt"))
        hint = " (found PyTorch .bin/.pt files; convert them to safetensors — pickle is never loaded)" if bins else ""
        raise CheckpointError(f"no *.safetensors weights in {model_path!r}{hint}")
    return files


def _default_place(_path: ParamPath, array: np.ndarray | jax.Array) -> jax.Array:
    return jax.device_put(array)


def load_model(
    model_path: str,
    *,
    dtype: Any = "auto",
    load_format: str = "auto",
    attention_backend: str = "reference",
    seed: int = 0,
    place: PlaceFn | None = None,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Builds the port named by ``config.json`` and loads (or, for ``"dummy"``, draws) its weights.

    ``place(path, array)`` puts one parameter on the device(s). ``mesh``: split the model over the
    mesh's ``tp`` axis as the family's ``hf_sharding_table`` says; a model whose heads do not divide
    over it is refused here, with the reason. Errors name the tensor and what was expected.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; allowed: {', '.join(LOAD_FORMATS)}")
    gguf = None
    if load_format == "gguf" or is_gguf_path(model_path):
        if not is_gguf_path(model_path):
            raise CheckpointError(f"load_format='gguf' needs a .gguf file as the model, got {model_path!r}")
        if load_format == "safetensors":
            raise CheckpointError(f"load_format='safetensors' cannot read the GGUF file {model_path!r}; "
                                  "use 'auto' or 'gguf'")
        gguf = GGUFFile(model_path)
        hf_config = hf_config_from_gguf(gguf)
        if dtype in (None, "auto"):  # a GGUF file has no one dtype: the engine's default for the device
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    else:
        hf_config = read_hf_config(model_path)
    arch = architecture_of(hf_config)
    model_cls = get_model_class(arch)
    config = model_cls.config_class.from_hf_config(hf_config)
    jdtype = resolve_dtype(dtype, hf_config)
    tp = tensor_parallel.tp_size(mesh)
    if tp > 1:
        config = dataclasses.replace(config, tensor_parallel_size=tp)
        check_tensor_parallel(config)
    model = model_cls(config=config, dtype=jdtype)
    held = flax.traverse_util.flatten_dict(abstract_params(model, config, jdtype))
    plan = None
    canonical = held  # the shapes the checkpoint stores
    if tp > 1:
        plan = ShardingPlan(model_cls.hf_sharding_table, config, {p: s.shape for p, s in held.items()})
        # Packed projections are held re-laid out (wider, when KV heads are copied per device).
        canonical = {p: jax.ShapeDtypeStruct(plan[p].canonical_shape(s.shape), s.dtype) for p, s in held.items()}
        if plan.replicated_vocab:
            logger.info("vocabulary of %d does not split over %d devices: %s kept whole on every device",
                        config.vocab_size, tp, ", ".join(plan.replicated_vocab))
        place = place or tensor_parallel.host_array_placer(mesh, plan)
    place = place or _default_place
    if load_format == "dummy":
        flat = _dummy_params(canonical, seed, place, mesh, plan)
    else:
        tensors = hf_tensors(gguf, hf_config) if gguf is not None else _safetensors_tensors(model_path)
        flat = _place_tensors(tensors, model_path, model_cls, config, canonical, jdtype, place, plan)
    params = flax.traverse_util.unflatten_dict(flat)
    return LoadedModel(model, params, config, hf_config, arch, jdtype, model_path, attention_backend, mesh)


def _safetensors_tensors(model_path: str):
    """(name, array, file name) for every tensor of the checkpoint's safetensors files."""
    for path in _weight_files(model_path):
        f = SafetensorsFile(path)
        try:
            for name in f.keys():
                yield name, f.get(name), os.path.basename(path)
        finally:
            f.close()


def _place_tensors(tensors, model_path, model_cls, config, expected, jdtype, place,
                   plan: ShardingPlan | None) -> dict:
    flat: dict[ParamPath, jax.Array] = {}
    np_dtype = np.dtype(jdtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, array, *where in tensors:
        source = where[0] if where else os.path.basename(model_path)
        mapped = map_hf_name(model_cls.hf_weight_table, name, array, config)
        if mapped is None:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {source}: no {model_cls.__name__} "
                f"parameter corresponds to it"
            )
        for pp, arr in mapped:
            if pp not in expected:
                if tied and pp[0] == "lm_head":
                    continue  # a tied checkpoint may still store the (identical) head
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {source} (maps to "
                    f"{'/'.join(pp)}, which {model_cls.__name__} does not have)"
                )
            want = expected[pp].shape
            if tuple(arr.shape) != tuple(want):
                raise CheckpointError(
                    f"shape mismatch for tensor {name!r}: checkpoint has {tuple(arr.shape)}, the "
                    f"config implies {tuple(want)} for {'/'.join(pp)}"
                )
            arr = np.asarray(arr).astype(np_dtype, copy=False)
            flat[pp] = place(pp, arr if plan is None else plan[pp].relayout(arr))
    missing = [("/".join(p)) for p in expected if p not in flat]
    if missing:
        raise CheckpointError(
            f"checkpoint {model_path!r} is missing {len(missing)} tensor(s) the model needs, e.g. "
            f"{', '.join(missing[:5])}"
        )
    return flat


def _dummy_params(expected: dict, seed: int, place: PlaceFn, mesh: Mesh | None, plan: ShardingPlan | None) -> dict:
    flat = {}
    key = jax.random.PRNGKey(seed)
    for i, (pp, sds) in enumerate(sorted(expected.items())):
        leaf = pp[-1]
        if leaf in ("weight", "scale") and len(sds.shape) == 1:
            kind = "ones"
        elif leaf == "bias":
            kind = "zeros"
        else:
            kind = "normal"
        if plan is not None:
            flat[pp] = tensor_parallel.dummy_param(mesh, plan, pp, kind, jax.random.fold_in(key, i), sds.shape, sds.dtype)
            continue
        if kind == "ones":
            arr = jnp.ones(sds.shape, sds.dtype)
        elif kind == "zeros":
            arr = jnp.zeros(sds.shape, sds.dtype)
        else:
            arr = _random_normal(jax.random.fold_in(key, i), sds.shape, sds.dtype)
        flat[pp] = place(pp, arr)
    return flat


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
