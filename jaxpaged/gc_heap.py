"""Python's cyclic garbage collector kept off the long-lived heap while the engine steps.

A process that has loaded JAX, a model and a tokenizer holds millions of long-lived objects, and
CPython's oldest-generation collection walks all of them: a pause of a few hundred milliseconds,
every few hundred steps, in a host loop whose steps last 10-30 ms (and with async scheduling the
device waits for the host through the pause). ``gc.freeze()`` moves every object that exists into
a permanent generation the collector does not scan; what is allocated afterwards is collected as
before. Figures: benchmarks/RESULTS.md, "Host cost of a served step".

Decisions:
  - The processes jaxpaged owns (the engine process, the HTTP server's) freeze once, after
    start-up, for good, as vLLM's engine core and API server do (``freeze_gc_heap``).
  - In a caller's process (``LLM.generate`` in a notebook) the heap is frozen only while a
    ``generate`` runs and unfrozen after (``frozen_gc_heap``): frozen objects are never collected,
    so a permanent freeze there would leak whatever reference cycles the caller drops later
    (an ``LLM`` deleted in a notebook, with its device arrays). Freezing and unfreezing move
    lists, not objects: O(1). If the caller has frozen objects of its own, it is left alone.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_gc_heap() -> None:
    """Collects what is garbage now, then exempts everything left from later collections."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_gc_heap() -> Iterator[None]:
    """The heap that exists on entry is exempt from collection until exit (not collected first:
    its garbage waits until exit). A no-op when something is frozen already."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
