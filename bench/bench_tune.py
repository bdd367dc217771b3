"""
bench_tune.py: settings of the MEMIT family chosen on counterfact-TRAIN (never on the records the
tables report), each configuration one nse.py run of 200 sequential edits in batches of 20 on
SmolLM2-135M-Instruct, C0 from WikiText-2 (issue: baselines as the papers ran them).

    python bench/bench_tune.py --only kl_p0_p,kl_p_p0          # the KL direction of z's objective (NSE)
    python bench/bench_tune.py --only alphaedit_t1e-2          # AlphaEdit's null-space threshold
    python bench/bench_tune.py --table                         # the table from the JSONs

Each run goes through the CLI with --out under --runs (resumed with --resume after a kill); its
results.json is copied to bench/results/tune/<name>.json, with the derived settings in its notes.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "tune"

COMMON = ("--edits {shared}/data/counterfact/counterfact-train.json --n 200 --batch-size 20 --threads 1 "
          "--no-fluency --stats-text {shared}/data/wikitext/wikitext-2-raw-test.txt")
CONFIGS = {   # name: (flags, what it measures)
    "kl_p0_p": ("--method nse --kl-direction p0_p", "NSE, z's KL term KL(p0 || p_delta) (this project's so far)"),
    "kl_p_p0": ("--method nse --kl-direction p_p0", "NSE, z's KL term KL(p_delta || p0) (the official code's)"),
    "alphaedit_mean": ("--method alphaedit", "AlphaEdit, null space below the mean eigenvalue of C0 (default)"),
    "alphaedit_t1e-2": ("--method alphaedit --nullspace-threshold 1e-2", "AlphaEdit, null space below 1e-2"),
    "alphaedit_t5e-3": ("--method alphaedit --nullspace-threshold 5e-3", "AlphaEdit, null space below 5e-3"),
}


def run(name: str, args) -> Path:
    flags, _ = CONFIGS[name]
    out = Path(args.runs) / name
    argv = [sys.executable, "nse.py", "--ckpt", args.ckpt, *COMMON.format(shared=SHARED).split(), *flags.split(),
            "--out", str(out)] + (["--resume"] if (out / "run.json").exists() else [])
    with open(Path(args.runs) / f"{name}.log", "a") as log:
        subprocess.run(argv, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.json", OUT / f"{name}.json")
    return OUT / f"{name}.json"


def table() -> str:
    cols = ["Efficacy", "Generalization", "Specificity", "Relation specificity (unchanged, tf)", "Relation specificity (own > new)"]
    lines = ["| run | what | " + " | ".join(cols) + " | s/edit |", "|---|---|" + "---|" * (len(cols) + 1)]
    for name, (_, what) in CONFIGS.items():
        p = OUT / f"{name}.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())["results"]
        sec = next(k for k in r if k != "unedited")
        cell = lambda k: f"{r[sec][k]['value']:.1f}" if k in r[sec] else "-"
        lines.append(f"| {name} | {what} | " + " | ".join(cell(c) for c in cols) + f" | {cell('s/edit (mean)')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="/work/models/smollm2", help="SmolLM2-135M-Instruct folder")
    p.add_argument("--runs", default="/work/runs/tune", help="run folders (outside the repository)")
    p.add_argument("--only", help="comma-separated configuration names (default: all)")
    p.add_argument("--table", action="store_true", help="print the table from the JSONs and stop")
    args = p.parse_args()
    if args.table:
        return print(table())
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    for name in (args.only.split(",") if args.only else CONFIGS):
        if name not in CONFIGS:
            raise SystemExit(f"--only {name}: one of {', '.join(CONFIGS)}")
        print(f"{name}: {run(name, args)}", flush=True)
    print(table())


if __name__ == "__main__":
    main()
