"""
bench_llama.py: llama.py against the reference `transformers` LlamaForCausalLM, and at 7B scale.

Part 1 (default): SmolLM2-135M-Instruct on this CPU, both implementations in the same run.
Every figure is a ratio against the reference measured in the same run, because the machine is
shared and noisy; nothing here is a timed assertion.

  load time     each load in a FRESH subprocess (no warm allocator, no page cache advantage
                beyond what both get: a warm-up read of the files runs first), fp32 load of the
                bf16 checkpoint, repeated --repeats times alternating ours/theirs; medians.
                transformers 5 converts tensors in its own thread pool (min(4, cpus) workers);
                at --threads 1 the matched reference runs with HF_DEACTIVATE_ASYNC_LOAD=1, and its
                default (pooled) load is timed too, as information. Goal: ours / theirs <= 0.5.
                The time to import the implementation (llama vs transformers; torch is imported
                first in both) plus the load is reported too, as information.
  peak RSS      peak resident set of each loading subprocess (VmHWM of /proc/self/status; Linux
                carries a parent's ru_maxrss into its child across fork + exec, so ru_maxrss of a
                child of a big parent is wrong; it is recorded, not used), raw and net of the peak
                of a process that only imported torch; compared with the weight bytes in fp32.
                Goal <= 1.2x.
  decode        greedy, --new-tokens tokens after a short prompt (EOS ignored by both, so both make
                the same number and the same ids), llama.generate vs transformers
                generate(do_sample=False), alternating in one subprocess that holds both models,
                --decode-rounds rounds; tokens/s from the median times, and the median of the
                per-round ratios (each round's pair ran back to back, so it sees the same load).
                Goal: ours / theirs >= 1.0.
  CPU time      every timing is taken twice: wall clock, and process CPU time (time.process_time).
                With one thread on a shared, oversubscribed machine, CPU time is what the work
                itself cost, free of the time slices other jobs took; both go in the table.
  logits        max |ours - theirs| of the fp32 logits on a few prompts (goal: within 1e-4).

Part 2 (--scale): a random-weight checkpoint in Llama-2-7B shapes (bf16, 2 shards + index,
~13.5 GB) is written to --scale-dir tensor by tensor with our own safetensors header writer (the
writer holds one chunk of one tensor at a time), skipped when already complete. A fresh
subprocess then loads it with Llama.from_pretrained(dtype=bfloat16, compute_dtype=float32) and
runs one forward pass on an 8-token prompt: load seconds, peak RSS (goal <= 1.1x the checkpoint
bytes), forward seconds. The folder also gets the Llama 2 tokenizer.model and a tokenizer_config.json
(bos <s>, eos </s>, add_bos_token true), so other tools can reuse it as a complete checkpoint.

Threads: both implementations get the same torch thread count (--threads; by default 2 on an idle
machine, else 1), recorded in the JSON with the load average and free memory before and after.
--llama-dir measures a patched copy of llama.py against the same reference.

The SmolLM2 folder is made with (from /work/main):
    python ../shared/tools/smollm2_from_gguf.py DIR       # then pass --ckpt DIR

Usage:
    python bench/bench_llama.py --ckpt /work/models/smollm2            # part 1, ~5 minutes
    python bench/bench_llama.py --ckpt /work/models/smollm2 --scale    # + part 2 (~2 min writing once,
                                                                       #   ~2 min loading, 14 GB RAM)
    python bench/bench_llama.py --scale --skip-smollm                  # part 2 only

Results: a table on stdout and JSON (written atomically) under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "bench_llama.json"
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"

PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]

# Llama-2-7B shapes (Touvron et al. 2023), untied head
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                 model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False)


def maxrss_bytes() -> int:
    """Peak resident set of this process's own memory so far: VmHWM (KiB in /proc/self/status).

    ru_maxrss is not used for the figures: Linux carries the parent's high-water mark into a child
    across (v)fork + exec, so a child of a big parent reports at least the parent's RSS.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """getrusage's ru_maxrss (Linux reports KiB): recorded for reference only."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return -1


