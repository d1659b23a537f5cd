"""``benchmarks/results_index.py``: which result files RESULTS.md cites, section by section (the
notebooks plot from them), and that every cited file is on disk."""

from __future__ import annotations

import json

import pytest

from benchmarks.results_index import RESULTS_MD, cited_results, load


def write_results(tmp_path, text: str, files: dict[str, str]):
    (tmp_path / "results").mkdir()
    for name, content in files.items():
        (tmp_path / "results" / name).write_text(content)
    md = tmp_path / "RESULTS.md"
    md.write_text(text)
    return str(md)


def test_json_and_jsonl_citations_are_found_whole(tmp_path):
    md = write_results(tmp_path, (
        "## Online serving (`python benchmarks/serve.py`)\n"
        "(`results/serve_a.json`, `results/serve_rates_a.jsonl`). Again: results/serve_a.json.\n"
        "## Decode attention\nsee results/kernels_a.json, and nothing else\n"
        "## Notes\nno files here\n"),
        {"serve_a.json": json.dumps({"output_throughput": 6270.0}),
         "serve_rates_a.jsonl": '{"request_rate": 4}\n\n{"request_rate": 8}\n',
         "kernels_a.json": json.dumps([{"kind": "decode"}])})
    cited = cited_results(md)
    assert {k: [p.rsplit("/", 1)[1] for p in v] for k, v in cited.items()} == {
        "Online serving": ["serve_a.json", "serve_rates_a.jsonl"], "Decode attention": ["kernels_a.json"]}
    assert load(cited["Online serving"][0]) == {"output_throughput": 6270.0}
    assert load(cited["Online serving"][1]) == [{"request_rate": 4}, {"request_rate": 8}]


def test_a_missing_cited_file_names_the_section_and_the_file(tmp_path):
    md = write_results(tmp_path, "## Online serving\n`results/serve_rates_b.jsonl`\n",
                       {"serve_rates_b.json": "{}"})  # the .json exists, the cited .jsonl does not
    with pytest.raises(FileNotFoundError, match="'Online serving' cites serve_rates_b.jsonl"):
        cited_results(md)


def test_every_file_the_repository_results_cite_is_on_disk_and_loads():
    cited = cited_results(RESULTS_MD)
    assert "Online serving" in cited and "Decode attention" in cited
    for paths in cited.values():
        for path in paths:
            assert load(path) is not None
