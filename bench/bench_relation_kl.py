"""bench_relation_kl.py: NSE's z with KL rows that ask the subject's other relations (issue: edits that
stay on their relation), one CLI run per setting, tuned on counterfact-train (not the records reported on).

Each variant is `nse.py --kl-relations N --kl-factor F ...` on the first --n records of
counterfact-train.json in batches of 20, C0 from WikiText-2; a finished run folder is read, not rerun
(z of the paper's settings comes from the z cache). Writes bench/results/relation_kl_train<n>.json and
prints the table (Efficacy / Generalization / Specificity, relation specificity both ways, s/edit).

    python bench/bench_relation_kl.py --ckpt SMOLLM2 --runs /work/runs/relkl
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "bench"))

# name -> extra nse.py flags; the first is the paper's objective
VARIANTS = {
    "kr0_kf0.0625": [],
    "kr8_kf0.0625": ["--kl-relations", "8"],
    "kr8_kf0.25": ["--kl-relations", "8", "--kl-factor", "0.25"],
    "kr8_kf1.0": ["--kl-relations", "8", "--kl-factor", "1.0"],
    "kr8_kf1.0_vs60": ["--kl-relations", "8", "--kl-factor", "1.0", "--v-steps", "60"],
    "kr8_kf4.0": ["--kl-relations", "8", "--kl-factor", "4.0"],
}
COLS = ["Efficacy", "Generalization", "Specificity", "Relation specificity (unchanged, tf)",
        "Relation specificity (own > new)", "s/edit (mean)"]


def table(res: dict) -> str:
    lines = ["| z objective (NSE) | " + " | ".join(c.replace("Relation specificity", "Rel. spec.") for c in COLS) + " |",
             "|" + "---|" * (len(COLS) + 1)]
    u = res["unedited"]
    lines.append("| unedited | " + " | ".join(f"{u[c]:.1f}" if c in u else "" for c in COLS) + " |")
    for name, e in res["variants"].items():
        label = " ".join(f"`{f}`" if f.startswith("--") else f for f in VARIANTS.get(name, [name])) or "the paper's objective"
        lines.append(f"| {label} | " + " | ".join(f"{e[c]:.1f}" if c in e else "" for c in COLS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(Path.home() / ".cache/llama-edit-bench/smollm2"), help="SmolLM2-135M-Instruct")
    p.add_argument("--n", type=int, default=40, help="records of counterfact-train.json")
    p.add_argument("--runs", default=str(Path.home() / ".cache/llama-edit-bench/runs/relkl"), help="run folders")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, str(ROOT / "nse.py"), "--ckpt", a.ckpt, "--n", str(a.n), "--batch-size", "20",
            "--edits", str(SHARED / "data/counterfact/counterfact-train.json"), "--no-fluency",
            "--stats-text", str(SHARED / "data/wikitext/wikitext-2-raw-test.txt"), "--threads", str(a.threads)]
    res = {"protocol": f"NSE, first {a.n} records of counterfact-train.json, batches of 20, derived defaults, "
                       "C0 from WikiText-2; Efficacy / Generalization / Specificity: CounterFact's NLL comparisons; "
                       "relation specificity: data.relation_probes (4 prompts per edit asking other relations)",
           "variants": {}, "commands": {}}
    import bench_long
    import run                                           # the README tables' reader of results.json
    res["machine"] = bench_long.machine(a.threads)
    for name in a.variants.split(","):
        out = runs / name
        cmd = base + VARIANTS[name] + ["--out", str(out)]
        if not (out / "results.json").exists():
            resume = ["--resume"] if (out / "run.json").exists() else []
            with open(runs / f"{name}.log", "a") as f:
                subprocess.run(cmd + resume, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)
        u, e = run.harness_figures(json.loads((out / "results.json").read_text()))
        res["unedited"], res["variants"][name] = u, e
        res["commands"][name] = " ".join(["nse.py"] + cmd[2:])
    path = ROOT / "bench/results" / f"relation_kl_train{a.n}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"\n{path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
