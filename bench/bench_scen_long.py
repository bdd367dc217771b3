"""
bench_scen_long.py: SCEN over all of D_edit (952+ sequential edits), full vs compact experts, and
compact experts on the Llama-2-7B-shaped checkpoint (issue: SCEN that scales). Resumable.

    S=~/.cache/llama-edit-bench/sft_zsre                   # bench_sft_zsre.py's SFT model and split
    B="python bench/bench_scen_long.py --ckpt $S/sft --edits $S/d_edit.jsonl --loc $S/d_loc.jsonl \
       --unrelated /work/runs/unrelated900.jsonl --template chatml --system '' --threads 1"
    $B --expert lowrank &  $B --expert full &               # one JSON each, side by side
    python bench/bench_scen_long.py --scale --ckpt /work/scale7b --n 20   # bf16 7B shapes, random weights

Per 100 edits: Reliability of the FIRST 100 edits (generation exact match and teacher-forced):
do early edits survive later ones? At the end: Reliability / Generality / Locality on all edits
(eval.evaluate_qa, both protocols), CPU seconds per edit of the first and the last 100, storage
per edit (bytes of the run folder's experts), and the latency of 10 greedy tokens with every expert
loaded against the same model with the original down projection, timed in alternation.
--scale: resident memory (VmRSS) after each edit, bytes per edit on disk, and the projection to
1,037 edits (the paper's ZsRE count), on a checkpoint too big to evaluate here: edits only.
The editor's state is saved in --run-dir after every edit (scen.Editor.save: a kill at any
instant resumes bit-identical); the JSON after every 100 edits and at the end.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as ev  # noqa: E402
import llama  # noqa: E402
import scen  # noqa: E402


def rss_mb(key: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def latency_ratio(ed, tok, tpl, prompts, rounds: int = 3) -> dict:
    """Median seconds for 10 greedy tokens, batch 1, with the experts and with the original down
    projection (scen.swapped), alternating per query so a changing machine load hits both alike."""
    with_e, without = [], []
    for _ in range(rounds):
        for q in prompts:
            ids = data.encode_prompt(tok, tpl, q)
            for routed in (True, False):
                t = time.perf_counter()
                if routed:
                    ed.generate_ids([ids], 10, eos_ids=[])
                else:
                    with scen.swapped(ed.model, ed.s.layer, ed.base):
                        llama.generate(ed.model, [ids], 10, eos_ids=[])
                (with_e if routed else without).append(time.perf_counter() - t)
    a, b = statistics.median(with_e), statistics.median(without)
    return {"with_experts_s": a, "original_s": b, "ratio": a / b, "queries": len(prompts), "rounds": rounds}


def run(a):
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.scale else None
    model, tok = llama.load(a.ckpt, "cpu", dtype)
    tpl = data.template_for(tok, a.template, a.system)
    records = data.load_edits(a.edits, n=a.n) if a.edits else None
    if a.scale:                            # random weights: any prompt will do, the answer is made up
        records = [data.EditRecord(f"Where does person {i} live?", f"City {i}") for i in range(a.n)]
    loc = [(r.prompt, r.target_new) for r in data.load_edits(a.loc)] if a.loc else None
    tag = "scale7b" if a.scale else a.expert
    out = Path(a.out or ROOT / "bench/results" / f"scen_long_{tag}_n{len(records)}.json")
    run_dir = Path(a.run_dir or f"/work/runs/scen_long_{tag}_n{len(records)}")
    settings = scen.Settings(expert=a.expert)
    res = json.loads(out.read_text()) if out.exists() else None
    if res is not None and scen.Editor.saved(run_dir):
        ed = scen.Editor.load(run_dir, model, tok)
        print(f"resuming after {len(ed.log)} edits", flush=True)
    else:
        if res is not None and res.get("retention"):
            raise SystemExit(f"{out} holds figures but {run_dir} no editor state: remove one of them")
        unrel = None if a.scale else [r.prompt for r in data.load_edits(a.unrelated)] if a.unrelated else None
        if a.scale:
            unrel = [f"What is fact {i}?" for i in range(64)]
        ed = scen.Editor(model, tok, settings, template=tpl, unrelated=unrel)
    if res is None:
        res = {"expert": a.expert, "ckpt": str(a.ckpt), "n": len(records), "settings": ed.s.__dict__,
               "machine": {"platform": platform.platform(), "threads": a.threads, "torch": torch.__version__},
               "retention": [], "memory": [], "protocol": {
                   "retention": "Reliability of the first 100 edits: generation exact match / teacher-forced",
                   "final": "eval.evaluate_qa on all edits; Locality on --loc (D_loc)"}}
        if loc and not a.scale:
            before = ev.snapshot(ev.as_eval_model(model, tok, tpl), tok, tpl, loc)
            res["before"] = dict(before)
        res["rss_after_load_mb"] = rss_mb()
    first = records[:100]

    def retention_row(done: int):
        """The first 100 edits' Reliability after `done` edits, once per multiple of 100 (and at the
        end); also on a resume whose kill fell between the editor's save and this row."""
        if a.scale or not (done % 100 == 0 or done == len(records)) or \
                any(r["edits"] == done for r in res["retention"]):
            return
        figs = ev.evaluate_qa(ed.eval_model(), tok, tpl, first[:done], loc_pairs=[])
        res["retention"].append({"edits": done, **{k: v["value"] for k, v in figs.items()
                                                   if k.startswith("Reliability")}})
        data.atomic_write_text(out, json.dumps(res, indent=1) + "\n")
        print(f"{done} edits: first 100 {res['retention'][-1]}", flush=True)

    if ed.log:
        retention_row(len(ed.log))
    while len(ed.log) < len(records):
        t = len(ed.log)
        ed.edit([records[t]])
        ed.save(run_dir)
        done = len(ed.log)
        if a.scale:
            res["memory"].append({"edits": done, "rss_mb": rss_mb(), "expert_bytes": ed.expert_bytes(),
                                  "run_dir_bytes": folder_bytes(run_dir)})
            data.atomic_write_text(out, json.dumps(res, indent=1) + "\n")
            print(res["memory"][-1], flush=True)
        else:
            retention_row(done)
    cpu = [r["cpu_seconds"] for r in ed.log]
    res["cpu_s_per_edit"] = {"first_100": statistics.mean(cpu[:100]), "last_100": statistics.mean(cpu[-100:])}
    res["cpu_s_per_edit"]["ratio"] = res["cpu_s_per_edit"]["last_100"] / res["cpu_s_per_edit"]["first_100"]
    res["storage_bytes_per_edit"] = folder_bytes(run_dir / "experts") / len(ed.log)
    if a.scale:
        per = (res["memory"][-1]["rss_mb"] - res["memory"][0]["rss_mb"]) / max(len(res["memory"]) - 1, 1)
        res["projection_1037"] = {"rss_mb_per_edit": per,
                                  "rss_mb_at_1037": res["memory"][-1]["rss_mb"] + per * (1037 - len(ed.log)),
                                  "disk_mb_at_1037": res["storage_bytes_per_edit"] * 1037 / 2**20}
    elif "final" not in res:
        before = ev.Snapshot(res["before"]) if "before" in res else None
        figs = ev.evaluate_qa(ed.eval_model(), tok, tpl, records, loc_pairs=loc, before=before)
        res["final"] = {k: v["value"] for k, v in figs.items()}
        res["latency"] = latency_ratio(ed, tok, tpl, [r.prompt for r in records[:5]] + [p for p, _ in (loc or [])[:5]])
    data.atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("before", "memory")}, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the SFT model (or, --scale, the 7B-shaped checkpoint)")
    p.add_argument("--edits", help="D_edit records, edited in order")
    p.add_argument("--loc", help="D_loc records (Locality at the end)")
    p.add_argument("--unrelated", help="SCEN's unrelated prompts (default: the model writes them)")
    p.add_argument("--n", type=int, default=None, help="edits (default: every record)")
    p.add_argument("--expert", choices=("full", "lowrank"), default="lowrank", help="SCEN's expert kind")
    p.add_argument("--template", default="auto", help="prompt template")
    p.add_argument("--system", default=None, help="chatml system message ('' = none)")
    p.add_argument("--scale", action="store_true", help="7B-shaped checkpoint, bf16: memory and disk per edit")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", help="JSON (default bench/results/scen_long_<expert>_n<n>.json)")
    p.add_argument("--run-dir", help="editor state (default /work/runs/scen_long_<expert>_n<n>)")
    a = p.parse_args()
    if not a.scale and not a.edits:
        p.error("--edits is required (or --scale)")
    if a.scale and a.n is None:
        a.n = 20
    run(a)


if __name__ == "__main__":
    main()