def machine_state() -> dict:
    return {"loadavg": list(os.getloadavg()), "mem_available_gb": round(mem_available_bytes() / 1e9, 2),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json_atomic(path: Path, obj) -> None:
    """Temp file in the same folder, then os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)                                  # mkstemp makes 0600; others read these
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Workers: each runs in a fresh subprocess and prints one JSON line (the last line of stdout)

def _setup_worker(args):
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.llama_dir).resolve()))
    return torch


def worker_baseline(args) -> dict:
    """A process that only imports torch: the RSS floor subtracted from the loaders' peaks."""
    _setup_worker(args)
    return {"maxrss": maxrss_bytes(), "ru_maxrss": ru_maxrss_bytes()}


def worker_load_ours(args) -> dict:
    torch = _setup_worker(args)
    t0 = time.perf_counter()
    import llama
    import_s = time.perf_counter() - t0
    before = maxrss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    model = llama.Llama.from_pretrained(args.ckpt, dtype=torch.float32)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(p.numel() for p in model.parameters())            # tied head counted once
    return {"seconds": seconds, "cpu_seconds": cpu, "maxrss": maxrss_bytes(), "ru_maxrss": ru_maxrss_bytes(),
            "maxrss_before_load": before, "params": n, "llama_py": llama.__file__, "import_seconds": import_s}


def worker_load_hf(args) -> dict:
    torch = _setup_worker(args)
    t0 = time.perf_counter()
    from transformers import LlamaForCausalLM
    import_s = time.perf_counter() - t0
    before = maxrss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    model = LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "cpu_seconds": cpu, "maxrss": maxrss_bytes(), "ru_maxrss": ru_maxrss_bytes(),
            "maxrss_before_load": before, "params": n, "import_seconds": import_s}


def worker_decode(args) -> dict:
    """Both models in one process: logits parity, then greedy decode alternating ours/theirs."""
    torch = _setup_worker(args)
    import llama
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(args.ckpt)             # same ids for both implementations
    ours = llama.Llama.from_pretrained(args.ckpt, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None                   # never stop early, like eos_ids=[] for ours
    out = {"logits": [], "decode": {"ours": [], "hf": []}, "decode_cpu": {"ours": [], "hf": []}}
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p)["input_ids"]])
            a, b = ours(ids), hf(input_ids=ids).logits
            out["logits"].append({"prompt": p, "tokens": ids.shape[1],
                                  "max_abs_diff": (a - b).abs().max().item(),
                                  "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())})
    ids = tok(PROMPTS[0])["input_ids"]
    n = args.new_tokens

    def run_ours():
        t0, c0 = time.perf_counter(), time.process_time()
        new = llama.generate(ours, [ids], n, eos_ids=[])[0]
        return (time.perf_counter() - t0, time.process_time() - c0), new

    def run_hf():
        x = torch.tensor([ids])
        t0, c0 = time.perf_counter(), time.process_time()
        y = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                        pad_token_id=tok.pad_token_id or 0)
        return (time.perf_counter() - t0, time.process_time() - c0), y[0, len(ids):].tolist()

    run_ours(), run_hf()                                       # warm-up (first-call allocations)
    for _ in range(args.decode_rounds):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            (s, c), new = fn()
            out["decode"][name].append(s)
            out["decode_cpu"][name].append(c)
            out[f"{name}_ids"] = new
    out["prompt_tokens"] = len(ids)
    out["same_tokens"] = out["ours_ids"] == out["hf_ids"]
    out["text_ours"] = tok.decode(out.pop("ours_ids"))
    out["text_hf"] = tok.decode(out.pop("hf_ids"))
    return out


def worker_scale(args) -> dict:
    """Load the 7B-shaped checkpoint (bf16 weights, fp32 compute) and run one forward pass."""
    torch = _setup_worker(args)
    import llama
    before = maxrss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    model = llama.Llama.from_pretrained(args.scale_dir, dtype=torch.bfloat16, compute_dtype=torch.float32)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    load_rss = maxrss_bytes()
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(args.scale_dir) / "tokenizer.model"))
        ids = [1] + sp.encode("The capital of France is a city")[:7]
    except Exception:                                         # random weights: any 8 ids will do
        ids = [1, 450, 7483, 310, 3444, 338, 263, 4272]
    x = torch.tensor([ids])
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(x)
        fwd_s, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"load_seconds": load_s, "load_cpu_seconds": load_cpu, "forward_cpu_seconds": fwd_cpu,
            "llama_py": llama.__file__, "maxrss_before_load": before, "maxrss_after_load": load_rss,
            "forward_seconds": fwd_s, "forward_tokens": len(ids), "maxrss_after_forward": maxrss_bytes(),
            "logits_finite": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape),
            "params": sum(p.numel() for p in model.parameters())}


