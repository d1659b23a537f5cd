"""The Pallas kernels lower to Triton for an H100/H200 (sm_90) on a machine without a GPU: the
Triton lowering runs in Python, so a kernel that cannot lower (an fp8 tile filled with an int32
splat was one) fails here, in CI, rather than only on the GPU. Compiling the lowered module (PTX)
still needs the device: the ``gpu`` tests do that."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.attention_router import ragged_paged_attention
from pallas_kernels.kv_cache_write import write_kv

TRITON_CALL = "__gpu$xla.gpu.triton"
CACHE_DTYPES = (jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2)


@pytest.fixture(autouse=True)
def _pretend_sm90(monkeypatch):
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    monkeypatch.setattr(gpu_info, "get_gpu_info",
                        lambda: gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90))


def _lower_for_cuda(f, *shapes) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*shapes)
    text = exp.mlir_module()
    assert TRITON_CALL in text  # the kernel, not a fallback, was lowered
    return text


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "ragged"])
def test_attention_kernels_lower_for_sm90(cache_dtype, decode_only):
    num_seqs, num_tokens = 8, (8 if decode_only else 256)
    cache = sds((128, 16, 8, 128), cache_dtype)
    args = (sds((num_tokens, 32, 128), jnp.bfloat16), cache, cache, sds((num_tokens,), jnp.int32),
            sds((num_seqs + 1,), jnp.int32), sds((num_seqs,), jnp.int32), sds((num_seqs, 64), jnp.int32))
    _lower_for_cuda(lambda *a: ragged_paged_attention(*a, scale=0.125, backend="pallas", decode_only=decode_only),
                    *args)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda t: jnp.dtype(t).name)
def test_kv_write_kernel_lowers_for_sm90(cache_dtype):
    cache = sds((128, 16, 8, 128), cache_dtype)
    kv = sds((64, 8, 128), jnp.bfloat16)
    _lower_for_cuda(lambda kc, vc, k, v, s: write_kv(kc, vc, k, v, s, backend="pallas"),
                    cache, cache, kv, kv, sds((64,), jnp.int32))
