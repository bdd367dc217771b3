"""
bench/run.py: one entry point for the benchmarks behind the tables of README.md and bench/README.md.

    python bench/run.py --suite quick     # minutes: every method on a few edits, its own small table
    python bench/run.py --suite full      # the real protocols (hours, resumable), then the tables
    python bench/run.py --tables          # rewrite both files' tables from the JSONs in bench/results

`quick` is what a contributor runs before a pull request: SmolLM2-135M-Instruct (converted from
../shared on first use), 8 ZsRE edits for SCEN and FT (chat template), 10 CounterFact edits in one
batch for NSE, MEMIT and AlphaEdit (C0 from 20k WikiText-2 tokens; with one batch there are no
earlier keys, so MEMIT and memit-seq make the same edit), each through its CLI with
--out, then bench/results/quick/quick.json and quick.md. Which figures are exact: every accuracy
figure is a function of the code, the data and the CPU's float kernels (one thread), so a rerun on
unchanged code on the same machine gives the same digits; seconds vary with the machine's load.

`full` runs, for each table, the commands of its protocol whose JSON is missing (each resumes
where it stopped; --force reruns), then rewrites every table from the JSONs. A table is the text
between `<!-- name -->` and `<!-- /name -->` in one of DOCS (README.md keeps the "which method"
table, bench/README.md every other); tests/test_readme_tables.py checks that each TABLES entry
is in exactly one of them and equals what `tables()` makes of the JSONs beside it.

Method names: `memit` is MEMIT as published (no earlier keys in the solve), `memit-seq` adds the
earlier batches' keys Cp (the AlphaEdit repository's memit_seq). Every multi-batch MEMIT figure
committed before that split ran memit-seq, and its JSON is named and labelled so.
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared"
DOCS = (ROOT / "README.md", ROOT / "bench" / "README.md")     # the files whose tables TABLES makes
sys.path.insert(0, str(ROOT / "bench"))
PY = sys.executable


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# The cross table: every method on both tasks, 200 sequential edits each

ZSRE_CMD = ("--ckpt {sft}/sft --edits {sft}/d_edit.jsonl --loc {sft}/d_loc.jsonl --n 200 --template chatml "
            "--system '' --threads 1")
CF_CMD = "--ckpt {smol} --edits {shared}/data/counterfact/counterfact-edit.json --n 200 --threads 1 --no-fluency"
CF_UNREL = "--unrelated {shared}/data/counterfact/counterfact-train.json --n-unrelated 900"
C0_TEXT = "--stats-text {shared}/data/wikitext/wikitext-2-raw-test.txt"  # nse.py: C0 as in NSE's 200-edit run
# (row label, script, method flags, protocol note, ZsRE JSON, CounterFact JSON); a JSON absent = not run
CROSS = [
    ("SCEN (rank-4 experts)", "scen.py", "--unrelated {u900}", "batch 1; routed (experts + neurons)",
     "harness_scen_smollm2_n200_lowrank4.json", "cross/scen_counterfact.json"),
    ("SCEN (full experts)", "scen.py", "--expert full --unrelated {u900}", "batch 1; routed (experts + neurons)",
     "harness_scen_smollm2_n200.json", "cross/scen_full_counterfact.json"),
    ("FT (down projection)", "scen.py", "--method ft", "batch 1; plain checkpoint",
     "scen_smollm2_ft.json", "cross/ft_counterfact.json"),
    ("NSE", "nse.py", "--method nse --batch-size 20", "batches of 20; plain checkpoint",
     "cross/nse_zsre.json", "harness_nse_smollm2_n200.json"),
    ("memit-seq", "nse.py", "--method memit-seq --batch-size 20", "batches of 20; plain checkpoint",
     "cross/memit-seq_zsre.json", "cross/memit-seq_counterfact.json"),
    ("AlphaEdit", "nse.py", "--method alphaedit --batch-size 20", "batches of 20; plain checkpoint",
     "cross/alphaedit_zsre.json", "cross/alphaedit_counterfact.json"),
]


def harness_figures(res: dict | None) -> tuple[dict, dict]:
    """(unedited, edited) metric -> value of a run's JSON: the CLIs' results.json, or the older
    bench_scen.py ({"unedited": .., "ft": ..}) and bench_nse.py ({"rows": {"memit-seq (ours), after 200": ..}})."""
    if res is None:
        return {}, {}
    val = lambda d: {k: (v["value"] if isinstance(v, dict) else v) for k, v in d.items()}
    if "results" in res:
        r = res["results"]
        return val(r.get("unedited", {})), val(next((v for k, v in r.items() if k != "unedited"), {}))
    if "rows" in res:
        return {}, next(v for k, v in res["rows"].items() if "(ours)" in k)
    return val(res.get("unedited", {})), val(next(res[k] for k in ("ft", "scen") if k in res))


def _pair(d: dict, name: str) -> str:
    if f"{name} (gen)" not in d:
        return "not run"
    return f"{d[f'{name} (gen)']:.1f} / {d[f'{name} (tf)']:.1f}"


def cross_table(results: Path = RESULTS) -> str:
    head = ("| method | ZsRE Reliability | ZsRE Generality | ZsRE Locality | CF Efficacy | CF Generalization "
            "| CF Specificity | Relation specificity (unchanged / own > new) | s/edit (ZsRE; CF) | protocol |")
    lines = [head, "|" + "---|" * 10]
    unedited_qa, unedited_cf, rows = {}, {}, []
    for label, _, _, note, zj, cj in CROSS:
        uz, z = harness_figures(load(results / zj))
        u, c = harness_figures(load(results / cj))
        unedited_qa, unedited_cf = unedited_qa or uz, unedited_cf or u
        rel = c
        if "Relation specificity (own > new)" not in c and label == "NSE":   # measured on that run's folder
            rel = (load(results / "relation_nse_smollm2_n200.json") or {}).get("edited", {})
        cf = [fmt(c.get(k)) or "not run" for k in ("Efficacy", "Generalization", "Specificity")]
        secs = f"{fmt(z.get('s/edit (mean)')) or '-'}; {fmt(c.get('s/edit (mean)', c.get('s_per_edit'))) or '-'}"
        rows.append(f"| {label} | {_pair(z, 'Reliability')} | {_pair(z, 'Generality')} | {_pair(z, 'Locality')} | "
                    + " | ".join(cf) + f" | {_relation(rel)} | {secs} | {note} |")
    u, uz = unedited_cf, unedited_qa
    ur = (load(results / "relation_nse_smollm2_n200.json") or {}).get("unedited", {})
    lines.append(f"| unedited | {_pair(uz, 'Reliability')} | {_pair(uz, 'Generality')} | {_pair(uz, 'Locality')} | "
                 + " | ".join(fmt(u.get(k)) for k in ("Efficacy", "Generalization", "Specificity"))
                 + f" | {_relation(ur)} | | |")
    return "\n".join(lines + rows)


# The "which method when" figures: one column per method, the cross cells and the 1000-edit runs
WHICH = [("SCEN (rank-4 experts)", 0, None), ("NSE", 3, "nse"), ("memit-seq", 4, "memit-seq"),
         ("AlphaEdit", 5, "alphaedit"), ("FT (down projection)", 2, None)]   # (column, CROSS row, long run)


def which_table(results: Path = RESULTS) -> str:
    """Accuracy rows of the README's "Which method when" table, from the same JSONs as the cross
    table and the 1000-edit table; the best figure of a row (mean of its three) in bold."""
    def row(label, cells, scores):
        best = max((x for x in scores if x is not None), default=None)
        cells = [f"**{c}**" if x is not None and x == best and sum(y == best for y in scores) == 1 else c
                 for c, x in zip(cells, scores)]
        return f"| {label} | " + " | ".join(cells) + " |"

    def triple(d, keys, extra=""):
        if not all(k in d for k in keys):
            return "not run", None
        return " / ".join(f"{d[k]:.1f}" for k in keys) + extra, sum(d[k] for k in keys) / 3

    qa, cf, long, rel = [], [], [], []
    for label, i, m in WHICH:
        _, _, _, _, zj, cj = CROSS[i]
        z, c = harness_figures(load(results / zj))[1], harness_figures(load(results / cj))[1]
        qa.append(triple(z, ("Reliability (gen)", "Generality (gen)", "Locality (gen)")))
        cf.append(triple(c, ("Efficacy", "Generalization", "Specificity")))
        r = load(results / f"long_{m}_n1000.json") if m else None
        if r and r["evals"] and r["evals"][-1]["n_done"] == 1000:
            e, ppl = r["evals"][-1], r["evals"][-1]["WikiText-2 PPL"] / r["unedited"]["WikiText-2 PPL"]
            long.append(triple(e, ("Efficacy", "Generalization", "Specificity"), f", {ppl:.2f}x"))
        elif i == 0:                      # SCEN: 1000 edits one by one through scen.py (no PPL measured)
            c1000 = harness_figures(load(results / "scen_counterfact_n1000.json"))[1]
            long.append(triple(c1000, ("Efficacy", "Generalization", "Specificity"), " (batch 1; PPL not measured)"))
        else:
            long.append(("", None))
        if "Relation specificity (own > new)" not in c and m == "nse":
            c = (load(results / "relation_nse_smollm2_n200.json") or {}).get("edited", {})
        x = c.get("Relation specificity (unchanged, tf)")
        a = load(results / f"long_analysis_{m}_n1000.json") if m else None
        txt = "not run" if x is None else f"{x:.1f} at 200" + (
            f"; {a['Relation specificity (unchanged, tf)']:.1f} after 1000" if a else "")
        if i == 0 and (o := harness_figures(load(results / "relation_scen_ownneg_n200.json"))[1]):
            txt += f" ({o['Relation specificity (unchanged, tf)']:.1f} with `--own-neg relations`, " \
                   f"Generalization {o['Generalization']:.1f})"
        rel.append((txt, x))
    head = "| | " + " | ".join(label for label, _, _ in WHICH) + " |"
    return "\n".join([head, "|---" * (len(WHICH) + 1) + "|",
                      row("QA edits, 200 (ZsRE, gen exact match: Rel / Gen / Loc; batch 1 for SCEN and FT, "
                          "20 for the others)", *zip(*qa)),
                      row("completions, 200 (CounterFact: E / G / S; batches as above)", *zip(*cf)),
                      row("completions, 1000 (batches of 100: E / G / S, held-out PPL x unedited)", *zip(*long)),
                      row("the same subject's other facts (relation specificity, % unchanged; unedited 100)",
                          *zip(*rel))])


def _relation(d: dict) -> str:
    if "Relation specificity (own > new)" not in d:
        return "not run"
    return f"{d['Relation specificity (unchanged, tf)']:.1f} / {d['Relation specificity (own > new)']:.1f}"


def cross_commands(sft: str, smol: str, u900: str, runs: Path) -> list[tuple[Path, list[str], Path]]:
    """(JSON, argv, run folder) of every cross-table cell, in the table's order."""
    out = []
    for label, script, flags, _, zj, cj in CROSS:
        for task, js, base in (("zsre", zj, ZSRE_CMD), ("counterfact", cj, CF_CMD)):
            # SCEN on completions: the unrelated prompts are completions too (counterfact-train, disjoint)
            f = flags if task == "zsre" or script == "nse.py" else flags.replace("--unrelated {u900}", CF_UNREL)
            f += f" {C0_TEXT}" if script == "nse.py" else ""     # (the model's own text: ~4x slower)
            cmd = f"{script} {base} {f}".format(sft=sft, smol=smol, shared=SHARED, u900=u900)
            run_dir = runs / "cross" / Path(js).stem
            out.append((RESULTS / js, shlex.split(cmd), run_dir))   # --system '' stays an empty argument
    return out


