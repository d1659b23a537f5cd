"""Which recorded result file holds each benchmark's current figures: the files that
``benchmarks/RESULTS.md`` cites, section by section. The notebooks plot these, so a figure and the
table beside its command always come from the same run."""

from __future__ import annotations

import json
import os
import re
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_DIR = os.path.join(HERE, "results")


def cited_results(results_md: str = RESULTS_MD) -> dict[str, list[str]]:
    """``{section: [path, ...]}``: for every ``## `` section of RESULTS.md, the ``results/*.json``
    and ``results/*.jsonl`` files it names, in order of first mention. A section's name is its
    heading without the command in parentheses (``"Decode attention"``, ``"Offline throughput"``, ...).

    Raises FileNotFoundError naming a cited file that is not on disk.
    """
    sections: dict[str, list[str]] = {}
    current = None
    with open(results_md) as fh:
        for line in fh:
            if line.startswith("## "):
                current = line[3:].split(" (")[0].strip()
                sections[current] = []
            elif current is not None:
                for name in re.findall(r"results/([\w.-]+\.jsonl?)(?!\w)", line):
                    path = os.path.join(os.path.dirname(results_md), "results", name)
                    if not os.path.exists(path):
                        raise FileNotFoundError(f"RESULTS.md section {current!r} cites {name}, which is not in results/")
                    if path not in sections[current]:
                        sections[current].append(path)
    return {name: paths for name, paths in sections.items() if paths}


def load(path: str) -> Any:
    """A result file's content; for ``.jsonl`` (one run a line, as ``served_vs_offline.sh``
    collects its rate runs), the list of its lines' objects."""
    with open(path) as fh:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in fh if line.strip()]
        return json.load(fh)


def rows(path: str, kind: str) -> list[dict]:
    """The result rows of one kind (``"decode"``, ``"prefill"``, ``"mixed"``, ``"kv_write"``) of a
    ``kernels.py`` / ``tools/device_time.py`` file."""
    data = load(path)
    found = data["results"] if isinstance(data, dict) else data
    return [r for r in found if r.get("kind") == kind]
