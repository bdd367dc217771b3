"""The figure tables of README.md and bench/README.md are the output of bench/run.py on the JSONs
committed beside them: every TABLES entry is in exactly one of the two files."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402

DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in bench_run.DOCS}


def blocks(text: str) -> dict[str, str]:
    out = {}
    for name in bench_run.TABLES:
        a, b = f"<!-- {name} -->\n", f"<!-- /{name} -->"
        if a in text:
            assert text.count(a) == 1 and text.count(b) == 1, f"{name}: one block per file"
            out[name] = text[text.index(a) + len(a):text.index(b)]
    return out


def home(name: str) -> str:
    """The one file that holds the block `name`."""
    return next(doc for doc, text in DOCS.items() if name in blocks(text))


def test_the_two_files_are_the_docs():
    assert set(DOCS) == {"README.md", "bench/README.md"}


def test_every_table_is_in_exactly_one_file_and_parses():
    found = {doc: blocks(text) for doc, text in DOCS.items()}
    for name in bench_run.TABLES:
        holders = [doc for doc in found if name in found[doc]]
        assert len(holders) == 1, f"{name}: in {holders or 'neither file'}"
    assert "which-table" in found["README.md"]
    for doc, tables in found.items():
        for name, table in tables.items():
            rows = [r for r in table.strip().split("\n")]
            assert len(rows) >= 3, (doc, name)
            assert set(rows[1].replace("|", "")) == {"-"}, (doc, name)            # the header rule
            widths = {r.count("|") for r in rows}
            assert len(widths) == 1, f"{doc} {name}: rows with different numbers of cells"


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_tables_match_the_jsons(doc):
    assert bench_run.tables(DOCS[doc]) == DOCS[doc], "run: python bench/run.py --tables"


def test_a_changed_figure_changes_the_tables(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", res)
    p = res / "harness_nse_smollm2_n200.json"
    d = json.loads(p.read_text())
    assert d["results"]["nse"]["Efficacy"]["value"] != 12.25
    d["results"]["nse"]["Efficacy"]["value"] = 12.25
    p.write_text(json.dumps(d))
    for doc, name in ((home("cross-table"), "cross-table"), (home("which-table"), "which-table")):
        new = bench_run.tables(DOCS[doc], res)
        assert new != DOCS[doc]
        assert "12.2" in blocks(new)[name] and "12.2" not in blocks(DOCS[doc])[name], name
    assert "| 12.2 |" in blocks(bench_run.tables(DOCS[home("cross-table")], res))["cross-table"]


def test_write_tables_rewrites_each_file_only_within_its_blocks(tmp_path, capsys):
    docs = []
    for doc, text in DOCS.items():
        p = tmp_path / doc.replace("/", "_")
        stale = text
        for name, table in blocks(text).items():               # every block emptied: a stale file
            stale = stale.replace(table, "stale\n")
        p.write_text(stale)
        docs.append(p)
    bench_run.write_tables(docs)
    for p, text in zip(docs, DOCS.values()):
        assert p.read_text() == text
    assert "in neither file" not in capsys.readouterr().out


@pytest.mark.parametrize("name", list(bench_run.TABLES))
def test_each_table_reads_only_committed_results(name):
    made = bench_run.TABLES[name](ROOT / "bench" / "results")
    assert made.strip() == blocks(DOCS[home(name)])[name].strip()


def test_memit_figures_are_labelled_memit_seq():
    """Every multi-batch MEMIT figure committed before MEMIT-as-published existed used the earlier
    batches' keys: its JSON is memit-seq's, and the tables say so."""
    cross = {row[0]: row for row in bench_run.CROSS}
    assert "memit-seq" in cross and not any(js.startswith("cross/memit_") for row in bench_run.CROSS for js in row[4:])
    for js in cross["memit-seq"][4:]:
        d = json.loads((ROOT / "bench" / "results" / js).read_text())
        assert d["args"]["settings"]["method"] == "memit-seq" and "memit-seq" in d["results"]
    long = json.loads((ROOT / "bench" / "results" / "long_memit-seq_n1000.json").read_text())
    assert long["method"] == long["settings_used"]["method"] == "memit-seq"
    assert "| memit-seq | 1000 |" in bench_run.long_table()
    assert "| memit-seq |" in bench_run.which_table().split("\n")[0]
    assert not (ROOT / "bench" / "results" / "long_memit_n1000.json").exists()