# ----------------------------------------------------------------------------------------------
# SCEN over all of D_edit, and at Llama-2-7B shapes (bench_scen_long.py)

def scen_long_table(results: Path = RESULTS) -> str:
    lines = ["| experts | edits | Reliability | Generality | Locality | first 100's Reliability (gen), after n edits "
             "| CPU s/edit first 100 -> last 100 | storage / edit | latency, all experts / unedited |",
             "|" + "---|" * 9]
    for kind in ("lowrank", "full"):
        r = next((load(p) for p in sorted(results.glob(f"scen_long_{kind}_n*.json"))), None)
        if r is None:
            lines.append(f"| {kind} | not run | | | | | | | |")
            continue
        f = r.get("final")
        ret = {x["edits"]: x for x in r["retention"]}
        keep = sorted({k for k in (100, 500) if k in ret} | ({r["retention"][-1]["edits"]} if ret else set()))
        rtxt = ", ".join(f"{k}: {ret[k]['Reliability (gen)']:.0f}" for k in keep) or "-"
        done = r["retention"][-1]["edits"] if r["retention"] else 0
        if f is None:
            lines.append(f"| {kind} | {done} of {r['n']} (running) | | | | {rtxt} | | | |")
            continue
        c = r["cpu_s_per_edit"]
        lines.append(f"| {kind} | {r['n']} | {_pair(f, 'Reliability')} | {_pair(f, 'Generality')} | "
                     f"{_pair(f, 'Locality')} | {rtxt} | {c['first_100']:.2f} -> {c['last_100']:.2f} "
                     f"({c['ratio']:.2f}x) | {r['storage_bytes_per_edit'] / 1024:.0f} KB | "
                     f"{r['latency']['ratio']:.3f}x |")
    return "\n".join(lines)


