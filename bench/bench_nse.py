"""
bench_nse.py: NSE and sequential MEMIT (nse.py) against the reference re-implementation of the
official code (../shared/peers/nse_reference.py, transformers-based), on the same CounterFact edits,
the same model and the same hyperparameters (layers 4-8, lambda 2500, v_lr 0.5, alpha 30,
upper_bound 200: shared/docs/CALIBRATION.md).

    python ../shared/tools/smollm2_from_gguf.py /work/models/smollm2          # once: the checkpoint
    B="python bench/bench_nse.py --ckpt /work/models/smollm2"
    $B --method unedited --n 200 --eval-at 20,100,200 &                      # workers, side by side,
    $B --method nse      --n 200 --eval-at 20,100,200 --threads 1 &          # one JSON each in
    $B --method memit    --n 200 --eval-at 20,100,200 --threads 1 &          # bench/results/
    $B --method reference --ref-n 20      # the reference (~16 s per edit, one thread): first 20 edits
    $B --method zcpu --n 4                # z optimisation alone, ours vs reference, CPU seconds
    $B --method scale --n 10 --stats-tokens 2000 --v-steps 3   # one NSE batch on the 7B-shaped model
    $B --method merge                     # the table: bench/results/nse_smollm2.json

Reported per run: Efficacy, Generalization, Specificity (eval.py, ROME/NSE protocol, on all edits so
far), Fluency, seconds per edit (editing only: z + keys + solves + Cp; C0 and evaluation apart) and
the time shares, requests left above upper_bound. The reference runs on the first --ref-n edits in
one batch; "zcpu" compares the z optimisation on identical inputs in process CPU seconds, which a
busy shared machine distorts far less than wall time.
The nse / memit workers and the scale run edit with nse.Editor (one ed.edit call per batch); the
unedited, zcpu and scale runs call nse.py's step functions where they time or measure a step alone.
"""
import argparse
import json
import shutil
import subprocess
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

REF = ROOT.parent / "shared" / "peers" / "nse_reference.py"


def cf_eval(model, tok, records, fluency, seed):
    em = evaluation.LlamaEvalModel(model, tok, data.Template("raw"))
    figs = evaluation.evaluate_counterfact(em, tok, records, with_fluency=fluency, seed=seed)
    return {k: round(v["value"], 2) for k, v in figs.items()}


def reference(args, method, out_json):
    """Run the reference (one thread, as it is written) on the first ref_n edits, or reuse a JSON."""
    cmd = [sys.executable, str(REF), "--method", method, "--model", args.ckpt, "--data", args.edits,
           "--wikitext", args.stats_text, "--n-edits", str(args.ref_n), "--batch-size", str(args.ref_n),
           "--layers", args.layers, "--lam", str(args.lam), "--v-lr", "0.5", "--alpha", str(args.alpha),
           "--upper", str(args.upper_bound), "--cov-cache", str(Path(args.ref_cache) / "c0.pt"),
           "--z-cache", str(Path(args.ref_cache) / f"z-{method}.pt"), "--cov-seconds", "900", "--out", out_json]
    if method == "nse":
        cmd.append("--eval-base")
    subprocess.run(cmd, check=True)
    return json.loads(Path(out_json).read_text())


def ref_row(res):
    times = {}
    for b in res["batches"]:
        for k, v in b["times"].items():
            times[k] = times.get(k, 0.0) + v
    total = sum(times.values())
    s = res["edited"]["summary"]
    return {"Efficacy": s["efficacy"], "Generalization": s["generalization"], "Specificity": s["specificity"],
            "Fluency": None, "n": res["n_edits"], "s_per_edit": total / res["n_edits"],
            "share": {k: v / total for k, v in times.items()}}


