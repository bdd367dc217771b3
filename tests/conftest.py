"""Shared test fixtures: tiny random Llamas, and the optional ../shared material (skipped when absent)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import llama  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> "llama.LlamaConfig":
    """A 2-layer GQA Llama small enough for a test (vocab 97 so ids are easy to eyeball)."""
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=[2])
    kw.update(overrides)
    return llama.LlamaConfig(**kw)


def tiny_model(seed=0, **overrides) -> "llama.Llama":
    torch.manual_seed(seed)
    return llama.Llama(tiny_config(**overrides)).reset_parameters(std=0.2)


def tiny_checkpoint(ck: Path, **overrides) -> Path:
    """A tiny random checkpoint folder (HF layout) with a character-level byte-BPE tokenizer.json
    (no merges: one id per letter; EOS "</s>"), for tests that run a CLI end to end."""
    tiny_model(**{"num_hidden_layers": 3, "vocab_size": 120, **overrides}).save_pretrained(ck)
    vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,")))}
    for c in "\u0120\u010a?" + "0123456789":            # byte-level space and newline, then the rest
        vocab[c] = len(vocab)
    eos = {"id": len(vocab), "content": "</s>", "special": True}
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": []},
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "added_tokens": [eos],
          "decoder": {"type": "ByteLevel"}}
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    (ck / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    return ck


def edit_files(root: Path, pairs=(("Kim Lo", "Oslo"), ("Ann Pi", "Lima"))) -> Path:
    """Under root: a tiny checkpoint (ckpt/), CounterFact-style edits "<subject> lives in" -> target
    (true answer Rome, one rephrase, one neighbourhood prompt) in edits.jsonl, a small corpus
    (corpus.txt) and SCEN's unrelated prompts (unrelated.jsonl), for tests that run a command line."""
    tiny_checkpoint(root / "ckpt")
    recs = [{"prompt": f"{s} lives in", "subject": s, "target_new": t, "target_true": "Rome",
             "rephrases": [f"The home of {s} is"], "locality": [["Ed Lu lives in", "Rome"]]} for s, t in pairs]
    (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (root / "corpus.txt").write_text("the cat sat on the mat. a dog ran in the park.\n" * 60)
    unrelated = ["What is red?", "Who is Bo?", "Where is the park?", "Why did the dog run?"]
    (root / "unrelated.jsonl").write_text("\n".join(json.dumps({"prompt": q, "target_new": "x"}) for q in unrelated) + "\n")
    return root


def assert_same_greedy(model, prompt, a, b, tol: float = 1e-3):
    """Greedy continuations a, b of `prompt` computed in different shapes (batched or alone, with or
    without the KV cache, another dtype) agree token for token; where they first differ, the two
    tokens must be the model's top two within `tol` there: a near tie that another CPU's blocking
    of the same products may break either way (never assert exact equality across shapes)."""
    if a == b:
        return
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert k < min(len(a), len(b)), f"one continuation stops early: {a} vs {b}"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + a[:k]]))[0, -1].float()
    top = logits.topk(2)
    assert {a[k], b[k]} == set(top.indices.tolist()) and (top.values[0] - top.values[1]).item() < tol, \
        f"greedy continuations differ at token {k} with a clear winner: {a} vs {b}"


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test when the material is not there (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct in the Hugging Face layout, converted from ../shared's GGUF (needs `gguf`)."""
    tool = shared_path("tools", "smollm2_from_gguf.py")
    shared_path("models", "smollm2-135m-instruct")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf not installed (pip install gguf) to convert SmolLM2")
    out = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True)
    return out
