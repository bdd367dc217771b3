"""
long_analysis.py: where the long runs of bench_long.py lose their edits (issue: NSE at the paper's scale, item 5).

    python bench/long_analysis.py --method nse --n 1000 --threads 1      # after bench_long.py finished

From the editor state bench_long.py saved after its last batch (nothing is edited here):
- Efficacy after all n edits by batch of origin (edits 1-100, 101-200, ...): are early edits lost?
- Efficacy by relation (the edit prompt's template with the subject taken out), for the ten most
  common relations: which records fail?
- Requests left above upper_bound (never edited), from the run's batch logs.
- Relation specificity on the first 200 edits' subjects (eval.evaluate_relation_specificity:
  prompts asking the same subject's OTHER relations, against the unedited model's answers).
Writes bench/results/long_analysis_<method>_n<n>.json.
"""
import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import llama  # noqa: E402
import nse  # noqa: E402
from bench_long import RESULTS  # noqa: E402


def per_record_efficacy(em, tok, records) -> list[bool]:
    bare = [dataclasses.replace(r, rephrases=[], locality=[]) for r in records]
    details: dict = {}
    evaluation.evaluate_counterfact(em, tok, bare, with_fluency=False, details=details)
    return [d["efficacy"][0] for d in details["counterfact"]]


def run(a):
    torch.set_num_threads(a.threads)
    long_json = RESULTS / f"long_{a.method}_n{a.n}.json"
    res_long = json.loads(long_json.read_text())
    run_dir = Path(a.run_dir or f"/work/runs/long_{a.method}_n{a.n}")
    records = data.load_edits(res_long["edits"], n=a.n)
    model, tok = llama.load(res_long["ckpt"], "cpu", torch.float32)
    t = time.perf_counter()
    first = records[:a.relation_n]
    probes = data.relation_probes(first, data.load_edits(res_long["edits"]))
    before = evaluation.relation_snapshot(model, tok, first, probes)          # the unedited model
    ed = nse.Editor.load(run_dir, model, tok)
    if ed.state.n_done != a.n:
        raise SystemExit(f"{run_dir} holds {ed.state.n_done} edits, not {a.n}: let bench_long.py finish")
    em = ed.eval_model()
    ok = per_record_efficacy(em, tok, records)
    b = res_long["batch_size"]
    by_batch = [{"edits": f"{i + 1}-{min(i + b, a.n)}", "Efficacy": 100 * sum(ok[i:i + b]) / len(ok[i:i + b])}
                for i in range(0, a.n, b)]
    rel = [data.subject_template(r.prompt, r.subject) or "?" for r in records]
    common = [t for t, _ in Counter(rel).most_common(10)]
    by_relation = [{"relation": t, "n": rel.count(t),
                    "Efficacy": 100 * sum(o for o, x in zip(ok, rel) if x == t) / rel.count(t)} for t in common]
    left = sum(len(row["batch_log"].get("left_above_upper") or []) for row in res_long["rows"])
    rs = evaluation.evaluate_relation_specificity(em, tok, first, before)
    out = {"method": a.method, "n": a.n, "batch_size": b, "Efficacy (all)": 100 * sum(ok) / len(ok),
           "efficacy_by_batch": by_batch, "efficacy_by_relation": by_relation, "left_above_upper_bound": left,
           "relation_specificity_first": a.relation_n,
           **{k: v["value"] for k, v in rs.items()}, "relation_probes": len(before["pairs"]),
           "seconds": time.perf_counter() - t,
           "protocol": {"Efficacy": "eval.evaluate_counterfact, edit prompts only, after all n edits",
                        "relation specificity": next(iter(rs.values()))["protocol"] if rs else None}}
    path = RESULTS / f"long_analysis_{a.method}_n{a.n}.json"
    data.atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=("nse", "memit", "memit-seq", "alphaedit"), help="the long run to analyse")
    p.add_argument("--n", type=int, default=1000, help="its number of edits")
    p.add_argument("--relation-n", type=int, default=200, help="relation specificity on the first this many edits")
    p.add_argument("--run-dir", help="its editor state (default /work/runs/long_<method>_n<n>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    run(p.parse_args())


if __name__ == "__main__":
    main()