def scale(args, records, log):
    """One NSE batch on the random-weight Llama-2-7B-shaped checkpoint: bf16 weights, fp32 compute.
    Reports seconds, peak RSS, and the bytes of C0 and Cp (5 layers of 11008^2 float32 each)."""
    import resource
    peak = {}                                    # high-water mark of RSS after each phase
    mark = lambda phase: peak.__setitem__(phase, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    t0 = time.perf_counter()
    model, tok = llama.load(args.scale_ckpt, dtype="bfloat16")          # on the CPU: fp32 compute
    t_load = time.perf_counter() - t0
    mark("load")
    layers = ([int(x) for x in args.scale_layers.split(",")] if args.scale_layers
              else nse.default_layers(model.config.num_hidden_layers))
    templates = nse.context_templates(model, tok, args.seed, n=args.scale_contexts) if args.scale_contexts else ["{}"]
    t = time.perf_counter()
    C0 = harness.load_or_compute_c0(model, tok, args.stats_text, layers, args.stats_tokens, args.cache_dir, nse.key_second_moment, log=log)
    n_tok = args.stats_tokens                     # C0 is read from the cache per layer when used
    t_c0 = time.perf_counter() - t
    mark("c0")
    d = nse.derive_scale_defaults(model, tok, records, templates, layers, C0)   # what the editor would
    mark("derive_defaults")                                                   # derive: a phase of its own
    hp = nse.Settings(layers=layers, lam=d["lam"], alpha=args.scale_alpha or d["alpha"], upper_bound=d["upper_bound"],
                      v_steps=args.v_steps, max_iterations=args.max_iterations, batch_size=len(records),
                      stats_tokens=args.stats_tokens, seed=args.seed)
    ed = nse.Editor(model, tok, hp, stats_text=args.stats_text, cache_dir=args.cache_dir)
    ed.contexts, ed.C0 = templates, C0          # this run's context prefixes, and the C0 computed above
    t = time.perf_counter()
    blog = ed.edit(records)[0]                  # one batch: all the records
    t_edit = time.perf_counter() - t
    timer = {k: v for k, v in ed.timer.items() if k != "stats"}
    state = ed.state
    mark("edit")
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts.values())
    res = {"ckpt": args.scale_ckpt, "layers": layers, "edits": len(records), "contexts": templates,
           "stats_tokens": n_tok, "v_steps": args.v_steps, "max_iterations": args.max_iterations, "hparams_derived": d, "seconds_load": t_load,
           "seconds_c0": t_c0, "seconds_edit": t_edit, "seconds_parts": timer,
           "alpha_used": ed.s.alpha, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_rss_bytes_after": peak,
           "c0_bytes": sum(nbytes({l: C0[l]}) for l in layers), "c0_held_in_memory": dict.__len__(C0) > 0,
           "cp_bytes": nbytes(state.Cp), "w0_bytes": nbytes(state.W0), "batch": blog,
           "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    data.atomic_write_text(Path(args.results) / f"nse_scale_7b{args.tag}.json", json.dumps(res, indent=1, default=str) + "\n")
    log(json.dumps({k: v for k, v in res.items() if k not in ("batch", "contexts")}, default=str))


def zcpu(args, records, log):
    """z optimisation, ours (batched, split at the subject) vs the reference (one request at a time),
    on the same edits, context templates and hyperparameters, one thread each, in one process:
    process CPU seconds, which a busy shared machine inflates far less than wall time."""
    import importlib.util
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("nse_reference", REF)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)                                 # sets torch to one thread
    R = ref.Runner(args.ckpt)
    ctx = json.loads((Path(args.ref_cache) / f"ref_nse_{args.ref_n}.json").read_text())["context_templates"]
    a = SimpleNamespace(layers=args.layers, lam=args.lam, v_lr=0.5, v_steps=args.v_steps, clamp=0.75, v_wd=0.5,
                        kl_factor=0.0625, alpha=args.alpha, upper=args.upper_bound, max_iter=3, threshold=1.0)
    hp_ref = ref.HP(a)
    reqs = [dict(case_id=i, subject=r.subject, template=r.prompt.replace(r.subject, "{}", 1),
                 target_new=" " + r.target_new.lstrip()) for i, r in enumerate(records)]
    c0, w0 = time.process_time(), time.perf_counter()
    ref_steps = [ref.compute_z(R, q, hp_ref, ctx, hp_ref.layers[-1])[1]["steps"] for q in reqs]
    ref_cpu, ref_wall = time.process_time() - c0, time.perf_counter() - w0
    model, tok = llama.load(args.ckpt)
    model.requires_grad_(False)
    hp = nse.Settings(layers=[int(x) for x in args.layers.split(",")], v_steps=args.v_steps)
    c0, w0 = time.process_time(), time.perf_counter()
    _, _, zlog = nse.compute_z(model, tok, records, ctx, hp)
    our_cpu, our_wall = time.process_time() - c0, time.perf_counter() - w0
    n = len(records)
    res = {"edits": n, "threads": torch.get_num_threads(), "templates": ctx,
           "reference": {"cpu_s_per_edit": ref_cpu / n, "wall_s_per_edit": ref_wall / n, "steps": ref_steps},
           "ours": {"cpu_s_per_edit": our_cpu / n, "wall_s_per_edit": our_wall / n, "steps": zlog["steps"]},
           "cpu_ratio": our_cpu / ref_cpu}
    data.atomic_write_text(Path(args.results) / f"nse_zcpu_n{n}.json", json.dumps(res, indent=1) + "\n")
    log(json.dumps(res))


