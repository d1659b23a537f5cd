"""Each GGML type jaxpaged dequantises matches the ``gguf`` package's reference, bit for bit, on
random blocks (every bit pattern of the quantised fields, finite scales), and on values quantised
by ``gguf``'s own quantisers where the package has one."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference_dequantize  # noqa: E402
from gguf.quants import quantize as reference_quantize  # noqa: E402

from jaxpaged.gguf_quants import DEQUANTIZERS, SUPPORTED_TYPES, dequantize  # noqa: E402

# byte ranges of each block's float16 scale fields (random bytes there could be NaN or inf)
F16_FIELDS = {"Q4_0": [(0, 2)], "Q4_1": [(0, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 4)], "Q8_0": [(0, 2)],
              "Q2_K": [(80, 84)], "Q3_K": [(108, 110)], "Q4_K": [(0, 4)], "Q5_K": [(0, 4)], "Q6_K": [(208, 210)]}
QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf has a quantiser for these


def _random_blocks(name: str, num_blocks: int, rng) -> np.ndarray:
    _, block_bytes, _ = DEQUANTIZERS[name]
    raw = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    for a, b in F16_FIELDS[name]:
        raw[:, a:b] = (rng.standard_normal((num_blocks, (b - a) // 2)) * 0.1).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_quantized_types_match_gguf_reference(name):
    rng = np.random.default_rng(sorted(F16_FIELDS).index(name))
    block_values = DEQUANTIZERS[name][0]
    raw = _random_blocks(name, 48, rng)
    ours = dequantize(raw, name, 48 * block_values)
    ref = reference_dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[name]).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (48 * block_values,)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types(name):
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    raw = {"F32": x, "F16": x.astype(np.float16),
           "BF16": reference_quantize(x, gguf.GGMLQuantizationType.BF16)}[name]
    ours = dequantize(np.ascontiguousarray(raw).view(np.uint8), name, x.size).reshape(x.shape)
    ref = reference_dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType[name]).reshape(x.shape)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2}[name]
    np.testing.assert_allclose(ours, x, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_round_trip_through_gguf_quantizer(name):
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    q = reference_quantize(x, gguf.GGMLQuantizationType[name])
    ours = dequantize(q, name, x.size).reshape(x.shape)
    np.testing.assert_array_equal(ours, reference_dequantize(q, gguf.GGMLQuantizationType[name]).astype(np.float32))
    # the quantisation error is what the format allows (4 bits: ~1/8 of the block's range)
    bound = {"BF16": 0.01, "Q8_0": 0.02, "Q5_0": 0.15, "Q5_1": 0.15, "Q4_0": 0.3, "Q4_1": 0.3}[name]
    assert np.abs(ours - x).max() < bound


def test_every_supported_type_is_tested():
    assert set(SUPPORTED_TYPES) == set(F16_FIELDS) | {"F32", "F16", "BF16"}


def test_unsupported_type_and_bad_size_are_refused_by_name():
    with pytest.raises(ValueError, match="IQ2_XXS is not supported; supported: F32"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", 256)
    with pytest.raises(ValueError, match="Q8_0 tensor of 64 values needs 68 bytes"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", 64)
