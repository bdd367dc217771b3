"""
bench_long.py: NSE, MEMIT and AlphaEdit over a long sequence of CounterFact edits (issue: NSE at the
paper's scale), one method per process, resumable, one JSON per method.

    B="python bench/bench_long.py --ckpt /work/models/smollm2 --n 2000 --batch-size 100 --eval-every 100 --threads 1"
    $B --method memit --kl-direction p_p0 &  $B --method nse --kl-direction p_p0 &   # one thread each
    python bench/bench_long.py --plot --n 2000      # table + PNG from the JSONs (needs matplotlib)

--method memit is MEMIT as published (no earlier keys), memit-seq adds them (the AlphaEdit
repository's memit_seq: what the 1000-edit JSONs ran, relabelled long_memit-seq_n1000.json).

Records: the first --n of counterfact-edit.json (settings were chosen on counterfact-train; nothing
here was tuned on these records). Every method uses nse.Editor with its derived defaults (layers 4-8
on SmolLM2; lambda, alpha, upper_bound, AlphaEdit's threshold and l2 derived from the first batch).

After every batch (cheap): Efficacy of the first 100 edits (retention), the batch's own Efficacy,
the Frobenius norm of each edited W_down relative to the original (||W|| / ||W0|| and
||W - W0|| / ||W0||), residuals left, seconds. Every --eval-every edits and at the end: Efficacy /
Generalization / Specificity on the edits so far (an evenly spaced sample of at most --eval-max before
the end, all of them at the end), Fluency (ROME n-gram entropy of 100 sampled tokens
after the prompts of the first --fluency-n edits) and WikiText-2 perplexity on held-out text: the
tail of wikitext-2-raw-test.txt that C0's 200k tokens never reach (--ppl-chars characters).

Resume: the editor's state is saved in --run-dir after each batch (nse.Editor.save, atomic) and the
JSON is written after it (atomic); a process killed at any instant resumes from the state, and the
figures of a batch whose state was saved but whose JSON row was not are computed on resume (they
depend only on the model after that batch).
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import harness  # noqa: E402
import llama  # noqa: E402
import nse  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import bench_llama  # noqa: E402  (its peak-RSS reader)

SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "python": platform.python_version()}


def held_out_passages(path: Path, n_chars: int, tok, max_tokens: int = 512) -> list[tuple[str, str]]:
    """The last n_chars of the corpus as (prompt "", passage) pairs of at most max_tokens tokens."""
    text = path.read_text(encoding="utf-8")[-n_chars:]
    text = text[text.index("\n") + 1:]                          # start at a line boundary
    out, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        cur.append(line)
        if len(tok.encode(" ".join(cur))) >= max_tokens:
            out.append(("", " ".join(cur)))
            cur = []
    return out


def norms(ed) -> dict:
    out = {}
    for l, w in ed._weights(ed.s).items():
        w0 = ed.W0[l].float()
        out[str(l)] = {"rel_norm": (w.float().norm() / w0.norm()).item(),
                       "rel_change": ((w.float() - w0).norm() / w0.norm()).item()}
    return out


def efficacy(em, tok, records) -> float:
    """Efficacy alone (the edit prompts; no rephrases, no neighbourhood: a tenth of the cost)."""
    bare = [dataclasses.replace(r, rephrases=[], locality=[]) for r in records]
    return evaluation.evaluate_counterfact(em, tok, bare, with_fluency=False)["Efficacy"]["value"]


def cheap_figures(ed, tok, records, n_done, batch) -> dict:
    em = ed.eval_model()
    return {"retention_efficacy_first100": efficacy(em, tok, records[:min(100, n_done)]),
            "batch_efficacy": efficacy(em, tok, records[n_done - batch:n_done]), "norms": norms(ed)}


def full_figures(em, tok, records, fluency_records, passages) -> dict:
    t = time.perf_counter()
    out = {k: v["value"] for k, v in evaluation.evaluate_counterfact(em, tok, records, with_fluency=False).items()}
    flu = evaluation.evaluate_fluency(em, tok, fluency_records)["Fluency"]["value"]
    ppl = evaluation.evaluate_perplexity(em, tok, passages, name="PPL")
    out.update({"Fluency": flu, "WikiText-2 PPL": ppl["PPL (token-weighted)"]["value"],
                "eval_seconds": time.perf_counter() - t})
    return out


def write(path: Path, res: dict) -> None:
    data.atomic_write_text(path, json.dumps(res, indent=1) + "\n")


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out or RESULTS / f"long_{args.method}_n{args.n}.json")
    run_dir = Path(args.run_dir or f"/work/runs/long_{args.method}_n{args.n}")
    records = data.load_edits(args.edits, n=args.n)
    if len(records) < args.n:
        raise SystemExit(f"--edits {args.edits}: {len(records)} records, --n {args.n} asked")
    model, tok = llama.load(args.ckpt, "cpu", torch.float32)
    passages = held_out_passages(Path(args.ppl_text), args.ppl_chars, tok)
    fluency_records = records[:args.fluency_n]
    settings = nse.Settings(method=args.method, batch_size=args.batch_size, kl_direction=args.kl_direction)
    res = json.loads(out.read_text()) if out.exists() else None
    if res is not None and (res["method"], res["n"], res["batch_size"]) != (args.method, args.n, args.batch_size):
        raise SystemExit(f"{out}: a run of {res['method']} n {res['n']} batch {res['batch_size']}; use another --out")
    if res is not None and res["rows"] and not nse.Editor.saved(run_dir):
        raise SystemExit(f"{out} has {res['rows'][-1]['n_done']} edits but {run_dir} holds no editor state")
    if res is not None and nse.Editor.saved(run_dir):
        ed = nse.Editor.load(run_dir, model, tok)
        print(f"resuming at {ed.state.n_done} edits", flush=True)
    else:
        ed = nse.Editor(model, tok, settings, template="raw", stats_text=args.stats_text, cache_dir=args.cache_dir)
    if res is None:
        res = {"method": args.method, "ckpt": str(args.ckpt), "edits": str(args.edits), "n": args.n,
               "batch_size": args.batch_size, "records_digest": harness.digest([r.prompt for r in records]),
               "machine": machine(args.threads), "protocol": {
                   "E/G/S": "eval.evaluate_counterfact: mean per-token NLL comparison (ROME/NSE), on the edits so far "
                   f"(every k-th of them, at most {args.eval_max}, before the end; all of them at the end)",
                   "retention": "Efficacy of the first 100 edits", "Fluency": f"ROME n-gram entropy x100, "
                   f"100 tokens top-5 sampled after the prompts of the first {args.fluency_n} edits",
                   "WikiText-2 PPL": f"token-weighted perplexity of {len(passages)} passages (<=512 tokens) "
                   f"from the last {args.ppl_chars} characters of {Path(args.ppl_text).name}, "
                   "text C0 never sees"}, "rows": [], "evals": []}
        t = time.perf_counter()
        em = ed.eval_model()
        res["unedited"] = full_figures(em, tok, records, fluency_records, passages)
        res["unedited"]["retention_efficacy_first100"] = efficacy(em, tok, records[:100])
        print(f"unedited: {res['unedited']} ({time.perf_counter() - t:.0f} s)", flush=True)
        write(out, res)
    done_rows = res["rows"][-1]["n_done"] if res["rows"] else 0
    while True:
        n_done = ed.state.n_done
        if n_done > done_rows:                                   # state saved, figures not yet
            row = {"n_done": n_done, "seconds": ed.log[-1]["seconds"], "batch_log": {
                k: ed.log[-1].get(k) for k in ("note", "left_above_upper")}, "time_shares": dict(ed.timer)}
            row.update(cheap_figures(ed, tok, records, n_done, args.batch_size))
            row["peak_rss_mb"] = bench_llama.maxrss_bytes() / 2**20          # VmHWM
            row["threads"] = torch.get_num_threads()                        # this process's (a resume may differ)
            res["rows"].append(row)
            if n_done % args.eval_every == 0 or n_done == args.n:
                step = 1 if n_done == args.n else -(-n_done // args.eval_max)      # every k-th edit so far
                sample = records[:n_done:step]
                ev_row = {"n_done": n_done, "n_eval": len(sample),
                          **full_figures(ed.eval_model(), tok, sample, fluency_records, passages)}
                res["evals"].append(ev_row)
                print(f"eval at {n_done}: {ev_row}", flush=True)
            res["derived"], res["settings_used"] = ed.derived, ed.s.__dict__
            write(out, res)
            done_rows = n_done
            print(f"{n_done}/{args.n} edits, batch {row['seconds']:.0f} s, retention {row['retention_efficacy_first100']:.1f}, "
                  f"batch efficacy {row['batch_efficacy']:.1f}, norms "
                  f"{ {l: round(v['rel_change'], 3) for l, v in row['norms'].items()} }", flush=True)
        if n_done >= args.n:
            break
        ed.edit(records[n_done:n_done + args.batch_size])
        ed.save(run_dir)
    return res


def load_runs(results_dir: Path, n: int) -> dict:
    """The long_<method>_n{n}.json files there are, by method."""
    runs = {}
    for m in ("nse", "memit", "memit-seq", "alphaedit"):
        p = results_dir / f"long_{m}_n{n}.json"
        if p.exists():
            runs[m] = json.loads(p.read_text())
    if not runs:
        raise SystemExit(f"no long_*_n{n}.json in {results_dir}")
    return runs


def long_table(results_dir: Path, n: int = 1000) -> str:
    """The README's markdown table from the JSONs: the unedited row, then every evaluation of every method."""
    runs = load_runs(results_dir, n)
    cols = ["Efficacy", "Generalization", "Specificity", "Fluency", "WikiText-2 PPL"]
    lines = ["| method | edits | " + " | ".join(cols) + " | retention (first 100) | s/edit |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    any_run = next(iter(runs.values()))
    u = any_run["unedited"]
    lines.append(f"| unedited (all {any_run['n']} records) | 0 | " + " | ".join(f"{u[c]:.2f}" for c in cols)
                 + f" | {u['retention_efficacy_first100']:.1f} | |")
    for m, r in runs.items():
        for e in r["evals"]:
            row = next(x for x in r["rows"] if x["n_done"] == e["n_done"])
            secs = sum(x["seconds"] for x in r["rows"] if x["n_done"] <= e["n_done"]) / e["n_done"]
            lines.append(f"| {m} | {e['n_done']} | " + " | ".join(f"{e[c]:.2f}" for c in cols)
                         + f" | {row['retention_efficacy_first100']:.1f} | {secs:.1f} |")
    return "\n".join(lines)


def plot(results_dir: Path, n: int):
    """The markdown table (long_n{n}.md, and the README's copy via bench/run.py) and the PNG of the curves."""
    runs = load_runs(results_dir, n)
    any_run = next(iter(runs.values()))
    table = long_table(results_dir, n)
    (results_dir / f"long_n{n}.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: table only (pip install matplotlib for the PNG)")
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [("Efficacy", "evals"), ("Generalization", "evals"), ("Specificity", "evals"),
              ("retention_efficacy_first100", "rows"), ("rel_change", "rows"), ("WikiText-2 PPL", "evals")]
    for ax, (key, where) in zip(axes.flat, panels):
        for m, r in runs.items():
            xs = [0] + [x["n_done"] for x in r[where]]
            if key == "rel_change":
                ys = [0.0] + [max(v["rel_change"] for v in x["norms"].values()) for x in r[where]]
            else:
                ys = [r["unedited"][key]] + [x[key] for x in r[where]]
            ax.plot(xs, ys, marker="o", label=m)
        ax.set_title({"retention_efficacy_first100": "Efficacy of the first 100 edits",
                      "rel_change": "max ||W - W0|| / ||W0|| over edited layers"}.get(key, key))
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"{any_run['ckpt'].split('/')[-1]}: sequential CounterFact edits, batches of {any_run['batch_size']}")
    fig.tight_layout()
    fig.savefig(results_dir / f"long_n{n}.png", dpi=90)
    print(f"wrote {results_dir / f'long_n{n}.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("nse", "memit", "memit-seq", "alphaedit"), help="the method to run")
    p.add_argument("--kl-direction", default="p0_p", choices=("p0_p", "p_p0"), help="nse.Settings.kl_direction")
    p.add_argument("--plot", action="store_true", help="write the table and PNG from the JSONs and stop")
    p.add_argument("--ckpt", default="/work/models/smollm2", help="Hugging Face folder (SmolLM2-135M converted)")
    p.add_argument("--edits", default=str(SHARED / "data/counterfact/counterfact-edit.json"), help="CounterFact records")
    p.add_argument("--n", type=int, default=1000, help="edits in the sequence")
    p.add_argument("--batch-size", type=int, default=100, help="edits per batch")
    p.add_argument("--eval-every", type=int, default=200, help="full evaluation every this many edits")
    p.add_argument("--eval-max", type=int, default=200, help="before the end, E/G/S on every k-th edit so far, "
                   "at most this many (all edits at the end)")
    p.add_argument("--stats-text", default=str(SHARED / "data/wikitext/wikitext-2-raw-test.txt"), help="C0 corpus")
    p.add_argument("--cache-dir", default=harness.CACHE_DIR, help="C0 cache")
    p.add_argument("--ppl-text", default=str(SHARED / "data/wikitext/wikitext-2-raw-test.txt"), help="held-out text")
    p.add_argument("--ppl-chars", type=int, default=60_000, help="characters from the end of --ppl-text")
    p.add_argument("--fluency-n", type=int, default=50, help="prompts for Fluency")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", help="JSON (default bench/results/long_<method>_n<n>.json)")
    p.add_argument("--run-dir", help="editor state for resuming (default /work/runs/long_<method>_n<n>)")
    args = p.parse_args()
    if args.plot:
        return plot(RESULTS, args.n)
    if not args.method:
        p.error("--method is required (or --plot)")
    run(args)


if __name__ == "__main__":
    main()
