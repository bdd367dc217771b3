"""Routing-only lab for SCEN's stage 2: where do the indexing neurons send each query?

Stage 1 (the experts) costs most of an edit; the routing decision needs none of it. This bench runs
scen.Editor's stage 2 alone (the same add_neuron, retraining and routing code as scen.py) over the
edits in order, on features computed once, then asks for every query which expert it would reach:

  zsre  edit prompts (should reach their own expert: the ceiling of Reliability), rephrases (own
        expert: of Generality), D_loc questions (no expert: of Locality unchanged);
  hall  the hallucination task of bench_hallucination.py: edited passages (own expert),
        WikiBio-A passages and OWT openings (no expert: an unrouted query is the unedited model).

A variant is a set of scen.Settings overrides (JSON); each prints one row in seconds, not hours:

  python bench/bench_routing.py --task zsre --ckpt SFT --edits d_edit.jsonl --loc d_loc.jsonl \
      --unrelated zsre_mend_train-1k.json --variants '{"defaults": {}, "theta .8": {"theta": 0.8}}'

The figures are routing rates, not the end metrics: an edit reached by its expert is answered as
the expert was trained (stage 1 reproduces every edit: see the oracle rows of bench_scen.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import llama  # noqa: E402
import scen  # noqa: E402

SHARED = ROOT.parent / "shared"


def load_task(a, tok, model):
    """(template, edit encodings, {query set: [(prompt, expected expert or -1)]}, unrelated prompts)."""
    if a.task == "zsre":
        tpl = data.template_for(tok, "chatml", "")
        recs = data.load_edits(a.edits, n=a.n)
        loc = [r.prompt for r in data.load_edits(a.loc)] if a.loc else []
        unrel = [r.prompt for r in data.load_edits(a.unrelated)] if a.unrelated else \
            data.model_questions(model, tok, tpl, scen.N_UNRELATED)
        sets = {"edit": [(r.prompt, i) for i, r in enumerate(recs)],
                "rephrase": [(q, i) for i, r in enumerate(recs) for q in r.rephrases],
                "loc": [(p, -1) for p in loc]}
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_hallucination
        tpl = data.Template("raw")
        recs, acc, pairs, unrel = bench_hallucination.load_task(a.shared, a.n)
        subjects = {r.subject.lower() for r in recs}
        same = [r.subject and r.subject.lower() in subjects for r in acc]     # a passage about an edited person
        sets = {"edit": [(r.prompt, i) for i, r in enumerate(recs)],
                "WikiBio-A": [(r.prompt, -1) for r in acc],
                "WikiBio-A, edited person": [(r.prompt, -1) for r, m in zip(acc, same) if m],
                "WikiBio-A, other person": [(r.prompt, -1) for r, m in zip(acc, same) if not m],
                # own_neg=prefixes makes negatives of the edit prompts' earlier sentences, and some
                # WikiBio-A prompts are exactly such a prefix: this set leaves them out
                "WikiBio-A, not an edit prompt's prefix": [(r.prompt, -1) for r in acc if not any(
                    e.prompt.startswith(r.prompt) for e in recs)],
                "OWT": [(p, -1) for p, _ in pairs["OWT"]]}
    edit_prompts = {r.prompt for r in recs}
    unrel = [p for p in unrel if p not in edit_prompts][:a.n_unrelated]
    # prompt + target + end token, as scen.Editor.edit encodes an edit (here given to edit_ids)
    enc = [data.encode_prompt_target(tok, tpl, r.prompt, r.target_new, add_eos=True) for r in recs]
    return tpl, recs, enc, [r.target_new.strip().lower() for r in recs], sets, unrel


def run_variant(model, tok, tpl, recs, enc, targets, sets, unrel_ids, s: scen.Settings, feat_cache: dict):
    """Stage 2 over all edits (no experts), then the routing of every query set."""
    ed = scen.Editor(model, tok, s, template=tpl, unrelated=unrel_ids)
    key = (ed.s.layer, ed.s.pool)
    t0 = time.perf_counter()
    for r, e in zip(recs, enc):    # stage 2 alone: the base weight stands in for the expert (never run)
        ed.edit_ids(e.ids, e.target_start, expert=ed.base.weight, negatives=ed.own_negatives(r))
    stage2_s = time.perf_counter() - t0
    row = {"own_at_edit_%": 100.0 * sum(r["routed_to"] == t for t, r in enumerate(ed.log)) / len(enc),
           "neuron_steps_mean": sum(r["neuron_steps"] for r in ed.log) / len(enc),
           "neuron_capped": sum(r["neuron_steps"] >= ed.s.neuron_steps for r in ed.log),
           "retrained": sum(len(r["retrained"]) for r in ed.log), "stage2_s": round(stage2_s, 1),
           "own_negatives": sum(r["own_negatives"] for r in ed.log),
           "not_own_at_edit": [(t, r["routed_to"], round(r["a_own"], 3), r["neuron_steps"])
                               for t, r in enumerate(ed.log) if r["routed_to"] != t]}
    for name, qs in sets.items():
        if not qs:                 # e.g. no --loc: nothing to route
            continue
        if (key, name) not in feat_cache:
            feat_cache[(key, name)] = ed.prompt_features([data.encode_prompt(tok, tpl, p) for p, _ in qs])
        got = ed.router.pick(feat_cache[(key, name)])
        want = torch.tensor([e for _, e in qs])
        row[f"{name}_right_%"] = round(100.0 * (got == want).float().mean().item(), 2)
        if (want >= 0).any():
            # an edit routed to another edit's expert with the same target is still answered right
            same = [int(g) >= 0 and targets[int(g)] == targets[int(w)] for g, w in zip(got, want)]
            row[f"{name}_same_target_%"] = round(100.0 * sum(same) / len(same), 2)
            row[f"{name}_unrouted_%"] = round(100.0 * (got[want >= 0] < 0).float().mean().item(), 2)
            if name == "edit":                   # which edits go astray, and where
                row["edit_misrouted"] = [(int(w), int(g), targets[int(w)], targets[int(g)] if g >= 0 else None)
                                         for g, w in zip(got, want) if g != w]
        else:
            row[f"{name}_routed_%"] = round(100.0 * (got >= 0).float().mean().item(), 2)
    ed.restore()                   # the unedited model for the next variant
    return row


HALL_COLUMNS = [("edits reach their own expert", "edit_right_%"), ("WikiBio-A routed", "WikiBio-A_routed_%"),
                ("A, edited person", "WikiBio-A, edited person_routed_%"),
                ("A, other person", "WikiBio-A, other person_routed_%"),
                ("A, not an edit prompt's prefix", "WikiBio-A, not an edit prompt's prefix_routed_%"),
                ("OWT routed", "OWT_routed_%"), ("neurons at the step cap", "neuron_capped"),
                ("stage 2 s", "stage2_s")]


def hall_table(res: dict) -> str:
    """The hallucination task's routing, one row per variant (README: hall-levers-table)."""
    size = res.get("sizes", {})
    head = [f"{name} ({size[k.rsplit('_', 2)[0]]})" if k.rsplit("_", 2)[0] in size and k.endswith("%") else name
            for name, k in HALL_COLUMNS]
    lines = ["| variant | scen.Settings | " + " | ".join(head) + " |", "|" + "---|" * (len(HALL_COLUMNS) + 2)]
    for name, row in res.get("rows", {}).items():
        cells = [("" if row.get(k) is None else f"{row[k]:.1f}" if k.endswith("%") else f"{row[k]:g}")
                 for _, k in HALL_COLUMNS]
        over = ", ".join(f"{k} {v}" for k, v in row.get("settings", {}).items()) or "-"
        lines.append(f"| {name} | {over} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["zsre", "hall"], default="zsre")
    ap.add_argument("--ckpt", required=True, help="model folder (HF layout)")
    ap.add_argument("--edits", help="zsre: edits file (D_edit)")
    ap.add_argument("--loc", help="zsre: locality questions (D_loc)")
    ap.add_argument("--unrelated", help="zsre: unrelated questions (default: 1000 the model writes, data.model_questions)")
    ap.add_argument("--shared", default=str(SHARED), help="hall: the shared/ folder")
    ap.add_argument("--n", type=int, default=200, help="edits")
    ap.add_argument("--n-unrelated", type=int, default=900, help="unrelated prompts (the CLI's advice: ~1000)")
    ap.add_argument("--variants", default='{"defaults": {}}', help="JSON {name: scen.Settings overrides}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="results JSON (rows are added to it)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = json.loads(a.variants)
    model, tok = llama.load(a.ckpt)
    tpl, recs, enc, targets, sets, unrel = load_task(a, tok, model)
    unrel_ids = [data.encode_prompt(tok, tpl, p) for p in unrel]
    out = Path(a.out) if a.out else None
    res = json.loads(out.read_text()) if out and out.exists() else {}
    res["sizes"] = {**res.get("sizes", {}), **{k: len(v) for k, v in sets.items()}, "unrelated": len(unrel_ids)}
    cache: dict = {}
    for name, over in variants.items():
        row = run_variant(model, tok, tpl, recs, enc, targets, sets, unrel_ids, replace(scen.Settings(), **over), cache)
        res.setdefault("rows", {})[name] = dict(row, settings=over)
        print(name, json.dumps(row), flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            data.atomic_write_text(out, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