def scen_scale_table(results: Path = RESULTS) -> str:
    """Compact experts on the random-weight Llama-2-7B-shaped checkpoint: memory and disk per edit."""
    lines = ["| checkpoint | edits | RSS after load | RSS after edit 1 -> last | RSS / edit | disk / edit "
             "| projected at 1,037 edits | CPU s/edit |", "|" + "---|" * 8]
    s = next((load(p) for p in sorted(results.glob("scen_long_scale7b_n*.json"))), None)
    if s is None or "projection_1037" not in s:
        return "\n".join(lines + ["| Llama-2-7B shapes | not run | | | | | | |"])
    m, p = s["memory"], s["projection_1037"]
    lines.append(f"| Llama-2-7B shapes (bf16 weights, random), {s['expert']} experts | {len(m)} | "
                 f"{s['rss_after_load_mb'] / 1024:.2f} GiB | {m[0]['rss_mb'] / 1024:.2f} -> {m[-1]['rss_mb'] / 1024:.2f} GiB | "
                 f"{p['rss_mb_per_edit']:.2f} MB | {s['storage_bytes_per_edit'] / 1024:.0f} KB experts, "
                 f"{(m[-1]['run_dir_bytes'] - m[0]['run_dir_bytes']) / (len(m) - 1) / 1024:.0f} KB run folder | "
                 f"{p['rss_mb_at_1037'] / 1024:.2f} GiB RSS, {p['disk_mb_at_1037']:.0f} MB of experts | "
                 f"{s['cpu_s_per_edit']['first_100']:.1f} |")
    return "\n".join(lines)


