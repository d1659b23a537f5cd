"""Independent plain-NumPy (float64, whole sequence, no cache) forward passes of remote-code
architectures that have no HF-native twin, written from their published modeling code; used as
the reference for the ports' parity tests."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def causal_attention(q, k, v, scale, bias=None):
    """q [T, H, D], k/v [T, H, D] (already one KV head per query head); bias [H, T, T] or None."""
    T = q.shape[0]
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    if bias is not None:
        s = s + bias
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v).reshape(T, -1)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def chatglm_logits(w: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """ChatGLM2/3 (modeling_chatglm.py) forward: logits [T, vocab]."""
    T = len(ids)
    nh, hn = cfg["num_attention_heads"], cfg["kv_channels"]
    ng = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else nh
    eps = cfg["layernorm_epsilon"]
    rot = hn // 2  # RotaryEmbedding(rotary_dim // 2): half of each head is rotated
    base = 10000.0 * cfg.get("rope_ratio", 1.0)
    theta = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    ang = np.outer(np.arange(T), theta)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(t):
        x, rest = t[..., :rot], t[..., rot:]
        x = x.reshape(T, t.shape[1], rot // 2, 2)
        out = np.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin], -1)
        return np.concatenate([out.reshape(T, t.shape[1], rot), rest], -1)

    def norm(x, name):
        if cfg["rmsnorm"]:
            return rms_norm(x, w[name + ".weight"], eps)
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps)

    x = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        ln = norm(x, p + "input_layernorm")
        qkv = linear(ln, w[p + "self_attention.query_key_value.weight"], w.get(p + "self_attention.query_key_value.bias"))
        q = qkv[:, : nh * hn].reshape(T, nh, hn)
        k = qkv[:, nh * hn : (nh + ng) * hn].reshape(T, ng, hn)
        v = qkv[:, (nh + ng) * hn :].reshape(T, ng, hn)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // ng, axis=1), np.repeat(v, nh // ng, axis=1)
        attn = linear(causal_attention(q, k, v, 1 / math.sqrt(hn)), w[p + "self_attention.dense.weight"],
                      w.get(p + "self_attention.dense.bias"))
        h = (ln if cfg["apply_residual_connection_post_layernorm"] else x) + attn
        ln2 = norm(h, p + "post_attention_layernorm")
        up = linear(ln2, w[p + "mlp.dense_h_to_4h.weight"], w.get(p + "mlp.dense_h_to_4h.bias"))
        a, b = np.split(up, 2, axis=-1)
        mlp = linear(silu(a) * b, w[p + "mlp.dense_4h_to_h.weight"], w.get(p + "mlp.dense_4h_to_h.bias"))
        x = (ln2 if cfg["apply_residual_connection_post_layernorm"] else h) + mlp
    if cfg["post_layer_norm"]:
        x = norm(x, "transformer.encoder.final_layernorm")
    return x @ w["transformer.output_layer.weight"].T


def baichuan_alibi_slopes(n: int) -> list[float]:
    """Baichuan-13B's ``_get_interleave``."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + baichuan_alibi_slopes(2 * closest)[0::2][: n - closest]


def baichuan_13b_logits(w: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """Baichuan-13B / Baichuan2-13B (ALiBi) forward: logits [T, vocab]."""
    T = len(ids)
    nh = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    slopes = np.asarray(baichuan_alibi_slopes(nh))
    alibi = slopes[:, None, None] * np.arange(T)[None, None, :]  # slope * key position
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (t.reshape(T, nh, hd) for t in np.split(linear(h, w[p + "self_attn.W_pack.weight"]), 3, axis=-1))
        x = x + linear(causal_attention(q, k, v, 1 / math.sqrt(hd), alibi), w[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = silu(linear(h, w[p + "mlp.gate_proj.weight"])) * linear(h, w[p + "mlp.up_proj.weight"])
        x = x + linear(mlp, w[p + "mlp.down_proj.weight"])
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"]
    if "z_loss_weight" in cfg:  # Baichuan2's NormHead
        head = head / np.linalg.norm(head, axis=1, keepdims=True)
    return x @ head.T


def greedy(logits_fn: Callable[[list[int]], np.ndarray], prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation by recomputing the whole sequence each step; returns (tokens, prompt logits)."""
    prompt_logits = logits_fn(prompt)
    seq = list(prompt) + [int(np.argmax(prompt_logits[-1]))]
    while len(seq) - len(prompt) < n:
        seq.append(int(np.argmax(logits_fn(seq)[-1])))
    return seq[len(prompt):], prompt_logits