WORKERS = {"baseline": worker_baseline, "load-ours": worker_load_ours, "load-hf": worker_load_hf,
           "load-hf-pooled": worker_load_hf, "decode": worker_decode, "scale": worker_scale}


def run_worker(kind: str, args, timeout: int = 1800) -> dict:
    """Run one worker in a fresh interpreter; return its JSON (its last stdout line)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--threads", str(args.threads),
           "--ckpt", str(args.ckpt), "--scale-dir", str(args.scale_dir), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--llama-dir", str(args.llama_dir),
           "--decode-rounds", str(args.decode_rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
    if kind != "load-hf-pooled" and args.threads == 1:       # one thread for both, as for ours
        env["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Part 1: SmolLM2 against transformers

def fp32_weight_bytes(ckpt: Path) -> int:
    """Bytes of the checkpoint's distinct tensors once widened to fp32 (a tied head counted once)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    index = ckpt / "model.safetensors.index.json"
    files = ([ckpt / f for f in set(json.loads(index.read_text())["weight_map"].values())] if index.is_file()
             else [ckpt / "model.safetensors"])
    total = 0
    for path in files:                                        # parsed here so the parent stays small
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            total += math.prod(info["shape"]) * 4
    return total


def bench_smollm(args) -> dict:
    ckpt = Path(args.ckpt)
    for path in ckpt.glob("*.safetensors"):                   # same page-cache state for both
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    res = {"ckpt": str(ckpt), "weight_bytes_fp32": fp32_weight_bytes(ckpt), "machine_before": machine_state()}
    baselines, ours, hf, pooled = [], [], [], []
    for i in range(args.repeats):                             # alternate, so drift hits both alike
        baselines.append(run_worker("baseline", args)["maxrss"])
        ours.append(run_worker("load-ours", args))
        hf.append(run_worker("load-hf", args))
        if args.threads == 1:
            pooled.append(run_worker("load-hf-pooled", args))
        print(f"  load round {i + 1}/{args.repeats}: ours {ours[-1]['seconds']:.2f} s, "
              f"transformers {hf[-1]['seconds']:.2f} s", flush=True)
    base = statistics.median(baselines)
    res["llama_py"] = ours[0]["llama_py"]
    for name, runs in (("ours", ours), ("hf", hf), ("hf_pooled", pooled)):
        if not runs:
            continue
        res[f"load_{name}"] = {
            "seconds": [r["seconds"] for r in runs], "median_s": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds": [r["cpu_seconds"] for r in runs],
            "median_cpu_s": statistics.median(r["cpu_seconds"] for r in runs),
            "import_seconds": [r["import_seconds"] for r in runs],
            "import_plus_load_median_s": statistics.median(r["import_seconds"] + r["seconds"] for r in runs),
            "maxrss_raw": statistics.median(r["maxrss"] for r in runs),
            "maxrss_net": statistics.median(r["maxrss"] for r in runs) - base,
            "maxrss_before_load": statistics.median(r["maxrss_before_load"] for r in runs),
            "ru_maxrss_raw": statistics.median(r["ru_maxrss"] for r in runs),
            "params": runs[0]["params"]}
    res["baseline_torch_only_maxrss"] = base
    res["machine_after_load"] = machine_state()
    dec = run_worker("decode", args)
    for name in ("ours", "hf"):
        s = statistics.median(dec["decode"][name])
        c = statistics.median(dec["decode_cpu"][name])
        res[f"decode_{name}"] = {"seconds": dec["decode"][name], "median_s": s, "tokens_per_s": args.new_tokens / s,
                                 "cpu_seconds": dec["decode_cpu"][name], "median_cpu_s": c,
                                 "tokens_per_cpu_s": args.new_tokens / c}
    pair = [o / h for o, h in zip(dec["decode"]["hf"], dec["decode"]["ours"])]   # ours tok/s / theirs tok/s
    res["decode_ratio_per_round"] = pair
    res["decode_ratio_median_of_rounds"] = statistics.median(pair)
    pair_cpu = [o / h for o, h in zip(dec["decode_cpu"]["hf"], dec["decode_cpu"]["ours"])]
    res["decode_cpu_ratio_per_round"] = pair_cpu
    res["decode_cpu_ratio_median_of_rounds"] = statistics.median(pair_cpu)
    res["decode_same_tokens"] = dec["same_tokens"]
    res["decode_prompt_tokens"] = dec["prompt_tokens"]
    res["decode_text"] = {"ours": dec["text_ours"], "hf": dec["text_hf"]}
    res["logits"] = dec["logits"]
    res["machine_after"] = machine_state()
    wb = res["weight_bytes_fp32"]
    lo, lh = res["load_ours"], res["load_hf"]
    max_diff = max(d["max_abs_diff"] for d in dec["logits"])
    res["table"] = [
        row("load time (s)", lo["median_s"], lh["median_s"], lo["median_s"] / lh["median_s"], "<= 0.5",
            lo["median_s"] / lh["median_s"] <= 0.5),
        row("load CPU time (s)", lo["median_cpu_s"], lh["median_cpu_s"], lo["median_cpu_s"] / lh["median_cpu_s"],
            "<= 0.5", lo["median_cpu_s"] / lh["median_cpu_s"] <= 0.5),
        row("import + load (s, torch already imported)", lo["import_plus_load_median_s"],
            lh["import_plus_load_median_s"], lo["import_plus_load_median_s"] / lh["import_plus_load_median_s"],
            "(info) <= 0.5", None),
        row("peak RSS net / fp32 weights", lo["maxrss_net"] / wb, lh["maxrss_net"] / wb,
            lo["maxrss_net"] / lh["maxrss_net"], "ours <= 1.2x", lo["maxrss_net"] / wb <= 1.2),
        row("peak RSS raw (GB)", lo["maxrss_raw"] / 1e9, lh["maxrss_raw"] / 1e9, lo["maxrss_raw"] / lh["maxrss_raw"],
            "(info)", None),
        row(f"greedy decode tok/s ({args.new_tokens} new; ratio: median of rounds)", res["decode_ours"]["tokens_per_s"],
            res["decode_hf"]["tokens_per_s"], res["decode_ratio_median_of_rounds"],
            ">= 1.0", res["decode_ratio_median_of_rounds"] >= 1.0),
        row("greedy decode tokens per CPU second (same rounds)", res["decode_ours"]["tokens_per_cpu_s"],
            res["decode_hf"]["tokens_per_cpu_s"], res["decode_cpu_ratio_median_of_rounds"],
            ">= 1.0", res["decode_cpu_ratio_median_of_rounds"] >= 1.0),
        row("logits max abs diff (fp32)", max_diff, None, None, "<= 1e-4", max_diff <= 1e-4),
    ]
    if pooled:
        hp = res["load_hf_pooled"]["median_s"]
        res["table"].insert(2, row("load time vs transformers' pooled default (s)", lo["median_s"], hp,
                                   lo["median_s"] / hp, "(info)", None))
    return res


