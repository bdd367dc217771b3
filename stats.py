"""
stats.py: what the MEMIT family (MEMIT, NSE, AlphaEdit) computes once on the unedited model and keeps
on disk. Chiefly the corpus prior C0 = E[k k^T], the second moment of the down projection's inputs k
over a text corpus, per edited layer (NSE step 5 in shared/docs/METHODS.md; MEMIT, Meng et al. 2023,
Eq. 14's "K0 K0^T"); also ZCache, NSE's per-request z (computed on the original weights).

No download: C0 comes from a text file the user names, or, when none is given, from text the model
writes itself (generated_corpus). It is computed once on the unedited model and cached as
safetensors, keyed by the layer's weights, the corpus and the token count; a 7B layer's C0 is
11008^2 float32 = 485 MB, so C0Store reads large ones from disk per use.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import data
import eval as ev
import llama


@torch.no_grad()
def key_second_moment(model, tok, text, layers, n_tokens: int, chunk: int = 512, batch: int = 4):
    """C0[l] = (1/N) sum_t k_t k_t^T over every token of the corpus (step 5; MEMIT Eq. 'C0 = K0 K0^T').
    text: the corpus as a string, or already as token chunks (generated_corpus)."""
    F_ = model.config.intermediate_size
    acc = {l: torch.zeros(F_, F_) for l in layers}              # float32: 7B needs 485 MB per layer
    seqs = data.corpus_chunks(tok, text, n_tokens, chunk) if isinstance(text, str) else text
    n = 0
    for b in range(0, len(seqs), batch):
        ids, mask = llama.pad_batch(seqs[b:b + batch], side="right")
        trace = llama.Trace()
        model.run_layers(model.embed(ids.to(model.device)), 0, max(layers) + 1, mask.to(model.device), trace=trace)
        keep = mask.bool().to(model.device)
        for l in layers:
            k = trace.ffn_in[l][keep].float()                            # (tokens, F)
            acc[l] += (k.T @ k).cpu()                                    # sum_t k_t k_t^T
        n += int(keep.sum())
    if n == 0:
        raise ev.RunError("stats text: no tokens to compute C0 from")
    # k^T k in float32 need not come out exactly symmetric; the Cholesky solve reads one triangle
    return {l: acc[l].add_(acc[l].T.clone()).div_(2 * n) for l in layers}, n


@torch.no_grad()
def generated_corpus(model, tok, n_tokens: int, length: int = 256, batch: int = 16, seed: int = 0):
    """A corpus for C0 when none is given: text the model writes itself, `length`-token samples
    (temperature 1, top-k 50, seeded) from a document start (BOS, else EOS), n_tokens in all."""
    start = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    length = min(length, model.config.max_position_embeddings - 1)
    g, seqs, total = torch.Generator().manual_seed(seed), [], 0
    while total < n_tokens:
        for new in llama.generate(model, [start] * batch, length, temperature=1.0, top_k=50, eos_ids=[], generator=g):
            seqs.append((start + new)[:n_tokens - total])
            total += len(seqs[-1])
            if total >= n_tokens:
                break
    return seqs


class C0Store(dict):
    """C0 per layer, {layer: tensor}; layers whose file is in `on_disk` are read when asked for and
    not kept (a 7B layer's C0 is 485 MB: five of them would not fit beside the weights in 24 GB)."""

    def __init__(self, in_memory: dict, on_disk: dict):
        super().__init__(in_memory)
        self.on_disk = on_disk

    def __missing__(self, l):
        if l not in self.on_disk:
            raise KeyError(l)
        return load_file(self.on_disk[l])["C0"]

    def __contains__(self, l):
        return dict.__contains__(self, l) or l in self.on_disk


class ZCache:
    """Per-request vectors computed on the unedited model, kept on disk (root/z/<key>.safetensors):
    NSE's z (nse.cached_z). The key hashes the model's every weight and what the caller says the
    vector depends on. A vector read back is the one computed the first time, in its first batch;
    the same request in another batch can differ from it in the last bits (other padding, other
    matmul shapes). Build it on the unedited model: the digest covers every weight."""

    def __init__(self, root, model):
        self.root = Path(root) / "z"
        self.model = llama.weights_digest(sorted(model.state_dict().items())).hex()
        self.hits = 0

    def key(self, parts: dict) -> str:
        k = {"weights": self.model, **parts}
        return hashlib.blake2b(json.dumps(k, sort_keys=True).encode(), digest_size=16).hexdigest()

    def get_or_compute(self, parts: list[dict], compute):
        """(Z (n, D), steps, hits): one vector per key; compute(indices) -> (z (m, D), steps) makes the
        missing ones, which are written atomically."""
        keys = [self.key(p) for p in parts]
        Z, steps, miss = [None] * len(keys), [0] * len(keys), []
        for i, k in enumerate(keys):
            path = self.root / f"{k}.safetensors"
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    Z[i], steps[i] = f.get_tensor("z"), int(f.metadata()["steps"])
            else:
                miss.append(i)
        if miss:
            z, zsteps = compute(miss)
            for j, i in enumerate(miss):
                Z[i], steps[i] = z[j], zsteps[j]
                llama.write_safetensors(self.root / f"{keys[i]}.safetensors", {"z": z[j].contiguous()},
                                        {"steps": str(steps[i])})
        self.hits += len(keys) - len(miss)
        return torch.stack(Z), steps, len(keys) - len(miss)


def load_or_compute_c0(model, tok, text_path, layers, n_tokens, cache_dir, chunk=512, log=print,
                       keep_bytes: int = 1 << 30):
    """C0 per layer from the cache when its key matches exactly, else computed and cached atomically.
    Kept in memory when all layers together take at most keep_bytes, else read per use (C0Store)."""
    if text_path is None:                                        # no corpus: the model's own text
        text, corpus, source = None, "generated by the model (generated_corpus, seed 0)", "generated text"
    else:
        text, source = Path(text_path).read_text(encoding="utf-8"), Path(text_path).name
        corpus = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    paths, missing = {}, []
    fingerprints = llama.layer_fingerprints(model, layers)
    for l in layers:
        key = dict(weights=fingerprints[l], layer=l, corpus=corpus, n_tokens=n_tokens, chunk=chunk)
        name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
        paths[l] = (Path(cache_dir) / f"c0-layer{l}-{name}.safetensors", key)
        if not paths[l][0].exists():
            missing.append(l)
    fresh = {}
    if missing:
        t0 = time.perf_counter()
        if text is None:
            log(f"C0: no corpus given: the model writes {n_tokens} tokens first (--stats-text FILE is faster)")
            text = generated_corpus(model, tok, n_tokens)
        fresh, n = key_second_moment(model, tok, text, missing, n_tokens, chunk)
        log(f"C0: layers {missing}, {n} tokens of {source}, {time.perf_counter() - t0:.0f} s")
        for l in missing:
            path, key = paths[l]
            meta = {k: str(v) for k, v in key.items()} | {"tokens_used": str(n)}
            llama.write_safetensors(path, {"C0": fresh[l]}, meta)
    F_ = model.config.intermediate_size
    if len(layers) * F_ * F_ * 4 <= keep_bytes:
        return C0Store({l: fresh[l] if l in fresh else load_file(paths[l][0])["C0"] for l in layers}, {})
    return C0Store({}, {l: paths[l][0] for l in layers})
