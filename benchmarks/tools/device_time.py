"""Device time of attention calls, kernel by kernel, read by Nsight Compute.

At batch 1 a decode call lasts 10-30 us and wall-clock timing of it (kernels.py) moves by tens of
percent between repeats; a mixed step launches a dozen kernels whose shares wall-clock timing
cannot tell apart. This script runs each configuration a few times under
``ncu --metrics gpu__time_duration.sum`` (profiling switched on only around the timed calls) and
sums, per call, the device time of every kernel it launched: the attention kernel plus the XLA
fusions around it (split merge, layout). A kernel no other op launches (``cos`` on a marker array)
separates the calls in ncu's log.

Run on the GPU machine:
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        --log-file $OUT/ncu.csv python3 benchmarks/tools/device_time.py --sets decode,mixed --plan $OUT/plan.json
    python3 benchmarks/tools/device_time.py --parse $OUT/ncu.csv --plan $OUT/plan.json

ncu flushes the caches before each kernel (its default): the figures are cold-L2 device times,
for our kernels and JAX's alike.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

MARK = "cos"
REPEATS = 5


def decode_configs(splits_sweep: bool):
    """(name, kind, shape, variant): variant None = JAX's own kernel."""
    out = []
    for S, hq, hkv in ((1, 32, 8), (1, 32, 32), (8, 32, 8), (8, 32, 32), (64, 32, 8), (64, 32, 32)):
        for ctx in (512, 2048, 8192):
            shape = dict(batch=S, ctx=ctx, hq=hq, hkv=hkv)
            out.append((f"jax b{S} {ctx} {hq}:{hkv}", "decode", shape, None))
            out.append((f"ours b{S} {ctx} {hq}:{hkv}", "decode", shape, {}))
            if splits_sweep and S <= 8:
                for splits in (4, 8, 16, 32, 64):
                    out.append((f"ours[splits={splits}] b{S} {ctx} {hq}:{hkv}", "decode", shape, {"num_splits": splits}))
    return out


def mixed_configs():
    out = []
    for T in (2048, 4096):
        for hq, hkv in ((32, 32), (32, 8)):
            shape = dict(batch=256, ctx=512, tokens=T, hq=hq, hkv=hkv)
            for path in ("ragged", "split", "mosaic", "mosaic_prefill_only"):
                out.append((f"mixed {T} {hq}:{hkv} {path}", "mixed", shape, path))
    return out