def row(metric, ours, ref, ratio, goal, met) -> dict:
    return {"metric": metric, "ours": ours, "reference": ref, "ratio": ratio, "goal": goal, "met": met}


# ----------------------------------------------------------------------------------------------
# Part 2: a random Llama-2-7B-shaped checkpoint

def scale_tensor_specs(c: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of an untied Llama, in the order the Hugging Face files use."""
    D, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", [V, D])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", [D]), (p + "mlp.down_proj.weight", [D, I]),
                  (p + "mlp.gate_proj.weight", [I, D]), (p + "mlp.up_proj.weight", [I, D]),
                  (p + "post_attention_layernorm.weight", [D]), (p + "self_attn.k_proj.weight", [kv, D]),
                  (p + "self_attn.o_proj.weight", [D, D]), (p + "self_attn.q_proj.weight", [D, D]),
                  (p + "self_attn.v_proj.weight", [kv, D])]
    specs += [("model.norm.weight", [D]), ("lm_head.weight", [V, D])]
    return specs


def shard_plan(specs, n_shards: int = 2) -> list[list[tuple[str, list[int]]]]:
    """Split the tensors, in order, into n_shards groups of about equal bytes (bf16)."""
    total = sum(math.prod(s) * 2 for _, s in specs)
    groups, acc = [[] for _ in range(n_shards)], 0
    for name, shape in specs:
        k = min(n_shards - 1, int(acc * n_shards // total))
        groups[k].append((name, shape))
        acc += math.prod(shape) * 2
    return groups


def shard_header(group) -> tuple[bytes, int]:
    """safetensors header bytes (length prefix + JSON padded to 8 bytes) and the data size."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        n = math.prod(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, off


def scale_is_complete(d: Path) -> bool:
    """Index, config and tokenizer present, every shard the exact size its header promises."""
    index = d / "model.safetensors.index.json"
    if not all((d / f).is_file() for f in ("config.json", "tokenizer.model", "tokenizer_config.json")) \
            or not index.is_file():
        return False
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError):
        return False
    if set(weight_map) != {n for n, _ in scale_tensor_specs(LLAMA2_7B)}:
        return False
    for fname in set(weight_map.values()):
        p = d / fname
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        if p.stat().st_size != 8 + n + max(i["data_offsets"][1] for i in header.values()):
            return False
    return True