def table(rows: dict) -> str:
    lines = ["| run | edits | Efficacy | Generalization | Specificity | Fluency | s/edit | time shares |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        sh = r.get("share") or {}
        shs = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sh.items())
        f = lambda k: "" if r.get(k) is None else f"{r[k]:.2f}"
        lines.append(f"| {name} | {r.get('n', '')} | {f('Efficacy')} | {f('Generalization')} | {f('Specificity')} | "
                     f"{f('Fluency')} | {f('s_per_edit')} | {shs} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="/work/models/smollm2", help="SmolLM2-135M-Instruct folder (HF layout)")
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-edit.json"))
    ap.add_argument("--stats-text", default=str(ROOT.parent / "shared/data/wikitext/wikitext-2-raw-test.txt"))
    ap.add_argument("--stats-tokens", type=int, default=200_000, help="tokens of the corpus for C0")
    ap.add_argument("--cache-dir", default="/tmp/nse-cache", help="C0 cache of nse.py")
    ap.add_argument("--ref-cache", default="/tmp/nseref", help="the reference's C0 / z caches and JSONs")
    ap.add_argument("--n", type=int, default=200, help="edits")
    ap.add_argument("--batch-size", type=int, default=20, help="edits per sequential batch")
    ap.add_argument("--eval-at", default="20,100,200", help="evaluate the edits so far after these many edits")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--lam", type=float, default=2500.0)
    ap.add_argument("--alpha", type=float, default=30.0)
    ap.add_argument("--upper-bound", type=float, default=200.0)
    ap.add_argument("--ref-n", type=int, default=20, help="edits given to the reference, one batch")
    ap.add_argument("--scale-ckpt", default="/work/scale/llama2-7b-random", help="--method scale: 7B-shaped checkpoint")
    ap.add_argument("--scale-contexts", type=int, default=0, help="--method scale: context prefixes besides the bare prompt")
    ap.add_argument("--scale-layers", default=None, help="--method scale: edited layers (default: nse.default_layers)")
    ap.add_argument("--scale-alpha", type=float, default=None, help="--method scale: alpha (default: derived)")
    ap.add_argument("--v-steps", type=int, default=25, help="z steps (the scale run uses fewer)")
    ap.add_argument("--max-iterations", type=int, default=3, help="NSE passes per batch")
    ap.add_argument("--method", choices=["nse", "memit", "unedited", "reference", "merge", "scale", "zcpu"], default="merge",
                    help="one worker per method (they can run side by side), then merge: the table")
    ap.add_argument("--no-fluency", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(ROOT / "bench/results"), help="folder of the JSONs")
    ap.add_argument("--tag", default="", help="suffix of this worker's JSON name (e.g. _n100)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)
    res_dir = Path(args.results)
    if args.method == "reference":
        for m in ("nse", "memit"):
            j = Path(args.ref_cache) / f"ref_{m}_{args.ref_n}.json"
            reference(args, m, str(j))
            shutil.copy(j, res_dir / f"nse_reference_{m}_{args.ref_n}.json")
        return
    if args.method == "merge":
        rows = {}
        for p in sorted(res_dir.glob("nse_smollm2_*_*.json")):
            rows.update(json.loads(p.read_text())["rows"])
        for m in ("nse", "memit"):
            j = res_dir / f"nse_reference_{m}_{args.ref_n}.json"      # copied from --ref-cache after a run
            j = j if j.exists() else Path(args.ref_cache) / f"ref_{m}_{args.ref_n}.json"
            if j.exists():
                r = json.loads(j.read_text())
                rows[f"{m} reference ({r['n_edits']} edits, own eval, 1 thread)"] = ref_row(r)
                if "unedited" in r:
                    s = r["unedited"]["summary"]
                    rows[f"unedited, reference eval ({r['n_edits']})"] = {
                        "Efficacy": s["efficacy"], "Generalization": s["generalization"],
                        "Specificity": s["specificity"], "n": r["n_edits"]}
        t = table(rows)
        for p in sorted(res_dir.glob("nse_zcpu_n*.json")):
            z = json.loads(p.read_text())
            t += (f"\n\nz optimisation alone, same {z['edits']} edits, templates and hyperparameters, one thread each, "
                  f"process CPU seconds per edit: ours {z['ours']['cpu_s_per_edit']:.2f}, reference "
                  f"{z['reference']['cpu_s_per_edit']:.2f} (ratio {z['cpu_ratio']:.2f}); steps {z['ours']['steps']} vs "
                  f"{z['reference']['steps']}")
        data.atomic_write_text(res_dir / "nse_smollm2.json", json.dumps({"rows": rows, "table": t}, indent=1) + "\n")
        print(t)
        return
    records = data.load_edits(args.edits, None, n=args.n, require_subject=True)
    if args.method == "scale":
        return scale(args, records, log)
    if args.method == "zcpu":
        return zcpu(args, records, log)
    model, tok = llama.load(args.ckpt)
    layers = [int(x) for x in args.layers.split(",")]
    out = res_dir / f"nse_smollm2_{args.method}{args.tag or '_n' + str(len(records))}.json"
    save = lambda: data.atomic_write_text(out, json.dumps(res, indent=1, default=str) + "\n")
    fl = not args.no_fluency
    eval_at = [int(x) for x in args.eval_at.split(",") if int(x) <= len(records)]
    if args.method == "unedited":
        templates = nse.context_templates(model, tok, args.seed)
        t = time.perf_counter()
        C0 = harness.load_or_compute_c0(model, tok, args.stats_text, layers, args.stats_tokens, args.cache_dir, nse.key_second_moment, log=log)
        res = {"args": vars(args), "templates": templates, "c0_seconds": time.perf_counter() - t, "rows": {}}
        res["derived_defaults"] = nse.derive_scale_defaults(model, tok, records[:args.batch_size], templates, layers, C0)
        log(f"derived defaults: {res['derived_defaults']}")
        for k in eval_at:
            t = time.perf_counter()
            res["rows"][f"unedited, first {k}"] = {**cf_eval(model, tok, records[:k], fl, args.seed), "n": 0,
                                                  "eval_s": time.perf_counter() - t}
            log(f"unedited first {k}: {res['rows'][f'unedited, first {k}']}")
            save()
        return
    # nse / memit: the editor (its context templates from --seed; C0 from --stats-text, cached in
    # --cache-dir, read on the first batch), fed one batch at a time so that the edits so far are
    # evaluated after the batches named by --eval-at. lambda / alpha / upper_bound are given: nothing
    # is derived. max_iterations stays nse.Settings' 3 (--max-iterations is the scale run's).
    hp = nse.Settings(method=args.method, layers=layers, batch_size=args.batch_size, lam=args.lam, alpha=args.alpha,
                      upper_bound=args.upper_bound, v_steps=args.v_steps, stats_tokens=args.stats_tokens,
                      seed=args.seed)
    ed = nse.Editor(model, tok, hp, stats_text=args.stats_text, cache_dir=args.cache_dir)
    res = {"args": vars(args), "templates": ed.contexts, "c0_seconds": None, "rows": {}}
    batches = ed.log                            # one row per batch: passes, z_steps, final_r, left_above_upper, ...
    for b in range(0, len(records), args.batch_size):
        blog = ed.edit(records[b:b + args.batch_size])[0]
        res["c0_seconds"] = ed.timer.get("stats")                        # C0: read or computed, first batch
        timer = {k: v for k, v in ed.timer.items() if k != "stats"}      # editing only: z, keys, solve, cp
        done = blog["n_done"]
        log(f"{args.method} batch {len(batches)}: {done} edits, {blog['seconds']:.1f} s, mean z steps "
            f"{sum(blog['z_steps']) / len(blog['z_steps']):.1f}, passes " + blog["note"])
        res["batches"], res["seconds"] = batches, timer
        if done in eval_at:
            total = sum(timer.values())
            t = time.perf_counter()
            row = cf_eval(model, tok, records[:done], fl, args.seed)
            row.update(n=done, s_per_edit=total / done, share={k: round(v / total, 4) for k, v in timer.items()},
                       left_above_upper=sum(len(x["left_above_upper"]) for x in batches),
                       mean_z_steps=sum(sum(x["z_steps"]) for x in batches) / done,
                       eval_s=time.perf_counter() - t)
            res["rows"][f"{args.method} (ours), after {done}"] = row
            log(f"{args.method} after {done}: " + json.dumps(row))
        save()


if __name__ == "__main__":
    main()
