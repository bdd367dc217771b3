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
results.json + results.md (every figure, its protocol, the run's arguments and timings); the
command line, the reports and the task dispatch are harness.py's, shared with the method CLIs.
"""
from __future__ import annotations

import math
import re
from collections import Counter

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
# Progress of long evaluations: None, or a callable (batches done, batches) the run harness sets.
PROGRESS = None


def _by_length(lengths, batch_size):
    """Batches of indices, longest first (less padding); callers put results back in order. Each
    batch taken is reported to PROGRESS."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for k, b in enumerate(batches):
        yield b
        if PROGRESS is not None:
            PROGRESS(k + 1, len(batches))


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


if __name__ == "__main__":
    import harness                                   # the CLI is the harness's (eval_main)
    harness.eval_main()