def write_scale_checkpoint(d: Path, seed: int = 0, std: float = 0.02, chunk: int = 32 << 20) -> dict:
    """Stream random bf16 weights (N(0, std), norms = 1) into 2 shards; index written last."""
    import torch
    d.mkdir(parents=True, exist_ok=True)
    specs = scale_tensor_specs(LLAMA2_7B)
    groups = shard_plan(specs, 2)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(chunk, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    for fname, group in zip(names, groups):
        head, _ = shard_header(group)
        tmp = d / f".{fname}.tmp"
        with open(tmp, "wb") as f:
            f.write(head)
            for name, shape in group:
                left = math.prod(shape)
                while left:
                    n = min(left, chunk)
                    part = buf[:n]
                    if name.endswith("norm.weight"):
                        part.fill_(1.0)
                    else:
                        part.normal_(0.0, std, generator=g)
                    f.write(part.view(torch.uint8).numpy().data)
                    left -= n
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / fname)
        print(f"  wrote {fname} ({(d / fname).stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    shutil.copyfile(LLAMA2_TOKENIZER, d / "tokenizer.model")
    write_json_atomic(d / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                    "add_bos_token": True, "add_eos_token": False,
                                                    "tokenizer_class": "LlamaTokenizer"})
    write_json_atomic(d / "config.json", LLAMA2_7B)
    total = sum(math.prod(s) * 2 for _, s in specs)
    write_json_atomic(d / "model.safetensors.index.json",
                      {"metadata": {"total_size": total},
                       "weight_map": {n: f for f, grp in zip(names, groups) for n, _ in grp}})
    return {"write_seconds": time.perf_counter() - t0}


def bench_scale(args) -> dict:
    d = Path(args.scale_dir)
    res = {"dir": str(d), "machine_before": machine_state()}
    if scale_is_complete(d):
        res["written"] = False
        print(f"  {d} is complete; not rewriting", flush=True)
    else:
        need = 14e9
        if shutil.disk_usage(d.parent if d.parent.exists() else "/").free < need:
            raise SystemExit(f"not enough disk for {d} (needs ~{need / 1e9:.0f} GB)")
        res.update(write_scale_checkpoint(d), written=True)
    res["checkpoint_bytes"] = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    res["machine_before_load"] = machine_state()
    if mem_available_bytes() < 1.15 * res["checkpoint_bytes"]:
        print(f"  warning: only {mem_available_bytes() / 1e9:.1f} GB available for a "
              f"{res['checkpoint_bytes'] / 1e9:.1f} GB load", flush=True)
    base = run_worker("baseline", args)["maxrss"]
    r = run_worker("scale", args)
    res.update(r, baseline_torch_only_maxrss=base, machine_after=machine_state())
    cb = res["checkpoint_bytes"]
    res["table"] = [
        row("load time (s)", r["load_seconds"], None, None, "(report)", None),
        row("load CPU time (s)", r["load_cpu_seconds"], None, None, "(report)", None),
        row("load read rate (GB/s, wall)", cb / 1e9 / r["load_seconds"], None, None, "(info)", None),
        row("peak RSS net / checkpoint bytes (load)", (r["maxrss_after_load"] - base) / cb, None, None,
            "<= 1.1x", (r["maxrss_after_load"] - base) / cb <= 1.1),
        row("peak RSS raw / checkpoint bytes (load)", r["maxrss_after_load"] / cb, None, None, "(info)", None),
        row("peak RSS raw / checkpoint bytes (+forward)", r["maxrss_after_forward"] / cb, None, None, "(info)", None),
        row(f"forward {r['forward_tokens']} tokens (s)", r["forward_seconds"], None, None, "(report)", None),
        row(f"forward {r['forward_tokens']} tokens (CPU s)", r["forward_cpu_seconds"], None, None, "(report)", None),
    ]
    return res


