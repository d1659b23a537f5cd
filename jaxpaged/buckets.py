"""The fixed set of padded step shapes ("buckets") the model runner compiles at start-up.

A step is padded up to the smallest bucket that holds its token count and sequence count, so after
warm-up no request mix triggers a compilation. Token buckets are powers of two from
``min_tokens`` up to ``max_num_batched_tokens``; a bucket's sequence capacity is
``min(num_tokens, max_num_seqs)`` (a step cannot hold more sequences than tokens). Kernel backends
also get decode-only buckets (one token per sequence), which use the decode kernel. The block-table
width is fixed at ``ceil(max_model_len / block_size)``: attention only reads up to each sequence's
length, so a wider table costs almost nothing.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int
    num_seqs: int
    decode_only: bool = False


def geometric_range(lo: int, hi: int, growth: int = 2) -> list[int]:
    """lo, lo * growth, ... below hi, then hi itself."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= growth
    out.append(hi)
    return out


def make_buckets(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    with_decode_buckets: bool,
    min_tokens: int = 16,
    min_mixed_tokens: int | None = None,
    decode_growth: int = 2,
) -> list[Bucket]:
    """All buckets, smallest first.

    On a GPU a step is bound by reading the weights until a few hundred tokens, so a small mixed
    step costs about what a 256-token one does: ``min_mixed_tokens`` and ``decode_growth`` trade
    that padding for fewer programs to compile.
    """
    lo = min(min_mixed_tokens or min_tokens, max_num_batched_tokens)
    buckets = [Bucket(t, min(t, max_num_seqs)) for t in geometric_range(lo, max_num_batched_tokens)]
    if with_decode_buckets:
        top = min(max_num_seqs, max_num_batched_tokens)
        buckets += [Bucket(s, s, True) for s in geometric_range(min(min_tokens, top), top, decode_growth)]
    return sorted(set(buckets))


def pick_bucket(buckets: list[Bucket], num_tokens: int, num_seqs: int, decode_only: bool) -> Bucket:
    """The smallest bucket that fits (decode-only buckets only for decode-only steps)."""
    best = None
    for b in buckets:
        if b.num_tokens < num_tokens or b.num_seqs < num_seqs or (b.decode_only and not decode_only):
            continue
        key = (b.num_tokens, not b.decode_only)  # prefer the decode bucket at equal size
        if best is None or key < (best.num_tokens, not best.decode_only):
            best = b
    if best is None:
        raise ValueError(f"no bucket holds {num_tokens} tokens / {num_seqs} sequences; buckets: {buckets}")
    return best