def long_table(results: Path = RESULTS) -> str:
    import bench_long
    return bench_long.long_table(results, 1000)


def relation_kl_table(results: Path = RESULTS) -> str:
    import bench_relation_kl
    r = load(results / "relation_kl_train40.json")
    return bench_relation_kl.table(r) if r else "(not run: bench/bench_relation_kl.py)"


def hall_table(results: Path = RESULTS) -> str:
    """SCEN's hallucination task (bench_hallucination.py): perplexity after 200 edits, x unedited."""
    import bench_hallucination
    return bench_hallucination.table(load(results / "scen_hallucination.json") or {})


def hall_levers_table(results: Path = RESULTS) -> str:
    import bench_routing
    r = load(results / "scen_routing_hall_levers.json")
    return bench_routing.hall_table(r) if r else "(not run: bench/bench_routing.py --task hall)"


TABLES = {"cross-table": cross_table, "which-table": which_table, "hall-table": hall_table, "hall-levers-table": hall_levers_table, "scen-long-table": scen_long_table, "scen-scale-table": scen_scale_table,
          "long-table": long_table,
          "relation-kl-table": relation_kl_table}


def marker(name: str) -> tuple[str, str]:
    return f"<!-- {name} -->\n", f"<!-- /{name} -->"


def held(text: str) -> list[str]:
    """The TABLES entries that have a block in `text`."""
    return [name for name in TABLES if all(m in text for m in marker(name))]


def tables(text: str, results: Path = RESULTS) -> str:
    """`text` with every `<!-- name -->` ... `<!-- /name -->` block of TABLES it holds remade from the
    JSONs (README.md and bench/README.md each hold some; a block not in `text` is left to the other)."""
    for name in held(text):
        a, b = marker(name)
        i, j = text.index(a) + len(a), text.index(b)
        text = text[:i] + TABLES[name](results) + "\n" + text[j:]
    return text