# ----------------------------------------------------------------------------------------------

def print_table(title: str, rows: list[dict]) -> None:
    def fmt(x):
        if x is None:
            return "-"
        if isinstance(x, bool):
            return "yes" if x else "NO"
        return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}"
    print(f"\n{title}")
    print(f"| {'metric':<58} | {'ours':>9} | {'reference':>9} | {'ratio':>7} | {'goal':<13} | met |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 15}|-----|")
    for r in rows:
        print(f"| {r['metric']:<58} | {fmt(r['ours']):>9} | {fmt(r['reference']):>9} | {fmt(r['ratio']):>7} | "
              f"{r['goal']:<13} | {fmt(r['met']):>3} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/work/models/smollm2",
                    help="SmolLM2-135M-Instruct folder (made by ../shared/tools/smollm2_from_gguf.py DIR)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both implementations (0: 2 if the machine is idle, else 1)")
    ap.add_argument("--repeats", type=int, default=5, help="fresh-process loads per implementation (medians taken)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens to generate in the decode bench")
    ap.add_argument("--decode-rounds", type=int, default=5, help="alternating ours/theirs decode rounds")
    ap.add_argument("--scale", action="store_true",
                    help="also write (if absent) and load the 7B-shaped random checkpoint (minutes, ~14 GB)")
    ap.add_argument("--skip-smollm", action="store_true", help="skip part 1 (SmolLM2 vs transformers)")
    ap.add_argument("--scale-dir", default="/work/scale/llama2-7b-random",
                    help="where the 7B-shaped checkpoint lives (outside the repo; reused if complete)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file (written atomically)")
    ap.add_argument("--llama-dir", default=str(ROOT),
                    help="folder whose llama.py is benchmarked (default: the repository; another folder "
                         "measures a proposed patch against the same reference)")
    ap.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        print(json.dumps(WORKERS[args._worker](args)), flush=True)
        return
    if args.threads == 0:
        args.threads = 2 if os.getloadavg()[0] < 0.5 else 1
    out = Path(args.out)
    results = {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
               "decode_rounds": args.decode_rounds,
               "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
               "machine_start": machine_state()}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("torch", "transformers", "safetensors"):      # no import: the parent stays small
        try:
            results[pkg] = version(pkg)
        except PackageNotFoundError:
            results[pkg] = None
    if out.exists():                                          # keep the other part's last results
        try:
            old = json.loads(out.read_text())
            for key in ("smollm2", "scale"):
                if key in old:
                    results[key] = old[key]
        except json.JSONDecodeError:
            pass
    print(f"threads={args.threads} loadavg={os.getloadavg()}", flush=True)
    if not args.skip_smollm:
        print("part 1: SmolLM2-135M vs transformers ...", flush=True)
        results["smollm2"] = bench_smollm(args)
        results["smollm2"]["threads"] = args.threads
        write_json_atomic(out, results)
        print_table(f"SmolLM2-135M-Instruct, fp32, {args.threads} thread(s), medians of {args.repeats}",
                    results["smollm2"]["table"])
    if args.scale:
        print("\npart 2: Llama-2-7B-shaped random checkpoint ...", flush=True)
        results["scale"] = bench_scale(args)
        results["scale"]["threads"] = args.threads
        write_json_atomic(out, results)
        print_table("Llama-2-7B shapes, bf16 weights, fp32 compute", results["scale"]["table"])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
