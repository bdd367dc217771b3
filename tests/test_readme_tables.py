"""The README's figure tables are the output of bench/run.py on the JSONs committed beside them."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402

README = (ROOT / "README.md").read_text()


def blocks(text: str) -> dict[str, str]:
    out = {}
    for name in bench_run.TABLES:
        a, b = f"<!-- {name} -->\n", f"<!-- /{name} -->"
        if a in text:
            out[name] = text[text.index(a) + len(a):text.index(b)]
    return out


def test_every_table_is_in_the_readme_and_parses():
    found = blocks(README)
    assert set(found) == set(bench_run.TABLES)
    for name, table in found.items():
        rows = [r for r in table.strip().split("\n")]
        assert len(rows) >= 3, name
        assert set(rows[1].replace("|", "")) == {"-"}, name            # the header rule
        widths = {r.count("|") for r in rows}
        assert len(widths) == 1, f"{name}: rows with different numbers of cells"


def test_readme_tables_match_the_jsons():
    assert bench_run.tables(README) == README, "run: python bench/run.py --tables"


def test_a_changed_figure_changes_the_readme(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", res)
    p = res / "harness_nse_smollm2_n200.json"
    d = json.loads(p.read_text())
    assert d["results"]["nse"]["Efficacy"]["value"] != 12.25
    d["results"]["nse"]["Efficacy"]["value"] = 12.25
    p.write_text(json.dumps(d))
    new = bench_run.tables(README, res)
    assert new != README
    assert "| 12.2 |" in blocks(new)["cross-table"] and "| 12.2 |" not in blocks(README)["cross-table"]


@pytest.mark.parametrize("name", list(bench_run.TABLES))
def test_each_table_reads_only_committed_results(name):
    made = bench_run.TABLES[name](ROOT / "bench" / "results")
    assert made.strip() == blocks(README)[name].strip()