def write_tables(docs=DOCS):
    """Rewrite the blocks of every file in `docs`; says which file holds which, and any table none holds."""
    seen = []
    for doc in docs:
        old = doc.read_text()
        new = tables(old)
        if new != old:
            doc.write_text(new)
        names = held(old)
        seen += names
        where = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
        print(f"{where}: tables {'rewritten' if new != old else 'unchanged'}: {', '.join(names)}")
    if missing := [n for n in TABLES if n not in seen]:
        print(f"in neither file: {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------
# Suites

def smollm2(path: Path) -> Path:
    """SmolLM2-135M-Instruct as a checkpoint folder, converted from ../shared on first use."""
    if (path / "config.json").exists():
        return path
    tool = SHARED / "tools" / "smollm2_from_gguf.py"
    if not tool.exists():
        raise SystemExit(f"no checkpoint at {path} and no {tool} to make one (pass --ckpt)")
    subprocess.run([PY, str(tool), str(path)], check=True)
    return path


def run_cli(argv: list[str], run_dir: Path, log: Path) -> None:
    """One CLI run into run_dir (resumed if it holds an unfinished run)."""
    resume = ["--resume"] if (run_dir / "run.json").exists() else []
    with open(log, "a") as f:
        subprocess.run([PY, *argv, "--out", str(run_dir), *resume], cwd=ROOT, check=True, stdout=f,
                       stderr=subprocess.STDOUT)


def quick(args):
    smol = smollm2(Path(args.ckpt))
    out = RESULTS / "quick"
    runs = Path(args.runs) / "quick"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    zsre = SHARED / "data" / "zsre"
    cf = SHARED / "data" / "counterfact" / "counterfact-edit.json"
    wiki = SHARED / "data" / "wikitext" / "wikitext-2-raw-test.txt"
    qa = [*f"--ckpt {smol} --edits {zsre}/zsre_mend_edit.json --n 8 --template chatml".split(), "--system", "",
          *f"--unrelated {zsre}/zsre_mend_train-1k.json --threads 1".split()]
    comp = (f"--ckpt {smol} --edits {cf} --n 10 --batch-size 10 --stats-text {wiki} --stats-tokens 20000 "
            f"--cache-dir {runs}/cache --no-fluency --threads 1").split()
    lanes = [[("scen", ["scen.py", *qa]), ("ft", ["scen.py", *qa, "--method", "ft"])],
             [(m, ["nse.py", *comp, "--method", m]) for m in ("nse", "memit", "alphaedit")]]
    if args.no_parallel:
        lanes = [lanes[0] + lanes[1]]
    t0 = time.perf_counter()

    def lane_runs(lane):                               # one lane's runs in order, one thread each
        for name, argv in lane:
            print(f"quick: {name} ...", flush=True)
            run_cli(argv, runs / name, runs / f"{name}.log")

    with ThreadPoolExecutor(len(lanes)) as pool:       # two lanes side by side on a 2-core machine
        for f in [pool.submit(lane_runs, lane) for lane in lanes]:
            try:
                f.result()
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"a quick run failed ({e.cmd[1]}): see the logs in {runs}")
    import bench_long
    res = {"machine": bench_long.machine(1), "wall_seconds": time.perf_counter() - t0, "runs": {}}
    for lane in lanes:
        for name, argv in lane:
            u, e = harness_figures(load(runs / name / "results.json"))
            res["runs"][name] = {"command": " ".join(argv), "unedited": u, "edited": e}
    (out / "quick.json").write_text(json.dumps(res, indent=1) + "\n")
    table = quick_table(res)
    (out / "quick.md").write_text(table + "\n")
    print(table)
    print(f"\n{res['wall_seconds']:.0f} s; bench/results/quick/quick.json, quick.md")


# the quick suite edits its 10 CounterFact records in one batch: no earlier keys, so memit = memit-seq
QUICK_LABELS = {"memit": "memit (one batch: the same edit as memit-seq)"}


