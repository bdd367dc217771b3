"""Evaluation protocols of model editing: the figures SCEN, NSE and their baselines are judged by.

Two ways of asking "does the model know the answer", reported side by side and always labelled:
- generation exact match (SCEN's protocol, Yao et al. 2024, official code): greedy decoding of
  the prompt until EOS or a stop string, the text cut at the stop string and stripped, then
  compared with the target (case-sensitive).
- teacher-forced token accuracy (EasyEdit's protocol, Wang et al. 2023; MEMIT's ZsRE): the
  prompt + target is read in one pass; the share of target tokens that are the argmax of the
  logits at the position before them. Easier than generation: a model can score 0.9 here and
  still never produce the answer.

QA edits (ZsRE, the demo): Reliability (edit prompts), Generality (rephrases), Locality both as
"still correct" (answers the model had right, e.g. D_loc) and as "unchanged" (same output as the
model before the edit; needs a `snapshot` of the unedited model), Portability when the data has it.

CounterFact (Meng et al. 2022, ROME; NSE's tables): Efficacy / Generalization / Specificity
compare the mean per-token NLL of target_new and target_true; Fluency is ROME's n-gram entropy of
generations. Hallucination (SCEN/GRACE): perplexity of a text given a prompt, prompt masked,
per sample, averaged over samples.

How a method plugs in: every evaluation function takes an `EvalModel`, two callables:
    logits(tokens, attention_mask, prompt_end) -> (B, T, V) logits
        tokens right-padded, prompt_end[i] = index of row i's last prompt token
    generate(prompts, max_new_tokens, *, stop_strings, temperature, top_k, generator) -> new ids
`LlamaEvalModel(model, tokenizer, template, prepare=None)` wraps a plain llama.Llama; its
optional `prepare(tokens, attention_mask, prompt_end)` callback runs before every forward pass
that starts a query (teacher-forced pass, generation prefill), which is where a router such as
SCEN's picks the expert of each row. Anything else with `logits` and `generate` methods works too.

CLI: python eval.py --ckpt DIR --data FILE  evaluates an unedited checkpoint and writes
results.json + results.md (every figure, its protocol, the run's arguments and timings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import llama
from data import Template, collate, encode_prompt, encode_prompt_target

GEN = "generation exact match (greedy until EOS/stop string, strip, compare; SCEN)"
TF = "teacher-forced token accuracy (argmax at each target position; EasyEdit)"


# --------------------------------------------------------------------------------------------
# The model interface
# --------------------------------------------------------------------------------------------
class LlamaEvalModel:
    """A llama.Llama seen through the two calls the evaluation needs.

    model      llama.Llama (or any module called as model(tokens, attention_mask=...) whose
               generation llama.generate can drive)
    tokenizer  llama.py tokenizer (stop strings are detected on decoded text)
    template   data.Template: its end token (EOS / <|im_end|>) also ends generation
    prepare    optional callback prepare(tokens, attention_mask, prompt_end) run before each
               forward pass that starts a query: generation prefill (left-padded, prompt_end =
               T-1) and the teacher-forced pass (right-padded). A router sets its per-row
               choice there; the choice must hold for the rest of the query.
    """

    def __init__(self, model, tokenizer, template: Template, prepare=None):
        self.model, self.tokenizer, self.template, self.prepare = model, tokenizer, template, prepare
        cfg = model.config
        eos = set(cfg.eos_token_id or [])
        end = template.end_id(tokenizer)
        if end is not None:
            eos.add(end)
        if tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_ids = sorted(eos)
        self.pad_id = pad_id(tokenizer)

    @property
    def device(self):
        return self.model.lm_head.weight.device

    @torch.no_grad()
    def logits(self, tokens, attention_mask, prompt_end):
        tokens, attention_mask = tokens.to(self.device), attention_mask.to(self.device)
        if self.prepare is not None:
            self.prepare(tokens, attention_mask, prompt_end.to(self.device))
        return self.model(tokens, attention_mask=attention_mask).float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, *, stop_strings=(), temperature=0.0, top_k=None,
                 generator=None):
        if self.prepare is not None:
            T = max(len(p) for p in prompts)
            tokens, mask = llama.pad_batch(prompts, self.pad_id, "left", self.device)
            self.prepare(tokens, mask, torch.full((len(prompts),), T - 1, device=self.device))
        return llama.generate(self.model, prompts, max_new_tokens, temperature=temperature,
                              top_k=top_k, eos_ids=self.eos_ids, pad_id=self.pad_id,
                              tokenizer=self.tokenizer, stop_strings=list(stop_strings) or None,
                              generator=generator, pad_side="left")


def as_eval_model(model, tokenizer, template: Template):
    """A torch module (llama.Llama) is wrapped in LlamaEvalModel; anything else is assumed to
    provide logits() and generate() already and is returned as is."""
    if isinstance(model, torch.nn.Module):
        return LlamaEvalModel(model, tokenizer, template)
    if not (callable(getattr(model, "logits", None)) and callable(getattr(model, "generate", None))):
        raise TypeError(f"{type(model).__name__} has no logits()/generate(): wrap it in LlamaEvalModel")
    return model


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return i
    return 0


# --------------------------------------------------------------------------------------------
# Metrics (each a named function; formulas in the docstrings)
# --------------------------------------------------------------------------------------------
def exact_match(prediction: str, target: str) -> bool:
    """EM = [strip(prediction) == strip(target)], case-sensitive (SCEN's official code)."""
    return prediction.strip() == target.strip()


def token_accuracy(pred_ids, target_ids) -> float:
    """acc = (1/n) sum_i [pred_i == target_i] over the n target tokens (EasyEdit)."""
    if len(target_ids) == 0:
        raise ValueError("token_accuracy: empty target")
    return sum(int(p == t) for p, t in zip(pred_ids, target_ids)) / len(target_ids)


def mean_percent(values) -> float:
    """100 * (1/N) sum_j v_j (NaN when N = 0)."""
    values = list(values)
    return 100.0 * sum(float(v) for v in values) / len(values) if values else float("nan")


def unchanged_rate(before, after) -> float:
    """100 * (1/N) sum_j [before_j == after_j]: Locality as "same output as before the edit"."""
    if len(before) != len(after):
        raise ValueError(f"unchanged_rate: {len(before)} outputs before, {len(after)} after")
    return mean_percent(b == a for b, a in zip(before, after))


def unchanged_tokens(before_ids, after_ids) -> float:
    """100 * (1/N) sum_j (1/n_j) sum_i [argmax_before_ji == argmax_after_ji] (EasyEdit's
    teacher-forced locality: share of the answer's positions whose top-1 token did not move)."""
    if len(before_ids) != len(after_ids):
        raise ValueError(f"unchanged_tokens: {len(before_ids)} items before, {len(after_ids)} after")
    return mean_percent(token_accuracy(a, b) for b, a in zip(before_ids, after_ids))


def nll_success(nll_better: float, nll_worse: float) -> bool:
    """CounterFact success: [NLL(expected) < NLL(competitor)], NLL = mean per-token -log p."""
    return nll_better < nll_worse


def perplexity(token_nlls) -> float:
    """PPL = exp((1/n) sum_i -log p(x_i | x_<i, prompt)) over the n scored tokens."""
    token_nlls = list(token_nlls)
    if not token_nlls:
        raise ValueError("perplexity: no tokens")
    return math.exp(sum(token_nlls) / len(token_nlls))


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens for n-gram statistics: runs of word characters and single punctuation marks.
    (ROME uses nltk.word_tokenize; this dependency-free split differs only on contractions and
    a few punctuation clusters.)"""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's n-gram entropy of one text (Meng et al. 2022, compute_n_gram_entropy):

    H_n = -sum_g f_g log2 f_g over the n-grams g of the text's words (f_g = relative frequency);
    result = (1/|ns|) sum_k w_k H_{n_k} = (2/3 H_2 + 4/3 H_3) / 2 with the defaults.
    A text with fewer than n words contributes H_n = 0.
    """
    w = words(text)
    out = []
    for n, wt in zip(ns, weights):
        grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        out.append(wt * h)
    return sum(out) / len(out)


def fluency(texts) -> float:
    """Fluency = 100 * mean_j ngram_entropy(text_j) (ROME/NSE tables report it x100, e.g. 622)."""
    return mean_percent(ngram_entropy(t) for t in texts)


# --------------------------------------------------------------------------------------------
# Batched primitives
# --------------------------------------------------------------------------------------------
def _by_length(lengths, batch_size):
    """Batches of indices, longest first (less padding); callers put results back in order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def score_targets(em, tokenizer, template: Template, pairs, *, batch_size: int = 16,
                  add_eos: bool = False, max_len: int | None = None):
    """Teacher-forced pass over (prompt, target) pairs.

    Returns, per pair, a dict: ids (target token ids), argmax (the model's top-1 at each target
    position), nll (list of -log p per target token). Positions: the logits at t-1 score token t.
    add_eos: also score the template's end token. max_len: keep the first max_len tokens
    (prompt + target) of each pair.
    """
    em = as_eval_model(em, tokenizer, template)
    encs = [encode_prompt_target(tokenizer, template, p, t, add_eos=add_eos) for p, t in pairs]
    if max_len is not None:
        encs = [data.Encoded(e.ids[:max_len], min(e.target_start, max_len), min(e.target_end, max_len),
                             e.how) for e in encs]
    for e, (p, t) in zip(encs, pairs):
        if e.target_start == 0:
            raise ValueError(f"the first target token has no prompt to be predicted from "
                             f"(empty prompt and no BOS): {t[:40]!r}")
        if len(e.ids) <= e.target_start:
            raise ValueError(f"no target tokens left (max_len too small?): {p[:40]!r}")
    out = [None] * len(encs)
    pid = pad_id(tokenizer)
    for idx in _by_length([len(e.ids) for e in encs], batch_size):
        batch = collate([encs[i] for i in idx], pid, side="right")
        logits = em.logits(batch.tokens, batch.attention_mask, batch.prompt_end)
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(idx):
            e = encs[i]
            end = len(e.ids) if add_eos else e.target_end      # with add_eos: the end token too
            pos = torch.arange(e.target_start, end)
            tgt = torch.tensor(e.ids[e.target_start:end])
            lp = logp[r, pos - 1]
            out[i] = {"ids": tgt.tolist(), "argmax": lp.argmax(-1).tolist(),
                      "nll": (-lp.gather(-1, tgt[:, None].to(lp.device))[:, 0]).tolist()}
    return out


def generate_answers(em, tokenizer, template: Template, prompts, *, max_new_tokens: int = 32,
                     batch_size: int = 16, stop_strings=None, temperature: float = 0.0,
                     top_k: int | None = None, seed: int = 0, include_prompt: bool = False):
    """Greedy (or sampled) continuations of the templated prompts, as text.

    The text is decoded with special tokens kept, cut at the first stop string (default: the
    template's), and stripped; include_prompt=True returns prompt + continuation unstripped
    (fluency is measured on that, as ROME does).
    """
    em = as_eval_model(em, tokenizer, template)
    stops = template.stop_strings if stop_strings is None else tuple(stop_strings)
    encs = [encode_prompt(tokenizer, template, p) for p in prompts]
    gen = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    out = [None] * len(encs)
    for idx in _by_length([len(e) for e in encs], batch_size):
        new = em.generate([encs[i] for i in idx], max_new_tokens, stop_strings=stops,
                          temperature=temperature, top_k=top_k, generator=gen)
        for i, ids in zip(idx, new):
            text = tokenizer.decode(ids)
            for s in stops:
                text = text.split(s)[0]
            out[i] = (template.prompt_text(tokenizer, prompts[i]) + text) if include_prompt \
                else text.strip()
    return out


# --------------------------------------------------------------------------------------------
# QA edits: Reliability, Generality, Locality, Portability
# --------------------------------------------------------------------------------------------
class Snapshot(dict):
    """Outputs of a model on (prompt, answer) pairs, kept to measure "unchanged" later:
    {"pairs": [...], "texts": [generated answers], "argmax": [teacher-forced top-1 ids]}."""


def snapshot(em, tokenizer, template: Template, pairs, *, max_new_tokens: int = 32,
             batch_size: int = 16) -> Snapshot:
    """Record the (unedited) model's generations and teacher-forced argmaxes on `pairs`."""
    pairs = [tuple(p) for p in pairs]
    texts = generate_answers(em, tokenizer, template, [p for p, _ in pairs],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    sc = score_targets(em, tokenizer, template, pairs, batch_size=batch_size)
    return Snapshot(pairs=pairs, texts=texts, argmax=[s["argmax"] for s in sc])


def _qa_block(em, tokenizer, template, pairs, name, what, max_new_tokens, batch_size, details):
    if not pairs:
        return None
    texts = generate_answers(em, tokenizer, template, [p for p, _ in pairs],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    sc = score_targets(em, tokenizer, template, pairs, batch_size=batch_size)
    em_ok = [exact_match(x, t) for x, (_, t) in zip(texts, pairs)]
    tf = [token_accuracy(s["argmax"], s["ids"]) for s in sc]
    if details is not None:
        details[name] = [{"prompt": p, "target": t, "generated": x, "exact": e, "tf_acc": a}
                         for (p, t), x, e, a in zip(pairs, texts, em_ok, tf)]
    return {f"{name} (gen)": metric(mean_percent(em_ok), GEN + f"; {what}", len(pairs)),
            f"{name} (tf)": metric(mean_percent(tf), TF + f"; {what}", len(pairs))}, texts, sc


def metric(value: float, protocol: str, n: int) -> dict:
    """One reported figure: its value (percent unless said), protocol and number of items."""
    return {"value": value, "protocol": protocol, "n": n}


def evaluate_qa(em, tokenizer, template: Template, edits, *, loc_pairs=None, before: Snapshot | None = None,
                max_rephrases: int | None = 3, max_new_tokens: int = 32, batch_size: int = 16,
                details: dict | None = None) -> dict:
    """Reliability / Generality / Locality (/ Portability) of QA edits, both protocols.

    edits        EditRecords; target_new is the answer the model must give
    loc_pairs    (prompt, answer) pairs for Locality; None = every record's `locality` pairs
    before       Snapshot of the unedited model on the same loc_pairs: adds Locality
                 "unchanged" (generation identical; teacher-forced argmax identical)
    max_rephrases  rephrases used per edit for Generality (SCEN: the first 3); None = all
    Reliability = mean over edits; Generality = mean over all rephrase queries; Locality
    "still correct" = mean over loc pairs of the score against their answer.
    details      a dict to receive per-query rows (generated text, EM, token accuracy)
    """
    out = {}
    rel = [(r.prompt, r.target_new) for r in edits]
    gen = [(q, r.target_new) for r in edits for q in r.rephrases[:max_rephrases]]
    if loc_pairs is None:
        loc_pairs = [tuple(p) for r in edits for p in r.locality]
    loc_pairs = [tuple(p) for p in loc_pairs]
    port = [tuple(p) for r in edits for p in r.portability]
    for name, pairs, what in (("Reliability", rel, "edit prompts -> target_new"),
                              ("Generality", gen, "rephrased prompts -> target_new"),
                              ("Locality", loc_pairs, "unrelated prompts -> their own answer "
                                                      "(still correct)"),
                              ("Portability", port, "portability prompts -> their answer")):
        res = _qa_block(em, tokenizer, template, pairs, name, what, max_new_tokens, batch_size, details)
        if res is None:
            continue
        figs, texts, sc = res
        out.update(figs)
        if name == "Locality" and before is not None:
            if [tuple(p) for p in before["pairs"]] != loc_pairs:
                raise ValueError("evaluate_qa: the snapshot was taken on other locality pairs")
            out["Locality unchanged (gen)"] = metric(
                unchanged_rate(before["texts"], texts),
                "generated answer identical to the unedited model's (greedy, stripped)", len(texts))
            out["Locality unchanged (tf)"] = metric(
                unchanged_tokens(before["argmax"], [s["argmax"] for s in sc]),
                "teacher-forced top-1 token identical to the unedited model's, per answer "
                "position (EasyEdit locality)", len(texts))
    return out


# --------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------
def evaluate_counterfact(em, tokenizer, edits, *, template: Template | None = None,
                         with_fluency: bool = True, fluency_tokens: int = 100, fluency_top_k: int = 5,
                         seed: int = 0, batch_size: int = 16, details: dict | None = None) -> dict:
    """Efficacy / Generalization / Specificity (/ Fluency) as in ROME and NSE, x100.

    NLL(x | p) = mean per-token -log p of target x after prompt p (raw template, no EOS).
    Efficacy       = mean over records of [NLL(new | prompt) < NLL(true | prompt)]
    Generalization = mean over records of mean over rephrases of [NLL(new | r) < NLL(true | r)]
    Specificity    = mean over records of mean over neighbourhood pairs (q, a) of
                     [NLL(a | q) < NLL(new | q)]   (a = target_true in CounterFact)
    Fluency        = 100 * mean ngram_entropy(prompt + generation), generations of
                     `fluency_tokens` tokens sampled top-k (k = 5, seeded) as ROME does.
    Records need target_true.
    """
    template = template or Template("raw")
    for k, r in enumerate(edits):
        if r.target_true is None:
            raise ValueError(f"evaluate_counterfact: record {k} ({r.prompt[:40]!r}) has no target_true")
    queries, owners = [], []   # pairs of (prompt, target) queries; (record, group) per pair
    for k, r in enumerate(edits):
        for group, prompts in (("eff", [r.prompt]), ("gen", r.rephrases)):
            for p in prompts:
                queries += [(p, r.target_new), (p, r.target_true)]
                owners.append((k, group))
        for q, a in r.locality:
            queries += [(q, a), (q, r.target_new)]
            owners.append((k, "spe"))
    sc = score_targets(em, tokenizer, template, queries, batch_size=batch_size)
    nll = [sum(s["nll"]) / len(s["nll"]) for s in sc]
    per = {g: [[] for _ in edits] for g in ("eff", "gen", "spe")}
    for j, (k, g) in enumerate(owners):
        per[g][k].append(nll_success(nll[2 * j], nll[2 * j + 1]))
    out = {}
    for g, name, what in (("eff", "Efficacy", "edit prompt: NLL(target_new) < NLL(target_true)"),
                          ("gen", "Generalization", "rephrases: NLL(target_new) < NLL(target_true), "
                                                    "mean per record"),
                          ("spe", "Specificity", "neighbourhood prompts: NLL(own answer) < "
                                                 "NLL(target_new), mean per record")):
        recs = [sum(v) / len(v) for v in per[g] if v]
        if recs:
            out[name] = metric(mean_percent(recs), "mean per-token NLL comparison (ROME/NSE); " + what,
                               len(recs))
    if details is not None:
        details["counterfact"] = [{"prompt": r.prompt, "target_new": r.target_new,
                                   "target_true": r.target_true, "efficacy": per["eff"][k],
                                   "generalization": per["gen"][k], "specificity": per["spe"][k]}
                                  for k, r in enumerate(edits)]
    if with_fluency:
        out.update(evaluate_fluency(em, tokenizer, edits, template=template, tokens=fluency_tokens,
                                    top_k=fluency_top_k, seed=seed, batch_size=batch_size, details=details))
    return out


def evaluate_fluency(em, tokenizer, edits, *, template: Template | None = None, tokens: int = 100,
                     top_k: int = 5, seed: int = 0, batch_size: int = 16, details: dict | None = None) -> dict:
    """Fluency (ROME): 100 * mean ngram_entropy(prompt + generation) over the records' generation
    prompts (their edit prompts when they have none), `tokens` tokens sampled top-k, seeded."""
    template = template or Template("raw")
    prompts = [p for r in edits for p in (r.meta.get("generation_prompts") or [r.prompt])]
    texts = generate_answers(em, tokenizer, template, prompts, max_new_tokens=tokens, batch_size=batch_size,
                             stop_strings=(), temperature=1.0, top_k=top_k, seed=seed, include_prompt=True)
    if details is not None:
        details["fluency_texts"] = texts
    return {"Fluency": metric(fluency(texts), f"ROME n-gram entropy x100: (2/3 H2 + 4/3 H3)/2 in bits over "
                              f"words of prompt + {tokens} sampled tokens (top-{top_k}, seed {seed})", len(texts))}


# --------------------------------------------------------------------------------------------
# Relation specificity: the edited subject's other facts (data.relation_probes)
# --------------------------------------------------------------------------------------------
def relation_snapshot(em, tokenizer, edits, probes, *, template: Template | None = None,
                      max_new_tokens: int = 8, batch_size: int = 16) -> Snapshot:
    """The unedited model's own answers to each edit's same-subject probes: greedy, cut at the first
    '.', ',' or newline; pairs (probe, answer) with their edit's index, and the teacher-forced
    top-1 ids on them (what "unchanged" compares against). Probes the model answers with nothing,
    or with the edit's target_new, are left out."""
    template = template or Template("raw")
    flat = [(k, p) for k, ps in enumerate(probes) for p in ps]
    texts = generate_answers(em, tokenizer, template, [p for _, p in flat], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    pairs, owner = [], []
    for (k, p), t in zip(flat, texts):
        a = t.split("\n")[0].split(".")[0].split(",")[0].strip()
        if a and a != edits[k].target_new.strip():
            pairs.append((p, a))
            owner.append(k)
    sc = score_targets(em, tokenizer, template, pairs, batch_size=batch_size)
    return Snapshot(pairs=pairs, owner=owner, argmax=[s["argmax"] for s in sc])


def evaluate_relation_specificity(em, tokenizer, edits, before: Snapshot, *, template: Template | None = None,
                                  batch_size: int = 16) -> dict:
    """Relation specificity, two ways, on prompts asking OTHER relations of each edited subject
    (the side effect neighbourhood prompts about other subjects do not show):
    unchanged      = mean over probes of the share of the unedited answer's positions whose
                     teacher-forced top-1 token did not move (EasyEdit's locality; 100 unedited)
    own > new      = mean over edits of mean over their probes of [NLL(own answer) < NLL(target_new)]
                     (CounterFact Specificity's comparison; own answer = the unedited model's)."""
    template = template or Template("raw")
    pairs, owner = [tuple(p) for p in before["pairs"]], before["owner"]
    if not pairs:
        return {}
    sc = score_targets(em, tokenizer, template, pairs + [(p, edits[k].target_new) for (p, _), k in zip(pairs, owner)],
                       batch_size=batch_size)
    n = len(pairs)
    nll = [sum(s["nll"]) / len(s["nll"]) for s in sc]
    per: dict[int, list] = {}
    for j, k in enumerate(owner):
        per.setdefault(k, []).append(nll_success(nll[j], nll[n + j]))
    what = "prompts asking other relations of the edited subject (data.relation_probes)"
    return {"Relation specificity (unchanged, tf)": metric(
                unchanged_tokens(before["argmax"], [s["argmax"] for s in sc[:n]]),
                TF + f"; unedited model's answer tokens still top-1; {what}", n),
            "Relation specificity (own > new)": metric(
                mean_percent(sum(v) / len(v) for v in per.values()),
                f"mean per-token NLL comparison: NLL(unedited model's answer) < NLL(target_new); {what}", len(per))}


# --------------------------------------------------------------------------------------------
# Perplexity (hallucination task)
# --------------------------------------------------------------------------------------------
def evaluate_perplexity(em, tokenizer, pairs, *, template: Template | None = None, batch_size: int = 8,
                        max_len: int = 1024, name: str = "PPL") -> dict:
    """Perplexity of each text given its prompt (prompt tokens masked), SCEN/GRACE style.

    pairs   (prompt, text); an empty prompt scores the text from its second token on when the
            tokenizer adds no BOS, from its first when it does
    Per sample: PPL_j = exp(mean NLL of text_j's tokens given prompt_j) (first max_len tokens).
    Reported: "<name>" = (1/N) sum_j PPL_j (the averaged per-sample figure SCEN/GRACE print) and
    "<name> (token-weighted)" = exp(sum of NLL / number of tokens), plus the per-sample list.
    """
    template = template or Template("raw")
    fixed = []
    for p, t in pairs:
        if p == "" and not tokenizer.add_bos:       # first token has nothing to be predicted from
            ids = tokenizer.encode(t, bos=False)
            if len(ids) < 2:
                raise ValueError(f"evaluate_perplexity: text too short to score: {t[:40]!r}")
            first = tokenizer.decode(ids[:1])
            fixed.append((first, t[len(first):] if t.startswith(first) else tokenizer.decode(ids[1:])))
        else:
            fixed.append((p, t))
    sc = score_targets(em, tokenizer, template, fixed, batch_size=batch_size, max_len=max_len)
    per = [perplexity(s["nll"]) for s in sc]
    n_tok = sum(len(s["nll"]) for s in sc)
    out = {name: metric(sum(per) / len(per), "mean over samples of exp(mean NLL of the text given "
                        "its prompt), prompt masked (SCEN/GRACE)", len(per)),
           f"{name} (token-weighted)": metric(math.exp(sum(sum(s["nll"]) for s in sc) / n_tok),
                                              "exp(total NLL / total text tokens)", len(per))}
    out[name]["per_sample"] = per
    out[name]["unit"] = "perplexity"
    out[f"{name} (token-weighted)"]["unit"] = "perplexity"
    return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
class Report:
    """Every figure of a run with its protocol, the run's arguments and timings.

    add(section, figures)  figures as returned by the evaluate_* functions
    timer(name)            context manager adding the elapsed seconds under timings[name]
    write(out_dir)         results.json and results.md, each written atomically
    """

    def __init__(self, title: str, args: dict | None = None):
        self.title = title
        self.args = dict(args or {})
        self.sections: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def add(self, section: str, figures: dict) -> None:
        self.sections.setdefault(section, {}).update(figures)

    @contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict:
        return {"title": self.title, "started": self.started, "args": self.args,
                "results": self.sections, "timings_s": self.timings, "notes": self.notes}

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for sec, figs in self.sections.items():
            lines += [f"## {sec}", "", "| metric | value | n | protocol |", "|---|---|---|---|"]
            for name, f in figs.items():
                v = f["value"]
                vs = f"{v:.2f}" if isinstance(v, float) else str(v)
                lines.append(f"| {name} | {vs} | {f.get('n', '')} | {f.get('protocol', '')} |")
            lines.append("")
        if self.timings:
            lines += ["## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in self.timings.items()] + [""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def write(self, out_dir) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        j, m = out_dir / "results.json", out_dir / "results.md"
        data.atomic_write_text(j, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        data.atomic_write_text(m, self.markdown())
        return j, m


def table(figures: dict, title: str | None = None) -> str:
    """One section of figures for the terminal, under a title line."""
    return "\n".join(([title] if title else []) + [side_by_side({"value": figures})])


def side_by_side(sections: dict, prefixes=None) -> str:
    """One terminal table, a column per section ("unedited", "scen", ...), a row per metric (those
    starting with one of `prefixes`, or all), with each metric's n."""
    names = list(dict.fromkeys(k for figs in sections.values() for k in figs
                               if prefixes is None or k.startswith(tuple(prefixes))))
    w = max([len(k) for k in names] + [6])
    cell = lambda f: "" if f is None else f"{f['value']:.2f}" if isinstance(f["value"], float) else str(f["value"])
    lines = [f"{'':<{w}}" + "".join(f"{s:>12}" for s in sections) + "     n"]
    for k in names:
        n = next(figs[k].get("n", "") for figs in sections.values() if k in figs)
        lines.append(f"{k:<{w}}" + "".join(f"{cell(figs.get(k)):>12}" for figs in sections.values()) + f"  {n:>4}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Editors: the one shape every method has
# --------------------------------------------------------------------------------------------
def setting(default, help: str, **meta):
    """A Settings field with its command-line help beside it (the harness makes one flag per
    field). meta: choices=(...), and bounds min= / max= (inclusive), gt= / lt= (strict)."""
    return field(default=default, metadata={"help": help, **meta})


BOUNDS = {"min": (lambda v, b: v >= b, ">=", "["), "gt": (lambda v, b: v > b, ">", "("),
          "max": (lambda v, b: v <= b, "<=", "]"), "lt": (lambda v, b: v < b, "<", ")")}


def check_bounds(s) -> None:
    """Every field of a Settings dataclass within its declared choices and bounds (None = unset);
    the message gives the interval when the field has both ends, e.g. "theta 2.0: must be in (0, 1)"."""
    for f in fields(s):
        v = getattr(s, f.name)
        if v is None:
            continue
        if "choices" in f.metadata and v not in f.metadata["choices"]:
            raise RunError(f"{f.name} {v!r}: must be one of {', '.join(map(str, f.metadata['choices']))}")
        ends = [(k, f.metadata[k]) for k in BOUNDS if k in f.metadata]
        if not all(BOUNDS[k][0](x, b) for k, b in ends for x in (v if isinstance(v, list) else [v])):
            if len(ends) == 2:
                (lo, a), (hi, b) = ends
                raise RunError(f"{f.name} {v}: must be in {BOUNDS[lo][2]}{a}, {b}{BOUNDS[hi][2]}")
            raise RunError(f"{f.name} {v}: must be {BOUNDS[ends[0][0]][1]} {ends[0][1]}")


def as_records(records=None, *, prompts=None, target_new=None, subject=None) -> list:
    """EditRecords, from records or from parallel lists prompts= / target_new= (/ subject=)."""
    if records is not None:
        if prompts is not None or target_new is not None:
            raise ValueError("edit(): give records, or prompts= and target_new=, not both")
        return [records] if isinstance(records, data.EditRecord) else list(records)
    if prompts is None or target_new is None:
        raise ValueError("edit(): give records, or prompts= and target_new=")
    if isinstance(prompts, str):
        prompts, target_new, subject = [prompts], [target_new], None if subject is None else [subject]
    subject = [None] * len(prompts) if subject is None else list(subject)
    if not len(prompts) == len(target_new) == len(subject):
        raise ValueError(f"edit(): {len(prompts)} prompts, {len(target_new)} targets, {len(subject)} subjects")
    return [data.EditRecord(p, t, subject=s, meta={"source": f"edit()[{i}]"})
            for i, (p, t, s) in enumerate(zip(prompts, target_new, subject))]


class Editor:
    """What every method's editor is (scen.Editor, nse.Editor, ...):

        ed = Editor(model, tokenizer, settings, template=..., **inputs)
        ed.edit(records) / ed.edit(prompts=[...], target_new=[...], subject=[...])
                            sequential edits; one log row per edit (or per batch)
        ed.generate(prompts) -> answers (text) with the edits applied
        ed.save(out); Editor.load(out, model, tokenizer); ed.restore()  (unedited weights back)

    A subclass implements `apply(records) -> rows`, `save`, `load`, `restore`, `saved(out)`, and
    may set `prepare` (a router's hook, see LlamaEvalModel) and `check(records)` (refuse what the
    method cannot edit). `unit` is how many edits make one log row (the harness saves after each).
    For the run harness it also names its `Settings` dataclass, its default template, its
    presets, and the inputs beyond the edits it needs (`add_inputs`, `inputs_from`).
    """
    name = "editor"
    description = ""
    Settings = None
    default_template = "auto"
    presets: dict = {}
    needs_subject = False
    prepare = None

    def __init__(self, model, tokenizer, template="auto"):
        self.model, self.tokenizer = model, tokenizer
        if isinstance(template, str):
            template = data.template_for(tokenizer, template) if tokenizer is not None else Template(
                "raw" if template == "auto" else template)
        self.template = template
        self.log: list[dict] = []

    @property
    def unit(self) -> int:
        return 1

    @property
    def n_edits(self) -> int:
        return sum(r.get("n", 1) for r in self.log)

    @classmethod
    def subject_needed(cls, settings) -> bool:
        """Whether every record must name its subject (in its prompt) under these settings."""
        return cls.needs_subject

    def check(self, records) -> None:
        for r in records:
            data.check_record(r, self.subject_needed(getattr(self, "s", None)))

    def edit(self, records=None, *, prompts=None, target_new=None, subject=None) -> list[dict]:
        records = as_records(records, prompts=prompts, target_new=target_new, subject=subject)
        self.check(records)
        return self.apply(records)

    def eval_model(self) -> "LlamaEvalModel":
        return LlamaEvalModel(self.model, self.tokenizer, self.template, prepare=self.prepare)

    def generate(self, prompts, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
        """Greedy answers to the templated prompts, with the edits applied."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_answers(self.eval_model(), self.tokenizer, self.template, prompts,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)

    def note(self) -> str | None:
        """What the last query did, for the terminal (SCEN: which expert answered)."""
        return None

    # -- what the run harness asks of a method (defaults: nothing beyond the edits) -----------
    @classmethod
    def check_settings(cls, s, config) -> None:
        """Refuse settings that cannot work on this checkpoint (config.json), naming the field."""
        check_bounds(s)

    @classmethod
    def add_inputs(cls, group) -> None:
        """Command-line flags for the method's inputs beyond the edits (files, folders)."""

    @classmethod
    def inputs_from(cls, args, records) -> dict:
        """The keyword arguments of __init__ made from those flags, checked before any work."""
        return {}

    def report_notes(self) -> list[str]:
        return []


# --------------------------------------------------------------------------------------------
# The run harness both CLIs share
# --------------------------------------------------------------------------------------------
class RunError(ValueError):
    """A bad argument, input or run folder, found before any work; the message names it."""


def _flag_type(f):
    t = str(f.type).replace(" ", "")
    if t.startswith("bool"):
        return parse_bool
    if t.startswith("list[int]"):
        return int_list
    return {"int": int, "float": float}.get(t.split("|")[0], str)


def int_list(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,5,6, got {v!r}")


def at_least(lo: int):
    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {x}")
        return x
    return parse


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and the problem), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(method) -> argparse.ArgumentParser:
    """The common flags, then one flag per field of method.Settings (help from the field), then
    the method's inputs (method.add_inputs) and presets (method.PRESETS)."""
    ap = Parser(prog=f"{method.name}.py", description=method.description)
    a = ap.add_argument_group("run").add_argument
    a("--ckpt", help="base checkpoint folder (Hugging Face layout); never modified")
    a("--edits", help="edit records (.json/.jsonl: ZsRE, EasyEdit, CounterFact, the project's JSONL)")
    a("--format", choices=data.FORMATS, help="edits format (default: detected)")
    a("--n", type=at_least(1), help="edit the first n records (default: all)")
    a("--loc", help="QA: records whose (prompt, target_new) are the Locality pairs (e.g. D_loc)")
    a("--template", choices=["auto", *data.TEMPLATES], help="prompt template (default: raw for "
      "CounterFact completions, else " + method.default_template + "; auto = the checkpoint's chat format)")
    a("--system", help="chatml/llama3: the system message ('' = none; default: the template's)")
    a("--out", help="run folder: edits, log, results.json/.md (refused if it holds a run, unless --resume)")
    a("--resume", action="store_true", help="continue the run in --out (same settings, data, checkpoint)")
    a("--load-edits", metavar="OUT", help="a run folder whose edits answer --prompt")
    a("--prompt", help="with --load-edits: the prompt to answer")
    a("--export", metavar="OUT", help="methods whose result is a plain checkpoint (NSE, MEMIT, AlphaEdit): write "
      "OUT/model from the edits saved in the run folder OUT, finished or not (--export-dtype applies)")
    a("--no-baseline", action="store_true", help="skip evaluating the unedited model")
    a("--no-fluency", action="store_true", help="CounterFact: skip the Fluency generations")
    a("--max-new-tokens", type=at_least(1), default=32, help="generation length for answers")
    a("--eval-batch-size", type=at_least(1), default=16, help="queries per evaluation forward pass")
    a("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    a("--dtype", choices=list(llama.DTYPES), help="weights dtype (default: float32 on cpu, bfloat16 "
      "elsewhere); on a CPU computation is float32 anyway")
    a("--threads", type=at_least(1), help="torch CPU threads (default: torch's)")
    a("--export-dtype", choices=list(llama.DTYPES), help="methods whose result is a plain checkpoint (NSE, "
      "MEMIT): its weights dtype in OUT/model (default: the dtype of --ckpt's config.json)")
    g = ap.add_argument_group(f"{method.name} settings (default: the Settings dataclass)")
    for f in fields(method.Settings):
        g.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f), default=None,
                       choices=f.metadata.get("choices"), help=f.metadata.get("help"))
    for name, preset in method.presets.items():
        g.add_argument(f"--{name}", action="store_true", help=preset["help"])
    method.add_inputs(ap.add_argument_group(f"{method.name} inputs"))
    return ap


def settings_from(method, args):
    """Settings: the dataclass defaults, a preset if one is given, then every flag given."""
    base = {}
    for name, preset in method.presets.items():
        if getattr(args, name, False):
            base.update({k: v for k, v in preset.items() if k != "help"})
    given = {f.name: getattr(args, f.name) for f in fields(method.Settings) if getattr(args, f.name, None) is not None}
    return method.Settings(**{**base, **given})


def digest(obj) -> str:
    """A fingerprint of anything JSON can write: edit records' content, a list of prompts."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def progress(i: int, n: int, seconds: float, done0: int, row: dict) -> str:
    """One flushed line: edits done, edits/s over the `seconds` the edits since done0 took (one-time
    set-up such as NSE's C0 left out), ETA, and the method's note on the last row."""
    rate = (i - done0) / max(seconds, 1e-9)
    eta = (n - i) / rate if rate > 0 else float("nan")
    return (f"edit {i}/{n}  {rate:.3f} edits/s  ETA {eta / 60:.1f} min"
            + (f"  | {row['note']}" if row.get("note") else ""))


def say(msg: str) -> None:
    print(msg, flush=True)


def _key(v) -> str:
    """How an input is compared on --resume: a list by its content's digest, else its text."""
    if isinstance(v, (list, tuple)):
        return "sha:" + digest(v)
    return str(Path(v).resolve()) if isinstance(v, Path) else str(v)


def run(method, argv=None, log=say) -> "Report | None":
    """The command line of a method module (scen, nse): validate everything, load, evaluate the
    unedited model, edit in sequence (saving after every log row, resuming from --out), evaluate
    the edited model, write results.json + results.md. Returns the Report."""
    args = parser(method).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.load_edits:
            return query(method, args, log)
        if args.export:
            return export_run(method, args, log)
        return _edit_run(method, args, log)
    except (RunError, data.DataError, llama.CheckpointError) as e:         # found before any work
        raise SystemExit(f"error: {e}")


def query(method, args, log=say):
    """--load-edits OUT --prompt "...": the saved edits answer one prompt."""
    if not args.prompt:
        raise RunError("--load-edits needs --prompt")
    out = Path(args.load_edits)
    run_info = _run_info(method, out)
    model, tok = llama.load(run_info["ckpt"], args.device, args.dtype)
    ed = method.load(out, model, tok)
    answer = ed.generate([args.prompt], args.max_new_tokens)[0]
    if ed.note():
        print(ed.note(), file=sys.stderr)
    log(answer)
    return answer


def _run_info(method, out: Path) -> dict:
    if not (out / "run.json").exists():
        raise RunError(f"{out}: no run.json (not a run folder)")
    run_info = json.loads((out / "run.json").read_text())
    if run_info["method"] != method.name:
        raise RunError(f"{out}/run.json: method: the run is {run_info['method']}, not {method.name}")
    if not method.saved(out):
        raise RunError(f"{out}: the run holds no saved edits yet")
    return run_info


def export_run(method, args, log=say):
    """--export OUT: the edited model of a run folder as a plain checkpoint, OUT/model."""
    if not hasattr(method, "export"):
        raise RunError(f"--export: {method.name}'s edits are not a plain checkpoint (they need its router)")
    out = Path(args.export)
    run_info = _run_info(method, out)
    model, tok = llama.load(run_info["ckpt"], args.device, args.dtype)
    ed = method.load(out, model, tok)
    dtype = ed.export(out / "model", tokenizer_dir=run_info["ckpt"], dtype=args.export_dtype)
    log(f"{out / 'model'}: the model after {ed.n_edits} edits, weights in {dtype}")
    return out / "model"


def _edit_run(method, args, log):
    if not args.ckpt or not args.edits:
        raise RunError("give --ckpt and --edits (or no arguments for the demo, or --load-edits OUT --prompt ...)")
    # 1. every input and setting checked before the model is loaded
    cfg = llama.LlamaConfig.from_file(Path(args.ckpt) / "config.json")
    settings = settings_from(method, args)
    records = data.load_edits(args.edits, args.format, n=args.n,
                              require_subject=method.subject_needed(settings))
    if args.n is not None and len(records) < args.n:
        raise RunError(f"--n {args.n}: {args.edits} holds {len(records)} records")
    loc = data.load_edits(args.loc) if args.loc else None
    method.check_settings(settings, cfg)
    inputs = method.inputs_from(args, records)
    task = guess_task(records, args.format)
    tname = args.template or ("raw" if task == "counterfact" else method.default_template)
    out = Path(args.out) if args.out else None
    info = {"method": method.name, "settings": asdict(settings), "ckpt": str(Path(args.ckpt).resolve()),
            "edits": str(Path(args.edits).resolve()), "records": digest([r.to_dict() for r in records]),
            "n": len(records), "loc": digest([r.to_dict() for r in loc]) if loc else None, "template": tname,
            "system": args.system, "inputs": {k: _key(v) for k, v in inputs.items()}}
    tok = llama.load_tokenizer(args.ckpt)
    try:
        template = data.template_for(tok, tname, args.system)
        template.prompt_text(tok, "?")                  # a chat template the tokenizer does not have
    except ValueError as e:
        raise RunError(f"--template {tname}: {e}")
    if task == "qa" and template.kind != "raw" and template.end_id(tok) is None:
        raise RunError(f"{args.ckpt}: the tokenizer has no end token (EOS) to end an answer")
    old = _check_out(out, args.resume, info)
    # 2. load, the editor (a resumed one from --out), the unedited figures
    model = llama.load_model(args.ckpt, args.device, args.dtype)            # the tokenizer is loaded
    rep = Report(f"{method.name} sequential editing, {len(records)} records of {Path(args.edits).name}",
                 {**info, "device": args.device, "dtype": str(model.dtype), "threads": torch.get_num_threads()})
    if old is not None and method.saved(out):
        ed = method.load(out, model, tok)
        log(f"resuming after {ed.n_edits} of {len(records)} edits")
    else:
        ed = method(model, tok, settings, template=template, **inputs)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        llama.write_json(out / "run.json", info if old is None else old)
    rel = Snapshot(old["relation_snapshot"]) if old is not None and "relation_snapshot" in old else None
    if rel is None and ed.n_edits == 0 and task == "counterfact" and all(r.subject for r in records):
        probes = data.relation_probes(records, data.load_edits(args.edits, args.format))   # the whole file
        if any(probes):                                  # the unedited model's answers, before any edit
            rel = relation_snapshot(ed.eval_model(), tok, records, probes, batch_size=args.eval_batch_size)
            if out:
                llama.write_json(out / "run.json", {**(old or info), "relation_snapshot": dict(rel)})
    if rel is not None:
        info = {**info, "relation_snapshot": dict(rel)}

    def evaluate(em):
        figs = _evaluate(task, em, tok, template, records, loc, args)
        if rel is not None:
            figs.update(evaluate_relation_specificity(em, tok, records, rel, batch_size=args.eval_batch_size))
        return figs
    if old is not None and "unedited" in old:
        rep.add("unedited", old["unedited"])
    elif not args.no_baseline:
        with rep.timer("eval unedited"):
            rep.add("unedited", evaluate(ed.eval_model()))
        if out:
            llama.write_json(out / "run.json", {**info, "unedited": rep.sections["unedited"]})
        log(side_by_side({"unedited": rep.sections["unedited"]}))
    # 3. sequential edits, saved after every log row
    done0, rows0 = ed.n_edits, len(ed.log)
    with rep.timer("editing"):
        for i in range(done0, len(records), ed.unit):
            rows = ed.edit(records[i:i + ed.unit])
            if out:
                ed.save(out)
            log(progress(ed.n_edits, len(records), sum(r["seconds"] for r in ed.log[rows0:]), done0, rows[-1]))
    if out and hasattr(ed, "export"):
        with rep.timer("export"):
            dtype = ed.export(out / "model", tokenizer_dir=args.ckpt, dtype=args.export_dtype)
        rep.notes.append(f"{out / 'model'}: the edited model, weights in {dtype}; the edited figures are "
                         f"this checkpoint's (the model in memory was rounded to {dtype} before evaluation)")
    # 4. the edited figures
    name = getattr(ed.s, "method", method.name)                  # scen / ft, nse / memit
    with rep.timer("eval edited"):
        rep.add(name, evaluate(ed.eval_model()))
    secs = [r["seconds"] for r in ed.log]
    per = [r["seconds"] / r.get("n", 1) for r in ed.log]
    rep.add(name, {
        "s/edit (mean)": metric(sum(secs) / max(ed.n_edits, 1), "wall seconds per edit", ed.n_edits),
        "s/edit first": metric(per[0], "wall seconds per edit, first log row", 1),
        "s/edit last": metric(per[-1], "wall seconds per edit, last log row", 1)})
    rep.args["settings_used"] = asdict(ed.s)
    rep.notes += ed.report_notes()
    if out:
        rep.write(out)
    log(side_by_side(rep.sections))
    return rep


def _check_out(out, resume: bool, info: dict):
    """The --out rule: a folder holding a run is refused without --resume; --resume with nothing
    to resume is refused; a resume whose settings, data or checkpoint differ is refused, naming
    the field. Returns the saved run.json (or None for a fresh run)."""
    if out is not None and out.exists():
        for tmp in out.rglob(".*.tmp"):                 # a write that a kill interrupted
            tmp.unlink()
    has_run = out is not None and (out / "run.json").exists()
    if resume and not has_run:
        raise RunError(f"--resume: {out or '(no --out)'} holds no run to resume (no run.json)")
    if has_run and not resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if not has_run:
        if out is not None and out.exists() and any(out.iterdir()):
            raise RunError(f"{out} is not empty and holds no run: give an empty or new folder")
        return None
    old = json.loads((out / "run.json").read_text())
    for k, v in info.items():
        if k == "settings":
            for s, sv in v.items():
                if old["settings"].get(s) != sv:
                    raise RunError(f"{out}/run.json: --resume: setting {s} was {old['settings'].get(s)!r}, now {sv!r}")
        elif old.get(k) != v:
            raise RunError(f"{out}/run.json: --resume: {k} was {old.get(k)!r}, now {v!r}")
    return old


def _evaluate(task, em, tok, template, records, loc, args) -> dict:
    if task == "counterfact":
        return evaluate_counterfact(em, tok, records, with_fluency=not args.no_fluency,
                                    batch_size=args.eval_batch_size)
    if task == "ppl":
        return evaluate_perplexity(em, tok, [(r.prompt, r.target_new) for r in records],
                                   template=template, batch_size=args.eval_batch_size)
    return evaluate_qa(em, tok, template, records, loc_pairs=[(r.prompt, r.target_new) for r in loc] if loc else None,
                       max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def guess_task(records, fmt: str | None) -> str:
    """qa | counterfact | ppl from the data: CounterFact format, or records that all have a
    target_true and completion prompts (not questions) -> counterfact; hallucination -> ppl."""
    if fmt == "counterfact":
        return "counterfact"
    if fmt == "hallucination" or all(r.meta.get("kind") in ("text", "wikibio") for r in records):
        return "ppl"
    if all(r.target_true is not None and r.meta.get("style") != "qa"
           and not r.prompt.rstrip().endswith("?") for r in records):
        return "counterfact"
    return "qa"


def main(argv=None):
    ap = Parser(description="Evaluate an (unedited) checkpoint with the editing "
                                             "protocols: QA (Reliability/Generality/Locality, "
                                             "generation EM and teacher-forced), CounterFact "
                                             "(Efficacy/Generalization/Specificity/Fluency) or "
                                             "perplexity.")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (Hugging Face layout)")
    ap.add_argument("--data", required=True, help="edit file (.json or .jsonl)")
    ap.add_argument("--format", choices=data.FORMATS, default=None, help="data format (default: detect)")
    ap.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                    help="MEND ZsRE: answers[0] (QA evaluation) or alt (counterfactual)")
    ap.add_argument("--task", choices=["auto", "qa", "counterfact", "ppl"], default="auto",
                    help="which protocol (auto: from the data)")
    ap.add_argument("--template", choices=["auto", *data.TEMPLATES], default="auto",
                    help="prompt template for QA (auto: the tokenizer's chat format); "
                         "CounterFact and perplexity always use raw")
    ap.add_argument("--loc", default=None, help="QA: file of records whose (prompt, target_new) "
                                                "are the Locality pairs (e.g. D_loc)")
    ap.add_argument("--n", type=at_least(1), default=None, help="first N records only")
    ap.add_argument("--no-fluency", action="store_true", help="CounterFact: skip Fluency")
    ap.add_argument("--batch-size", type=at_least(1), default=16, help="queries per forward pass")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=32, help="generation length for exact match")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--dtype", choices=list(llama.DTYPES), help="weights dtype (default: float32 on "
                    "cpu, bfloat16 elsewhere); on a CPU computation is float32 anyway")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = data.load_edits(args.data, args.format, zsre_target=args.zsre_target, n=args.n)
        loc = data.load_edits(args.loc) if args.loc else None
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    task = guess_task(records, args.format) if args.task == "auto" else args.task
    report = Report(f"eval.py: {task} on {Path(args.data).name}", vars(args))
    with report.timer("load"):
        try:
            model, tok = llama.load(args.ckpt, args.device, args.dtype)
        except llama.CheckpointError as e:
            raise SystemExit(f"error: {e}")
    model.eval()
    template = data.template_for(tok, args.template) if task == "qa" else Template("raw")
    report.args["template_used"] = template.kind
    em = LlamaEvalModel(model, tok, template)
    with report.timer("evaluate"):
        if task == "qa":
            figs = evaluate_qa(em, tok, template, records,
                               loc_pairs=[(r.prompt, r.target_new) for r in loc] if loc else None,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        elif task == "counterfact":
            figs = evaluate_counterfact(em, tok, records, with_fluency=not args.no_fluency,
                                        batch_size=args.batch_size)
        else:
            figs = evaluate_perplexity(em, tok, [(r.prompt, r.target_new) for r in records],
                                       batch_size=args.batch_size)
    report.add("unedited", figs)
    print(table(figs, f"{task}: {args.data} ({len(records)} records, template {template.kind})"))
    if args.out:
        j, _ = report.write(args.out)
        print(f"wrote {j}")
    return report


if __name__ == "__main__":
    main()