def build(kind: str, shape: dict, variant):
    """(jitted fn, list of argument tuples, bytes moved or None) for one configuration."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks.kernels import make_decode_inputs, make_mixed_inputs  # noqa: PLC0415
    from pallas_kernels import attention_router  # noqa: PLC0415
    from pallas_kernels.attention_router import ragged_paged_attention  # noqa: PLC0415
    from pallas_kernels.paged_attention_decode import paged_attention_decode  # noqa: PLC0415
    from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic  # noqa: PLC0415

    d, bs = 128, 16
    if kind == "decode":
        S, ctx, hq, hkv = shape["batch"], shape["ctx"], shape["hq"], shape["hkv"]
        q, kc, vc, sl, tables, kv_bytes = make_decode_inputs(jax.random.key(S + ctx), S, ctx, hq, hkv, d, bs)
        if variant is None:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa  # noqa: PLC0415

            kt, vt = jnp.transpose(kc, (2, 0, 1, 3)), jnp.transpose(vc, (2, 0, 1, 3))
            fn = jax.jit(lambda q, kt, vt, sl, bt: jax_pa.paged_attention(q, kt, vt, bt, sl))
            return fn, [(q, kt, vt, sl, bt) for bt in tables], kv_bytes + 2 * q.nbytes
        fn = jax.jit(lambda q, kc, vc, sl, bt, v=variant: paged_attention_decode(q, kc, vc, sl, bt, scale=d**-0.5, **v))
        return fn, [(q, kc, vc, sl, bt) for bt in tables], kv_bytes + 2 * q.nbytes
    x = make_mixed_inputs(shape["batch"], shape["ctx"], shape["tokens"], shape["hq"], shape["hkv"], d, bs)
    if variant == "mosaic_prefill_only":  # the Mosaic kernel alone on the step, decode rows given no keys
        q, kc, vc, _, qsl, sl, bt = x
        single = (qsl[1:] - qsl[:-1]) == 1
        fn = jax.jit(lambda q, kc, vc, qsl, sl, bt: ragged_paged_attention_mosaic(q, kc, vc, qsl, sl, bt, scale=d**-0.5)[0])
        return fn, [(q, kc, vc, qsl, jnp.where(single, 0, sl), bt)], None
    if variant == "mosaic":
        attention_router.MOSAIC_MIN_TOKENS = 0  # this process only: time the Mosaic route at every size
        return jax.jit(lambda *a: ragged_paged_attention(*a, scale=d**-0.5, backend="mosaic")), [x], None
    split = variant == "split"
    return jax.jit(lambda *a: ragged_paged_attention(*a, scale=d**-0.5, backend="pallas", split_decode_rows=split)), [x], None


def run(plan_path: str, sets: list[str], splits_sweep: bool, match: str | None) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    cuda = ctypes.CDLL("libcuda.so.1")
    marker = jax.jit(lambda x: jnp.cos(x))
    mx = jnp.ones((4096,), jnp.float32)
    cfgs = (decode_configs(splits_sweep) if "decode" in sets else []) + (mixed_configs() if "mixed" in sets else [])
    cfgs = [c for c in cfgs if match is None or match in c[0]]
    plan = []
    for name, kind, shape, variant in cfgs:
        fn, args, moved = build(kind, shape, variant)
        for a in args[:2]:
            jax.block_until_ready(fn(*a))
        jax.block_until_ready(marker(mx))
        cuda.cuProfilerStart()
        for i in range(REPEATS):
            jax.block_until_ready(marker(mx))
            jax.block_until_ready(fn(*args[i % len(args)]))
        jax.block_until_ready(marker(mx))
        cuda.cuProfilerStop()
        plan.append(dict(name=name, kind=kind, **shape, bytes=moved))
        Path(plan_path).write_text(json.dumps(plan))  # each config as it ends: a cut-off run still parses
        print(name, flush=True)
        del fn, args


def parse(csv_path: str, plan_path: str) -> list[dict]:
    plan = json.loads(Path(plan_path).read_text())
    lines = Path(csv_path).read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{csv_path}: no kernel rows (ncu writes them when the profiled process ends)")
    rows = list(csv.DictReader(lines[start:]))
    kernels = []  # (id, name, ns)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        ns *= {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit, 1)
        kernels.append((int(r["ID"]), r["Kernel Name"], ns))
    kernels.sort()
    calls, cur = [], None
    for _, name, ns in kernels:
        if MARK in name.lower():
            if cur is not None:
                calls.append(cur)
            cur = []
        elif cur is not None:
            cur.append((name, ns))
    # Per config: REPEATS calls between markers, plus an empty segment before the next config's first marker.
    calls = [c for c in calls if c]
    out = []
    for i, p in enumerate(plan):
        mine = calls[i * REPEATS:(i + 1) * REPEATS]
        if len(mine) < REPEATS:
            break
        totals = [sum(ns for _, ns in c) for c in mine]
        med = statistics.median(totals)
        p.update(device_us=med / 1e3, spread_us=[min(totals) / 1e3, max(totals) / 1e3],
                 kernels=[(n[:60], round(ns / 1e3, 2)) for n, ns in mine[len(mine) // 2]])
        if p.get("bytes"):
            p["TBps"] = p["bytes"] / (med * 1e-9) / 1e12
        out.append(p)
        print(f"{p['name']:42s} {p['device_us']:8.2f} us  {p.get('TBps', 0):5.2f} TB/s  "
              + " + ".join(f"{n[:28]} {t}" for n, t in p["kernels"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--parse", help="ncu CSV log to read (instead of running)")
    ap.add_argument("--sets", default="decode,mixed", help="comma list: decode, mixed")
    ap.add_argument("--match", help="only the configurations whose name holds this text")
    ap.add_argument("--splits-sweep", action="store_true", help="decode at batch 1: also fixed split counts")
    ap.add_argument("--json", help="with --parse: write the per-config results here")
    a = ap.parse_args()
    if a.parse:
        res = parse(a.parse, a.plan)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    else:
        run(a.plan, a.sets.split(","), a.splits_sweep, a.match)


if __name__ == "__main__":
    main()
