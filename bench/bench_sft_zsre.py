"""Bench: the editing protocol's first step on a real model, and the unedited CounterFact figures.

1. SFT of SmolLM2-135M-Instruct on ZsRE train (../shared/data/zsre/zsre_mend_train-1k.json,
   target = answers[0]) with train_sft.train: loss on answer tokens + <|im_end|>.
2. Train accuracy and test accuracy (generation exact match, SCEN's protocol) on
   zsre_mend_edit.json; the test records split into D_edit (answered wrongly) and D_loc
   (answered rightly), SCEN App. A, written as JSONL for the SCEN bench.
3. The unedited SmolLM2 (the original checkpoint, not the SFT one) on the first 500 records of
   counterfact-edit.json: Efficacy / Generalization / Specificity (mean per-token NLL of
   target_new vs target_true, raw completion prompts).

Template: ChatML, the checkpoint's own chat format, WITHOUT a system turn:
"<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>". SmolLM2 was
instruction-tuned in ChatML, so its own format is the natural analogue of the paper's [INST]
format on Llama-2-chat; the default system prompt is left out (as ../shared/peers/scen_reference.py
does) because it would add ~20 identical tokens to every query: slower, and SCEN's routing
features at the last prompt token would be even more dominated by the shared template.

Large outputs (the SFT checkpoint, checkpoints for --resume, D_edit/D_loc) go to --work
(default $EDIT_BENCH_WORK or ~/.cache/llama-edit-bench/sft_zsre); the figures go to
bench/results/bench_sft_zsre.json.

    python bench/bench_sft_zsre.py --ckpt /work/models/smollm2 --threads 1 [--resume]
(make the checkpoint with: python ../shared/tools/smollm2_from_gguf.py DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import eval as evaluation  # noqa: E402
import llama  # noqa: E402
import train_sft  # noqa: E402

SHARED = ROOT.parent / "shared"


def main(argv=None):
    ap = argparse.ArgumentParser(description="SFT SmolLM2 on ZsRE train-1k, D_edit/D_loc split on "
                                             "zsre_mend_edit, unedited CounterFact metrics.")
    ap.add_argument("--ckpt", required=True, help="SmolLM2-135M-Instruct folder (HF layout)")
    ap.add_argument("--shared", default=str(SHARED), help="the shared/ folder with data/")
    ap.add_argument("--work", default=os.environ.get("EDIT_BENCH_WORK",
                                                     str(Path.home() / ".cache" / "llama-edit-bench" / "sft_zsre")),
                    help="folder for the SFT checkpoint, resume state and D_edit/D_loc")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_sft_zsre.json"),
                    help="figures (JSON)")
    ap.add_argument("--epochs", type=int, default=2, help="SFT epochs")
    ap.add_argument("--batch-size", type=int, default=8, help="SFT sequences per step")
    ap.add_argument("--lr", type=float, default=1e-4, help="SFT peak learning rate")
    ap.add_argument("--n-train", type=int, default=None, help="first N train records (default all 1000)")
    ap.add_argument("--n-test", type=int, default=None, help="first N test records (default all 1037)")
    ap.add_argument("--cf-n", type=int, default=500, help="CounterFact records")
    ap.add_argument("--batch-size-eval", type=int, default=32, help="queries per evaluation batch")
    ap.add_argument("--save-every", type=int, default=25, help="SFT checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted SFT in --work")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 if other jobs run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    work = Path(args.work)
    t_all = time.perf_counter()
    train_recs = data.load_edits(shared / "data/zsre/zsre_mend_train-1k.json", "zsre", n=args.n_train)
    test_recs = data.load_edits(shared / "data/zsre/zsre_mend_edit.json", "zsre", n=args.n_test)
    cf_recs = data.load_edits(shared / "data/counterfact/counterfact-edit.json", n=args.cf_n,
                              require_subject=True)
    tok = llama.load_tokenizer(args.ckpt)
    template = data.Template("chatml", system="")
    res = {"args": vars(args), "template": "chatml without system turn: " + repr(
        template.prompt_text(tok, "{question}") + "{answer}<|im_end|>"),
        "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}

    # 1. SFT -----------------------------------------------------------------------------------
    sft_dir = work / "sft"
    model = llama.Llama.from_pretrained(args.ckpt, dtype=torch.float32)
    examples = train_sft.encode_records(tok, template, train_recs, add_eos=True)
    cfg = train_sft.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=0.05,
                                schedule="cosine", min_lr_ratio=0.1, save_every=args.save_every,
                                log_every=30.0)
    stats = train_sft.train(model, examples, cfg, pad_id=evaluation.pad_id(tok), out_dir=sft_dir,
                            tokenizer_dir=args.ckpt, resume=args.resume)
    res["sft"] = {"records": len(examples), "config": cfg.__dict__, **stats,
                  "tokens_per_s_note": "non-pad tokens through forward+backward per second of training "
                                       "(this call; a resumed run counts only its own steps)"}
    print(f"SFT: {stats['steps_run']} steps in {stats['seconds']:.0f} s, {stats['tokens_per_s']:.1f} tok/s, "
          f"final loss {stats['final_loss']:.3f}")

    # 2. accuracies and the split ----------------------------------------------------------------
    t0 = time.perf_counter()
    acc_train, _ = train_sft.answer_accuracy(model, tok, template, train_recs, batch_size=args.batch_size_eval)
    d_edit, d_loc, acc_test = train_sft.split_edit_loc(model, tok, template, test_recs,
                                                       batch_size=args.batch_size_eval)
    data.save_jsonl(d_edit, work / "d_edit.jsonl")
    data.save_jsonl(d_loc, work / "d_loc.jsonl")
    res["zsre"] = {"protocol": evaluation.GEN, "train_accuracy": acc_train, "n_train": len(train_recs),
                   "test_accuracy": acc_test, "n_test": len(test_recs), "d_edit": len(d_edit),
                   "d_loc": len(d_loc), "d_edit_file": str(work / "d_edit.jsonl"),
                   "d_loc_file": str(work / "d_loc.jsonl"), "sft_checkpoint": str(sft_dir),
                   "seconds": time.perf_counter() - t0}
    print(f"ZsRE: train acc {acc_train:.1f}% ({len(train_recs)}), test acc {acc_test:.1f}% ({len(test_recs)}) "
          f"-> D_edit {len(d_edit)}, D_loc {len(d_loc)}")
    del model

    # 3. unedited SmolLM2 on CounterFact ------------------------------------------------------------
    t0 = time.perf_counter()
    base = llama.Llama.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    em = evaluation.LlamaEvalModel(base, tok, data.Template("raw"))
    figs = evaluation.evaluate_counterfact(em, tok, cf_recs, with_fluency=False, batch_size=args.batch_size_eval)
    res["counterfact_unedited"] = {k: {"value": v["value"], "n": v["n"], "protocol": v["protocol"]}
                                   for k, v in figs.items()}
    res["counterfact_unedited"]["seconds"] = time.perf_counter() - t0
    res["seconds_total"] = time.perf_counter() - t_all
    res["loadavg_end"] = os.getloadavg()

    rows = [("SFT tokens/s", f"{stats['tokens_per_s']:.1f}"),
            ("SFT seconds", f"{stats['seconds']:.0f}"),
            ("ZsRE train acc (gen EM)", f"{acc_train:.1f}"),
            ("ZsRE test acc (gen EM)", f"{acc_test:.1f}"),
            ("|D_edit|", str(len(d_edit))), ("|D_loc|", str(len(d_loc))),
            *((f"CounterFact {k} (unedited)", f"{figs[k]['value']:.2f}")
              for k in ("Efficacy", "Generalization", "Specificity"))]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{w}}  {b:>8}" for a, b in rows))
    out = Path(args.out)
    data.atomic_write_text(out, json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
