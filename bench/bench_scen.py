"""Benchmark: SCEN (project defaults) vs FT vs the reference SCEN vs the unedited model, plus an
ablation from the paper's settings to the defaults, on one model and one set of sequential edits.

  python bench/bench_scen.py --ckpt SFT_DIR --edits d_edit.jsonl --loc d_loc.jsonl \
      --unrelated zsre_mend_train-1k.json --n 200 --out bench/results/scen_smollm2.json

Stages (--stages, comma separated; results are written after each one, so a killed run keeps
what it measured): unedited, scen, ft, ablation, ref, latency.
- Quality: eval.evaluate_qa after the last edit: Reliability (edit prompts), Generality (the
  rephrases), Locality (D_loc answers still correct; and unchanged vs the unedited model), each by
  generation exact match and teacher-forced token accuracy.
- "oracle" rows: every query of edit i forced to expert i (stage 1 alone, routing excluded).
- Time: seconds of edit 1 and of the last edit (median of the first/last 5 too), storage per
  edit (expert file + neuron row + cached feature), inference latency (10 new tokens, batch 1,
  median over queries) unedited vs with all experts loaded.
- Ablation: stage 1 is shared by variants with the same expert settings (experts are trained
  once per expert setting and reused), each variant re-runs stage 2 and the evaluation.
- ref: ../shared/peers/scen_reference.py as a subprocess (paper/code settings, its own
  selection of edits and ChatML template), on --ref-n edits (its stage 2 grows with t).
- latency: the saved edits of a scen.py run (--edits-dir) loaded, each query timed with and without
  the experts in alternation (robust to a machine whose load changes during the run).
Every variant is a scen.Editor on the one loaded model (token level, edit_ids: the ablation hands
it stage-1 experts trained by an earlier variant); ed.restore() gives the unedited model back.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import eval as ev  # noqa: E402
import harness  # noqa: E402
import llama  # noqa: E402
import scen  # noqa: E402

EXPERT_KEYS = ("expert_lr", "expert_steps", "expert_until", "expert_nll", "layer")

# The ablation: each row adds one change to the row above it, from the paper's settings (PAPER)
# to the project's defaults; then each default taken away (or changed) on its own.
CUMULATIVE = [("paper", {}),
              ("+expert until reproduced (lr 1e-3, cap 60)", dict(expert_lr=1e-3, expert_steps=60, expert_until=True)),
              ("+neuron until separated (lr 1e-2, cap 400)", dict(neuron_lr=1e-2, neuron_steps=400, neuron_until=True)),
              ("+centred/normalised features", dict(features="center-norm")),
              ("+neuron bias", dict(bias=True)),
              ("+unrelated prompts as negatives", dict(unrelated_neg=True)),
              ("+retrain old neurons that fire", dict(retrain=True)),
              ("+mean-pooled features", dict(pool="mean")),
              ("+layer at 0.8 depth instead of 20/32", dict(depth=0.8)),
              ("+neuron step cap 1500 instead of 400", dict(neuron_steps=1500)),
              ("+neuron lr 3e-2 instead of 1e-2 (= defaults)", dict(neuron_lr=3e-2))]
ABLATION, _acc = [], dict(scen.PAPER)
for _name, _over in CUMULATIVE:
    _acc = {**_acc, **_over}
    ABLATION.append((_name, dict(_acc)))
assert scen.Settings(**_acc) == scen.Settings(), "the last cumulative row must be the defaults"
ABLATION += [("defaults, --loss code", dict(loss="code")),
             ("defaults, last-token features", dict(pool="last")),
             ("defaults, raw features", dict(features="raw")),
             ("defaults without bias", dict(bias=False)),
             ("defaults without unrelated negatives", dict(unrelated_neg=False)),
             ("defaults without retrain", dict(retrain=False)),
             ("defaults, theta 0.55", dict(theta=0.55)),
             ("defaults, expert lr 3e-3", dict(expert_lr=3e-3)),
             ("defaults, layer at 20/32 depth (the paper's)", dict(depth=20 / 32)),
             # Locality levers at 200 edits (n_unrelated: how many of --unrelated's prompts are
             # loaded; needs --n-unrelated at least as large). Measured while the cap was 400 and
             # the neuron lr 1e-2.
             ("cap 400, 64 unrelated prompts", dict(n_unrelated=64, neuron_steps=400, neuron_lr=1e-2)),
             ("cap 400, 256 unrelated prompts", dict(n_unrelated=256, neuron_steps=400, neuron_lr=1e-2)),
             ("cap 400, 900 unrelated prompts", dict(n_unrelated=900, neuron_steps=400, neuron_lr=1e-2)),
             ("cap 400, 900 unrelated prompts, neg margin 0.45", dict(n_unrelated=900, neuron_steps=400, neuron_lr=1e-2, neg_margin=0.45)),
             ("cap 400, 900 unrelated prompts, theta 0.8, pos margin 0.1",
              dict(n_unrelated=900, neuron_steps=400, neuron_lr=1e-2, theta=0.8, pos_margin=0.1)),
             ("cap 1500, lr 1e-2, 900 unrelated prompts", dict(n_unrelated=900, neuron_lr=1e-2)),
             ("cap 1500, lr 1e-2, 900 unrelated prompts, theta 0.8, pos margin 0.1",
              dict(n_unrelated=900, neuron_lr=1e-2, theta=0.8, pos_margin=0.1)),
             ("defaults (cap 1500, lr 3e-2), 900 unrelated prompts", dict(n_unrelated=900))]


def cpu_figs(log: list[dict], k: int = 20) -> dict:
    """Mean CPU seconds per edit over the first and the last k edits of an edit log, and their ratio."""
    cpu = [r["cpu_seconds"] for r in log]
    k = min(k, len(cpu))
    return {"cpu_s_edit_first20_mean": round(sum(cpu[:k]) / k, 3), "cpu_s_edit_last20_mean": round(sum(cpu[-k:]) / k, 3),
            "cpu_last20_over_first20": round(sum(cpu[-k:]) / max(sum(cpu[:k]), 1e-9), 3)}


def atomic_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


class Bench:
    def __init__(self, a):
        self.a = a
        self.model, self.tok = llama.load(a.ckpt)
        self.tpl = data.template_for(self.tok, a.template, a.system)
        self.records = data.load_edits(a.edits, n=a.n)
        if not a.portability:
            for r in self.records:
                r.portability = []
        self.loc = [(r.prompt, r.target_new) for r in data.load_edits(a.loc, n=a.n_loc)] if a.loc else None
        edit_prompts = {r.prompt for r in self.records}
        unrel = [r.prompt for r in data.load_edits(a.unrelated)] if a.unrelated else \
            data.model_questions(self.model, self.tok, self.tpl, scen.N_UNRELATED)
        self.unrel = [p for p in unrel if p not in edit_prompts][:a.n_unrelated]   # the editor encodes them
        # prompt + target + end token of every edit, as scen.Editor.edit encodes them (token level:
        # run() calls edit_ids, which also takes an expert trained by an earlier variant)
        self.enc = [data.encode_prompt_target(self.tok, self.tpl, r.prompt, r.target_new, add_eos=True)
                    for r in self.records]
        self.expert_cache: dict = {}
        self.res = {"args": vars(a), "template": self.tpl.kind, "n_edits": len(self.records),
                    "n_loc": len(self.loc or []), "n_unrelated": len(self.unrel), "loadavg_start": os.getloadavg()}
        self.before = None

    def loc_queries(self):
        return [p for p, _ in (self.loc or [q for r in self.records for q in r.locality])]

    def save(self):
        self.res["loadavg_now"] = os.getloadavg()
        atomic_json(Path(self.a.out), self.res)

    def evaluate(self, ed=None):
        """QA figures of the unedited model, or of the model with ed's edits (its routing hook)."""
        t = time.perf_counter()
        em = ed.eval_model() if ed is not None else ev.LlamaEvalModel(self.model, self.tok, self.tpl)
        figs = ev.evaluate_qa(em, self.tok, self.tpl, self.records, loc_pairs=self.loc, before=self.before,
                              batch_size=self.a.batch_size)
        out = {k: round(v["value"], 2) for k, v in figs.items()}
        out["eval_s"] = round(time.perf_counter() - t, 1)
        return out

    def latency(self, prepare=None, queries=None):
        """Median seconds to generate 10 tokens (no early stop), batch 1."""
        em = ev.LlamaEvalModel(self.model, self.tok, self.tpl, prepare=prepare)
        times = []
        for q in queries[:self.a.latency_n]:
            ids = data.encode_prompt(self.tok, self.tpl, q)
            t = time.perf_counter()
            if prepare:
                prepare(None, None, torch.tensor([len(ids) - 1]))
            llama.generate(self.model, [ids], 10, eos_ids=[])
            times.append(time.perf_counter() - t)
        del em
        return statistics.median(times)

    # -- stages --------------------------------------------------------------------------------
    def unedited(self):
        self.before = ev.snapshot(self.model, self.tok, self.tpl, self.loc, batch_size=self.a.batch_size) if self.loc else None
        if self.a.snapshot_only:
            return
        self.res["unedited"] = self.evaluate()
        self.res["unedited"]["latency_10tok_edit_q_s"] = self.latency(queries=[r.prompt for r in self.records])
        self.res["unedited"]["latency_10tok_loc_q_s"] = self.latency(queries=self.loc_queries())

    def run(self, s: scen.Settings, out=None, reuse=True, log=True, n_unrelated=None):
        """Sequential edits with settings s on the model; returns (editor, per-edit seconds).
        The edits are saved in `out` (if given) after the last one.
        n_unrelated: use only the first n unrelated prompts (default all loaded: --n-unrelated)."""
        if n_unrelated is not None and n_unrelated > len(self.unrel):
            raise SystemExit(f"an ablation row asks for {n_unrelated} unrelated prompts; --n-unrelated "
                             f"loaded {len(self.unrel)}")
        ed = scen.Editor(self.model, self.tok, s, template=self.tpl,
                         unrelated=self.unrel[:n_unrelated or self.a.n_unrelated])
        ed.check(self.records)                       # what ed.edit(records) refuses, before any work
        key = tuple(getattr(ed.s, k) for k in EXPERT_KEYS)
        cached = self.expert_cache.get(key) if (reuse and s.method == "scen") else None
        secs = []
        t0 = time.perf_counter()
        for i, e in enumerate(self.enc):             # ed.edit(records), one edit at a time, with the cached experts
            r = ed.edit_ids(e.ids, e.target_start, {"prompt": self.records[i].prompt},
                            expert=cached[i] if cached else None)
            secs.append(r["seconds"])
            if log and (i < 3 or (i + 1) % 20 == 0 or i + 1 == len(self.enc)):
                el = time.perf_counter() - t0
                print(f"  edit {i + 1}/{len(self.enc)} {r['seconds']:.2f} s  elapsed {el:.0f} s  "
                      f"ETA {el / (i + 1) * (len(self.enc) - i - 1):.0f} s", flush=True)
        if s.method == "scen" and not cached:
            self.expert_cache[key] = list(ed.router.experts)
        if out:
            ed.save(out)
        return ed, secs

    def time_figs(self, secs, ed, out):
        f = {"s_edit_first": round(secs[0], 2), "s_edit_last": round(secs[-1], 2),
             "s_edit_first5_median": round(statistics.median(secs[:5]), 2),
             "s_edit_last5_median": round(statistics.median(secs[-5:]), 2), "s_edit_mean": round(sum(secs) / len(secs), 2)}
        if ed.log and "cpu_seconds" in ed.log[0]:            # CPU seconds: robust to other jobs
            f.update(cpu_figs(ed.log))
            f["per_edit_cpu_s_neuron_steps_retrained"] = [(round(r["cpu_seconds"], 3), r.get("neuron_steps"),
                                                          len(r.get("retrained", []))) for r in ed.log]
        if ed.log and "expert_steps" in ed.log[0]:
            f["expert_steps_mean"] = round(sum(r["expert_steps"] for r in ed.log) / len(ed.log), 1)
        if ed.log and "neuron_steps" in ed.log[0]:
            f["neuron_steps_mean"] = round(sum(r["neuron_steps"] for r in ed.log) / len(ed.log), 1)
            f["retrained_total"] = sum(len(r["retrained"]) for r in ed.log)
        if out:
            e = Path(out) / "experts" / "expert_00001.safetensors"
            F_ = ed.mu.numel()
            f["storage_per_edit_bytes"] = (e.stat().st_size if e.exists() else 0) + 2 * F_ * 4 + 4
            f["storage_expert_file_bytes"] = e.stat().st_size if e.exists() else 0
            f["out_dir_bytes"] = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        return f

    def oracle(self, ed):
        """Rel/Gen with every query of edit i forced to expert i (stage 1 alone)."""
        by_prompt = {}
        for i, r in enumerate(self.records):
            for q in [r.prompt] + r.rephrases[:3]:
                by_prompt[tuple(data.encode_prompt(self.tok, self.tpl, q))] = i

        def prepare(tokens, mask, prompt_end):
            rows = []
            for b in range(tokens.shape[0]):
                ids = tokens[b][mask[b].bool()].tolist() if mask is not None else tokens[b].tolist()
                n = int(prompt_end[b]) + 1 - int((mask[b] == 0).sum()) if mask is not None and mask[b, 0] == 0 else int(prompt_end[b]) + 1
                rows.append(by_prompt.get(tuple(ids[:n]), -1))
            ed.router.route_at(prompt_end, force=torch.tensor(rows))
        em = ev.LlamaEvalModel(self.model, self.tok, self.tpl, prepare=prepare)
        figs = ev.evaluate_qa(em, self.tok, self.tpl, self.records, loc_pairs=None, batch_size=self.a.batch_size)
        return {k: round(v["value"], 2) for k, v in figs.items() if k.startswith(("Reliability", "Generality"))}

    def scen_default(self):
        with tempfile.TemporaryDirectory() as out:
            print("SCEN defaults", flush=True)
            ed, secs = self.run(scen.Settings(seed=0), out)
            r = self.evaluate(ed)
            r.update(self.time_figs(secs, ed, out))
            r["settings"] = asdict(ed.s)
            if self.a.oracle:
                r["oracle"] = self.oracle(ed)
            r["latency_10tok_edit_q_s"] = self.latency(ed.prepare, [x.prompt for x in self.records])
            r["latency_10tok_loc_q_s"] = self.latency(ed.prepare, self.loc_queries())
            r["n_experts"] = len(ed.router.experts)
            self.res["scen"] = r
            ed.restore()                                 # the unedited model again

    def ft(self):
        print("FT", flush=True)
        ed, secs = self.run(scen.Settings(method="ft"))
        r = self.evaluate(ed)
        r.update(self.time_figs(secs, ed, None))
        self.res["ft"] = r
        ed.restore()

    def ablation(self):
        self.res.setdefault("ablation", {})
        n, k = self.a.abl_n, self.a.abl_loc
        full, fenc, floc, fbefore = self.records, self.enc, self.loc, self.before
        self.records, self.enc = full[:n], fenc[:n]
        if floc:
            self.loc = floc[:k]
            self.before = ev.Snapshot(pairs=fbefore["pairs"][:k], texts=fbefore["texts"][:k],
                                      argmax=fbefore["argmax"][:k]) if fbefore else None
        self.res["ablation_sizes"] = {"edits": len(self.records), "loc": len(self.loc or [])}
        try:
            rows = [ABLATION[int(i)] for i in self.a.abl_rows.split(",")] if self.a.abl_rows else ABLATION
            for name, over in rows:
                if name in self.res["ablation"]:
                    continue
                print("ablation:", name, flush=True)
                over = dict(over)
                n_unrel = over.pop("n_unrelated", None)
                ed, secs = self.run(replace(scen.Settings(), **over), log=False, n_unrelated=n_unrel)
                r = self.evaluate(ed)
                r.update(self.time_figs(secs, ed, None))
                if name in ("paper", "+expert until reproduced (lr 1e-3, cap 60)") or "expert" in name or "layer" in name:
                    r["oracle"] = self.oracle(ed)
                r["fired_own_on_edit"] = sum(x["routed_to"] == i for i, x in enumerate(ed.log))
                r["n_unrelated"] = len(ed.U_unrel)
                self.res["ablation"][name] = r
                ed.restore()
                self.save()
        finally:
            self.records, self.enc, self.loc, self.before = full, fenc, floc, fbefore

    def latency_interleaved(self):
        """Inference overhead with the experts of a saved run (--edits-dir, written by scen.py --out),
        and that run's per-edit CPU seconds (first 20 vs last 20 edits) from its log:
        10 new tokens, batch 1, each query timed with the original down projection and with the
        routed one in alternation (repeated --latency-rounds times), so that a change of machine
        load hits both alike. Reported: medians and their ratio, for edit prompts (routed to an
        expert) and for D_loc prompts (mostly unrouted)."""
        d = Path(self.a.edits_dir)
        try:
            ed = scen.Editor.load(d, self.model, self.tok)
            st = harness.read_state(d, "scen", "expert")["meta"]
        except (KeyError, FileNotFoundError) as e:       # a folder written by an older scen.py
            raise SystemExit(f"{d}: scen.Editor.load cannot read these edits ({type(e).__name__}: {e}); "
                             f"they were saved by an older scen.py: make them again with scen.py --out")
        if ed.template.kind != self.tpl.kind:
            print(f"latency: the edits were made with template {ed.template.kind}, the queries are "
                  f"asked with {self.tpl.kind} (--template)", flush=True)
        s = ed.s
        layer = self.model.layers[s.layer].mlp
        out = {"n_experts": len(ed.router.experts)}
        for kind, queries in (("edit", [r.prompt for r in self.records]), ("loc", self.loc_queries())):
            base_t, routed_t = [], []
            for q in queries[:self.a.latency_n]:
                ids = data.encode_prompt(self.tok, self.tpl, q)
                for _ in range(self.a.latency_rounds):
                    for mod, acc in ((ed.base, base_t), (ed.router, routed_t)):
                        layer.down_proj = mod
                        t = time.perf_counter()
                        if mod is ed.router:
                            ed.prepare(None, None, torch.tensor([len(ids) - 1]))
                        llama.generate(self.model, [ids], 10, eos_ids=[])
                        acc.append(time.perf_counter() - t)
            layer.down_proj = ed.router
            out[kind] = {"unedited_median_s": statistics.median(base_t), "scen_median_s": statistics.median(routed_t),
                         "ratio": statistics.median(routed_t) / statistics.median(base_t), "timings": len(base_t)}
        ed.restore()
        log = st["log"]                                  # per-edit cost of that run, from its own log
        if log and "cpu_seconds" in log[0]:
            k = min(20, len(log))
            out["per_edit"] = {"edits": len(log), "n_unrelated": len(st["unrelated"]),
                               "cpu_s_edit_1": log[0]["cpu_seconds"], "cpu_s_edit_last": log[-1]["cpu_seconds"],
                               **cpu_figs(log),
                               "expert_steps_first20_mean": sum(r["expert_steps"] for r in log[:k]) / k,
                               "expert_steps_last20_mean": sum(r["expert_steps"] for r in log[-k:]) / k,
                               "wall_s_mean": sum(r["seconds"] for r in log) / len(log)}
        self.res["latency_interleaved"] = out
        print("latency", json.dumps(out), flush=True)

    def ref(self):
        peers = ROOT.parent / "shared" / "peers" / "scen_reference.py"
        n = self.a.ref_n
        with tempfile.TemporaryDirectory() as wd:
            out = Path(wd) / "ref.json"
            cmd = [sys.executable, str(peers), "--model", self.a.ref_model or self.a.ckpt, "--data", self.a.ref_data,
                   "--n-edits", str(n), "--n-select", str(n), "--n-loc", str(self.a.ref_loc), "--probe-t", "",
                   "--workdir", str(Path(wd) / "work"), "--out", str(out)]
            print("reference:", " ".join(cmd), flush=True)
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                self.res["ref"] = {"error": p.stderr[-2000:]}
                return
            d = json.loads(out.read_text())
        log = d["edit_log"]
        per = [x["stage1_s"] + x["stage2_s"] for x in log]
        summ = {}
        for key in ("base_eval", "scen_eval", "ft_eval"):
            e = d.get(key, {})
            summ[key] = {k: v for k, v in e.items() if k != "items"}
        self.res["ref"] = {"n_edits": len(log), "s_edit_first": round(per[0], 2), "s_edit_last": round(per[-1], 2),
                           "wall_s": round(time.perf_counter() - t, 1), "eval": summ,
                           "latency": d.get("latency_s_10_tokens"), "storage": d.get("storage"),
                           "ft_edit_s_first_last": [d["ft_edit_s"][0], d["ft_edit_s"][-1]] if d.get("ft_edit_s") else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="model (after SFT) in the Hugging Face layout")
    ap.add_argument("--edits", required=True, help="D_edit records (sequential edits, in order)")
    ap.add_argument("--loc", help="D_loc records (Locality pairs)")
    ap.add_argument("--unrelated", help="records whose prompts centre the features / are negatives (e.g. the SFT train set)")
    ap.add_argument("--n", type=int, default=200, help="number of sequential edits")
    ap.add_argument("--n-loc", type=int, default=200, help="number of Locality pairs")
    ap.add_argument("--n-unrelated", type=int, default=900, help="number of unrelated prompts (the first "
                    "n of --unrelated that are not edit prompts; 64 in the earlier runs)")
    ap.add_argument("--abl-n", type=int, default=100, help="edits per ablation variant")
    ap.add_argument("--abl-loc", type=int, default=100, help="Locality pairs per ablation variant")
    ap.add_argument("--abl-rows", default=None, help="comma-separated indices into ABLATION (default all)")
    ap.add_argument("--portability", action="store_true", help="also evaluate the records' portability pairs")
    ap.add_argument("--snapshot-only", action="store_true", help="unedited stage: only the Locality snapshot")
    ap.add_argument("--oracle", type=int, default=1, help="1: also measure Rel/Gen with forced experts (slow)")
    ap.add_argument("--template", default="auto", help="auto | llama2 | chatml | raw")
    ap.add_argument("--system", default=None, help="chatml system message ('' = empty turn, as bench_sft_zsre)")
    ap.add_argument("--stages", default="unedited,scen,ft,ablation,ref", help="comma-separated stages")
    ap.add_argument("--ref-n", type=int, default=20, help="edits for the reference (its cost grows with t)")
    ap.add_argument("--ref-loc", type=int, default=50, help="locality queries for the reference")
    ap.add_argument("--ref-model", default=None, help="model for the reference (default --ckpt)")
    ap.add_argument("--ref-data", default=str(ROOT.parent / "shared/data/zsre/zsre_mend_edit.json"),
                    help="MEND ZsRE file the reference selects its edits from")
    ap.add_argument("--latency-n", type=int, default=10, help="queries timed for latency")
    ap.add_argument("--latency-rounds", type=int, default=3, help="latency stage: timings per query and model")
    ap.add_argument("--edits-dir", help="latency stage: a folder of edits saved by scen.py --out")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scen_smollm2.json"), help="results JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b = Bench(a)
    if Path(a.out).exists():                         # keep what an earlier (killed) run measured
        old = json.loads(Path(a.out).read_text())
        if old.get("args", {}).get("edits") == a.edits and old.get("n_edits") == len(b.records):
            b.res.update({k: v for k, v in old.items() if k in ("scen", "ft", "ablation", "ref", "latency_interleaved")})
    stages = a.stages.split(",")
    for st in ["unedited", "scen", "ft", "ablation", "ref", "latency"]:
        if st in stages or (st == "unedited" and b.loc and "ablation" in stages):
            t = time.perf_counter()
            print(f"== {st}", flush=True)
            {"unedited": b.unedited, "scen": b.scen_default, "ft": b.ft, "ablation": b.ablation, "ref": b.ref,
             "latency": b.latency_interleaved}[st]()
            b.res.setdefault("stage_s", {})[st] = round(time.perf_counter() - t, 1)
            b.save()
    print(json.dumps({k: v for k, v in b.res.items() if k not in ("args",)}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