def quick_table(res: dict) -> str:
    lines = ["| run | task | Reliability / Efficacy | Generality | Locality / Specificity | "
             "Relation specificity (unchanged / own > new) | s/edit |", "|" + "---|" * 7]
    for name, r in res["runs"].items():
        e, u = r["edited"], r["unedited"]
        if "Reliability (gen)" in e:       # Locality here: the NQ answers of the file (unedited beside it)
            cells = ["ZsRE, 8 edits (gen / tf)", _pair(e, "Reliability"), _pair(e, "Generality"),
                     f"{_pair(e, 'Locality')} (unedited {_pair(u, 'Locality')})" if "Locality (gen)" in e else "-", "-"]
        else:
            cells = ["CounterFact, 10 edits", *(fmt(e.get(k)) for k in ("Efficacy", "Generalization", "Specificity")),
                     _relation(e)]
        lines.append(f"| {QUICK_LABELS.get(name, name)} | " + " | ".join(cells) + f" | {fmt(e.get('s/edit (mean)'))} |")
    return "\n".join(lines)


def full(args):
    sft = Path(args.sft)
    smol = smollm2(Path(args.ckpt))
    runs = Path(args.runs)
    (runs / "cross").mkdir(parents=True, exist_ok=True)
    (RESULTS / "cross").mkdir(parents=True, exist_ok=True)
    if not (sft / "sft" / "config.json").exists():
        subprocess.run([PY, "bench/bench_sft_zsre.py", "--ckpt", str(smol), "--work", str(sft)], cwd=ROOT, check=True)
    only = set(args.only.split(",")) if args.only else None
    for js, argv, run_dir in cross_commands(str(sft), str(smol), args.unrelated, runs):
        if (js.exists() and not args.force) or (only and js.stem not in only):
            continue
        print(f"{js.relative_to(ROOT)}: python {' '.join(argv)}", flush=True)
        run_cli(argv, run_dir, runs / "cross" / f"{run_dir.name}.log")
        shutil.copyfile(run_dir / "results.json", js)
    js = RESULTS / "scen_counterfact_n1000.json"                   # SCEN over 1000 CounterFact edits, batch 1
    if only is None and (args.force or not js.exists()):
        argv = shlex.split(f"scen.py {CF_CMD.replace('--n 200', '--n 1000')} --no-baseline {CF_UNREL}".format(
            smol=smol, shared=SHARED))
        run_cli(argv, runs / js.stem, runs / f"{js.stem}.log")
        shutil.copyfile(runs / js.stem / "results.json", js)
    for m in ("nse", "memit-seq", "alphaedit") if only is None else ():   # bench_long resumes; a finished run has a row at n
        rows = (load(RESULTS / f"long_{m}_n1000.json") or {}).get("rows") or [{"n_done": 0}]
        if rows[-1]["n_done"] < 1000:
            subprocess.run([PY, "bench/bench_long.py", "--method", m, "--ckpt", str(smol)], cwd=ROOT, check=True)
    write_tables()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("quick", "full"), help="quick: minutes, its own table; full: the tables "
                   "of README.md and bench/README.md")
    p.add_argument("--tables", action="store_true", help="only rewrite the tables of README.md and bench/README.md "
                   "from the JSONs")
    p.add_argument("--ckpt", default=str(Path.home() / ".cache/llama-edit-bench/smollm2"),
                   help="SmolLM2-135M-Instruct folder (converted from ../shared if absent)")
    p.add_argument("--sft", default=str(Path.home() / ".cache/llama-edit-bench/sft_zsre"),
                   help="the SFT model and D_edit / D_loc (bench_sft_zsre.py's output)")
    p.add_argument("--unrelated", default=str(SHARED / "data/zsre/zsre_mend_train-1k.json"),
                   help="SCEN's unrelated prompts on ZsRE")
    p.add_argument("--runs", default=str(Path.home() / ".cache/llama-edit-bench/runs"), help="run folders")
    p.add_argument("--force", action="store_true", help="full: rerun cells whose JSON exists")
    p.add_argument("--only", help="full: only these cells (JSON names without .json, comma-separated, e.g. "
                   "alphaedit_counterfact), and no long runs")
    p.add_argument("--no-parallel", action="store_true", help="quick: one lane instead of two")
    args = p.parse_args()
    if args.tables:
        return write_tables()
    if not args.suite:
        p.error("--suite quick|full or --tables")
    quick(args) if args.suite == "quick" else full(args)


if __name__ == "__main__":
    main()
