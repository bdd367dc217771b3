"""
nse.py: NSE, neuron-level sequential editing (Jiang et al. 2024, "Neuron-Level Sequential Editing
for Large Language Models"), with its baselines MEMIT (Meng et al. 2023), memit-seq and AlphaEdit
(Fang et al. 2025) as labelled variants of the same steps.

An edit request is (prompt containing a subject s, new target o). The edited layers are a few
consecutive blocks (Llama3-8B: 4-8); their down projections W_down change; l0 is the last of them.
"Keys" k are the down projection's inputs (the FFN neurons). Steps ("step 1".."step 5", as in
shared/docs/METHODS.md), top-down in this file:
  5. C0     = E[k k^T] over a text corpus, per layer, on the unedited model (the prior that keeps
              everything else; MEMIT's K0 K0^T).
  1. z      the target hidden state at the output of block l0, at the subject's last token, found
            on the ORIGINAL weights ("weights rewinding", NSE Fig. 2a).
  2. K, H   keys and current hidden states at the subject, on the current model.
  3. update per edited layer, bottom to top: select the neurons that carry the batch's keys (NSE
            Fig. 2b), spread the residual z - h over the layers left, solve MEMIT Eq. 14 on those
            columns; repeat while requests are still far from z (NSE Fig. 2c: alpha / upper_bound).
  4. Cp     += K K^T of the batch, so later batches protect earlier edits.
The variants (Settings.method):
  memit      MEMIT as published: every neuron, z on the current weights, one pass, no Cp.
  memit-seq  memit with Cp in the solve (the AlphaEdit repository's memit_seq).
  alphaedit  memit-seq's z and keys, the update projected onto the null space of C0.
  nse        all of the above steps.
The closed forms are solved on the CPU in float64. Persistence, the C0 / z caches on disk and the
command line are harness.py's.

    python nse.py                                    # the demo: its own tiny model, end to end
    python nse.py --ckpt DIR --edits counterfact-edit.json --n 200 --batch-size 20 --out runs/nse
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

import data
import harness
import llama
from harness import setting


class EditError(harness.RunError):
    """A request or setting that cannot be edited; the message names the request and field."""


@dataclass
class Settings:
    method: str = setting("nse", "nse; memit (MEMIT as published: every neuron, z on the current weights, one pass, "
                                 "no earlier keys); memit-seq (memit plus the earlier batches' keys Cp in the solve, "
                                 "the AlphaEdit repository's memit_seq); alphaedit (memit-seq with the update "
                                 "projected onto the null space of C0)",
                          choices=("nse", "memit", "memit-seq", "alphaedit"))
    layers: list[int] | None = setting(None, "edited layers, ascending; z lives at the output of the last (paper: "
                                             "4,5,6,7,8 of Llama3-8B's 32; default: 5 layers at 1/8 of the depth)")
    batch_size: int = setting(100, "requests per sequential batch (paper: 100)", min=1)
    lam: float | None = setting(None, "lambda (mom2_update_weight), the weight of C0 (paper: 15000 on Llama3-8B; "
                                      "default: derived from the checkpoint, derive_scale_defaults)", gt=0)
    alpha: float | None = setting(None, "a request with ||z - h|| <= alpha is done (paper: 2.5 on Llama3-8B; "
                                        "default: derived)", min=0)
    upper_bound: float | None = setting(None, "a request with ||z - h|| >= upper_bound is left alone and reported "
                                              "(paper: 50 on Llama3-8B; default: derived)", gt=0)
    v_lr: float = setting(0.5, "Adam lr of the z optimisation (paper: 0.1 on Llama3-8B, 0.5 on GPT2-XL / GPT-J)", gt=0)
    v_steps: int = setting(25, "at most this many z steps (paper: 25)", min=1)
    clamp: float = setting(0.75, "||z - h|| <= clamp * ||h|| in the z optimisation (paper: 0.75)", gt=0)
    v_weight_decay: float = setting(0.5, "weight of ||delta|| / ||h||^2 in the z objective (paper: 0.5)", min=0)
    kl_factor: float = setting(0.0625, "weight of the KL term in the z objective (paper: 0.0625)", min=0)
    kl_direction: str = setting("p0_p", "the KL term: p0_p = KL(p0 || p_delta) (this project's default); p_p0 = "
                                "KL(p_delta || p0), the official code's kl_div(init, new, log_target=True)",
                                choices=("p0_p", "p_p0"))
    kl_relations: int = setting(0, "extra KL rows asking other relations of the subject (the first N of "
                                   "KL_RELATIONS); 0: only the paper's '{subject} is a'", min=0, max=8)
    loss_stop: float = setting(5e-2, "a request's z optimisation stops below this loss (paper: 5e-2)")
    max_iterations: int = setting(3, "NSE passes per batch (paper: 3)", min=1)
    neuron_threshold: float = setting(1.0, "share of the |K| mass the selected neurons hold (paper: 1.0 on "
                                           "Llama3-8B, 0.8 on GPT-J)", gt=0, max=1)
    stats_tokens: int = setting(200_000, "tokens of the corpus used for C0 (paper: 100k Wikipedia texts; default: "
                                         "200k tokens of --stats-text)", min=1)
    seed: int = setting(0, "seed of the context templates")
    z_chunk: int = setting(20, "requests whose z are optimised together (bounds memory; moves z only in the "
                               "last bits)", min=1)
    nullspace_threshold: float | None = setting(None, "alphaedit: eigen-directions of C0 with eigenvalue below this "
                                                      "span the null space (paper: 2e-2 on Llama3-8B; default: the "
                                                      "mean eigenvalue of C0)", gt=0)
    l2: float | None = setting(None, "alphaedit: ridge of the projected solve (paper: 10 on Llama3-8B; default: "
                                     "derived)", gt=0)


# ----------------------------------------------------------------------------------------------
# Step 5: the corpus prior C0 = E[k k^T], once, on the unedited model

@torch.no_grad()
def key_second_moment(model, tok, text, layers, n_tokens: int, chunk: int = 512, log=None, batch: int = 4):
    """C0[l] = (1/N) sum_t k_t k_t^T over every token t of the corpus (MEMIT's 'C0 = K0 K0^T').
    text: the corpus as a string, or already as token chunks (harness.generated_corpus)."""
    F_ = model.config.intermediate_size
    acc = {l: torch.zeros(F_, F_) for l in layers}              # float32: 7B needs 485 MB per layer
    seqs = data.corpus_chunks(tok, text, n_tokens, chunk) if isinstance(text, str) else text
    n, t0 = 0, time.perf_counter()
    for b in range(0, len(seqs), batch):
        ids, mask = llama.pad_batch(seqs[b:b + batch], side="right")
        trace = llama.Trace()
        model.run_layers(model.embed(ids.to(model.device)), 0, max(layers) + 1, mask.to(model.device), trace=trace)
        keep = mask.bool().to(model.device)
        for l in layers:
            k = trace.ffn_in[l][keep].float()                            # (tokens, F)
            acc[l] += (k.T @ k).cpu()                                    # sum_t k_t k_t^T
        n += int(keep.sum())
        if log and (b // batch) % 25 == 24:
            log(harness.eta_line("C0: corpus chunks", b + batch, len(seqs), time.perf_counter() - t0))
    if n == 0:
        raise EditError("stats text: no tokens to compute C0 from")
    # k^T k in float32 need not come out exactly symmetric; the Cholesky solve reads one triangle
    return {l: acc[l].add_(acc[l].T.clone()).div_(2 * n) for l in layers}, n


# ----------------------------------------------------------------------------------------------
# Requests as token rows: every request is read in a few short generated contexts

def context_templates(model, tok, seed: int, n: int = 5, length: int = 10) -> list[str]:
    """NSE/MEMIT context prefixes: "{}" plus n short top-5 samples after "The", "Therefore", ..."""
    g = torch.Generator().manual_seed(seed)
    starts = ["The", "Therefore", "Because", "I", "You"][:n]
    ids = [tok.encode(s) for s in starts]
    new = llama.generate(model, ids, length - max(len(i) for i in ids), temperature=1.0, top_k=5,
                         eos_ids=[], generator=g)
    texts = [tok.decode(i + j, skip_special=True).replace("{", " ").replace("}", " ") for i, j in zip(ids, new)]
    return ["{}"] + [t.replace("\n", " ") + ". {}" for t in texts]


def subject_row(tok, text: str, subject: str, start: int = 0):
    """Token ids of `text` cut after the subject, and the index of the subject's last token."""
    end = text.index(subject, start) + len(subject)
    ids = tok.encode(text[:end])
    return ids, len(ids) - 1


def asked_text(tok, r, c: str) -> tuple[str, int]:
    """The text the model reads for request r in context c, and where the request starts in it:
    c.format(prompt), inside the user's turn when r is asked through a chat template (as_asked)."""
    text = c.format(r.prompt)
    if "asked" not in r.meta:
        return text, c.index("{}")
    turn = data.Template(*r.meta["asked"]).prompt_text(tok, text)
    return turn, turn.index(text) + c.index("{}")


def key_rows(tok, records, templates):
    """Rows ending at the subject's last token: every context template of every request."""
    rows = []
    for r in records:
        for c in templates:
            text, at = asked_text(tok, r, c)
            rows.append(subject_row(tok, text, r.subject, at))
    return rows


# ----------------------------------------------------------------------------------------------
# Step 1: the target value z (ROME/MEMIT's z objective), on the original weights

# Prompts about the subject that ask OTHER relations, for the optional KL rows (kl_relations > 0):
# data.OTHER_RELATIONS' completions, our own phrasings (none is a CounterFact prompt: tested).
KL_RELATIONS = [c for c, _, _ in data.OTHER_RELATIONS]


def z_objective(nll, kl, delta, h_init, hp):
    """L(delta) = mean_c NLL(o | c + prompt; h_l0[s] += delta) + kl_factor KL + v_weight_decay ||delta|| / ||h||^2,
    per request (n,); KL is KL(p0 || p_delta) or KL(p_delta || p0) (kl_direction) of the next token
    after "{subject} is a" (and the kl_relations prompts). Minimised s.t. ||delta|| <= clamp ||h||."""
    wd = hp.v_weight_decay * delta.norm(dim=1) / h_init.norm(dim=1) ** 2
    return nll + hp.kl_factor * kl + wd


def kl_rows_term(kl_logp, kl_init, direction: str):
    """Per KL row: KL(p0 || p_delta) (p0_p) or KL(p_delta || p0) (p_p0, the official code's)."""
    if direction == "p0_p":
        return F.kl_div(kl_logp, kl_init, log_target=True, reduction="none").sum(1)
    return F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(1)


def z_rows(tok, records, templates, kl_relations: int = 0):
    """Per request: every context template with the target appended (NLL rows), then the KL rows:
    the subject alone (the official code reads the KL distribution at the subject's last token), and
    kl_relations prompts asking other relations (read at their last token, where the answer comes).
    A row: (ids, subject index, target start, target end, request, KL read index or None)."""
    tmpl = data.Template("raw")
    rows = []
    for i, r in enumerate(records):
        asked = data.Template(*r.meta["asked"]) if "asked" in r.meta else tmpl
        for c in templates:
            # under a chat template (as_asked): the turn's text, the answer, then the turn's end token
            enc = data.encode_prompt_target(tok, asked, c.format(r.prompt), r.target_new)
            text, at = asked_text(tok, r, c)
            _, s = subject_row(tok, text, r.subject, at)
            if enc.target_start <= s:
                raise EditError(f"request {i}: the target must come after the subject in {r.prompt!r}")
            rows.append((enc.ids, s, enc.target_start, len(enc.ids), i, None))
        ids, s = subject_row(tok, f"{r.subject} is a", r.subject)
        rows.append((ids, s, None, None, i, s))
        for q in KL_RELATIONS[:kl_relations]:
            text = q.format(r.subject)
            _, s = subject_row(tok, text, r.subject)
            ids = tok.encode(text)
            rows.append((ids, s, None, None, i, len(ids) - 1))
    return rows


def compute_z(model, tok, records, templates, hp):
    """compute_z_together on groups of at most hp.z_chunk requests: each request's z is its own
    optimisation (Adam is elementwise, the losses add), so grouping bounds memory (about 90 MB of
    activations per request on SmolLM2-135M) and changes z only in the last bits (other padding)."""
    parts = [compute_z_together(model, tok, records[i:i + hp.z_chunk], templates, hp)
             for i in range(0, len(records), hp.z_chunk)]
    if len(parts) == 1:
        return parts[0]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            {k: sum((p[2][k] for p in parts), []) for k in ("steps", "final_loss")})


def compute_z_together(model, tok, records, templates, hp):
    """z_i = h_i + argmin_delta z_objective (Adam, lr v_lr, at most v_steps, each request stops once
    its loss < loss_stop; after every step delta is projected back into ||delta|| <= clamp ||h||).
    Returns (z (n, D), h (n, D), {"steps", "final_loss"})."""
    cfg, dev, l0, L = model.config, model.device, hp.layers[-1], model.config.num_hidden_layers
    rows = z_rows(tok, records, templates, hp.kl_relations)
    n, R = len(records), len(rows)
    # -- speed device: delta enters at the subject's last token s, so the tokens before s never see
    # it. Each row is split there: the prefix (left-padded, aligned) runs once through all blocks
    # into a KV cache, the suffix runs blocks 0..l0 once without grad, and each step runs only the
    # suffix through blocks l0+1..L-1, with the LM head only at the loss positions. -------------
    P = max(r[1] for r in rows)                                  # prefix length (aligned subject)
    suffix = [r[0][r[1]:] for r in rows]
    Ts = max(len(s) for s in suffix)
    pre = torch.zeros(R, P, dtype=torch.long); pre_mask = torch.zeros(R, P, dtype=torch.long)
    for j, r in enumerate(rows):                                 # left-pad the prefixes
        if r[1]:
            pre[j, P - r[1]:], pre_mask[j, P - r[1]:] = torch.tensor(r[0][:r[1]]), 1
    suf, suf_mask = llama.pad_batch(suffix, side="right")
    suf_pos = pre_mask.sum(1, keepdim=True) + torch.arange(Ts)[None]          # (R, Ts) rope positions
    req = torch.tensor([r[4] for r in rows])
    kl_rows = torch.tensor([j for j, r in enumerate(rows) if r[5] is not None])
    kl_col = torch.tensor([rows[j][5] - rows[j][1] for j in kl_rows.tolist()])   # suffix coordinates
    # the subject row weighs 1 (the paper's term), the relation rows 1 / kl_relations together
    kl_w = torch.tensor([1.0 if rows[j][5] == rows[j][1] else 1.0 / hp.kl_relations for j in kl_rows.tolist()])
    # loss positions (suffix coordinates): logits at t-1 predict target token t
    lrow, lcol, ltok, lw = [], [], [], []
    n_ctx = len(templates)
    for j, r in enumerate(rows):
        if r[5] is None:
            for t in range(r[2], r[3]):
                lrow.append(j); lcol.append(t - 1 - r[1]); ltok.append(r[0][t])
                lw.append(1.0 / ((r[3] - r[2]) * n_ctx))     # mean over tokens, then over contexts
    lrow, lcol, ltok, lw = map(torch.tensor, (lrow, lcol, ltok, lw))
    pre, pre_mask, suf, suf_mask, suf_pos = (t.to(dev) for t in (pre, pre_mask, suf, suf_mask, suf_pos))
    with torch.no_grad():                                        # everything that does not see delta
        cache = llama.KVCache(cfg, R, P + Ts, device=dev, dtype=model.dtype)
        if P:
            model.run_layers(model.embed(pre), 0, L, pre_mask, cache=cache)
        h0 = model.run_layers(model.embed(suf), 0, l0 + 1, suf_mask, suf_pos, cache=cache)  # (R, Ts, D)
    # -- end of the speed device's set-up --------------------------------------------------------
    bare = torch.tensor([next(j for j, r in enumerate(rows) if r[4] == i) for i in range(n)])  # each request's first row
    h_init = h0[bare, 0].detach().float()                        # (n, D): h at the subject, bare prompt
    max_norm = hp.clamp * h_init.norm(dim=1)
    delta = torch.zeros(n, cfg.hidden_size, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    z, steps = h_init.clone(), torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    kl_init = None
    for step in range(hp.v_steps):
        rsel = active[req].nonzero().squeeze(1)                  # rows of requests still optimising
        new_id = torch.full((R,), -1, dtype=torch.long); new_id[rsel] = torch.arange(len(rsel))
        sub = llama.KVCache(cfg, 0, 0)                           # (speed device: the cache of those rows)
        sub.k = [c[rsel] if i > l0 else None for i, c in enumerate(cache.k)]
        sub.v = [c[rsel] if i > l0 else None for i, c in enumerate(cache.v)]
        sub.key_mask, sub.length = cache.key_mask[rsel].clone(), P
        d = delta[req[rsel]].to(h0.dtype)                        # (rows, D)
        h = torch.cat([h0[rsel, :1] + d[:, None], h0[rsel, 1:]], 1)          # h_l0[s] += delta
        out = model.run_layers(h, l0 + 1, L, suf_mask[rsel], suf_pos[rsel], cache=sub)
        keep = active[req[lrow]]
        logp = model.head(out[new_id[lrow[keep]], lcol[keep]]).float().log_softmax(-1)   # (N, V)
        tok_nll = -logp.gather(1, ltok[keep].to(dev)[:, None])[:, 0] * lw[keep].to(dev)
        nll = torch.zeros(n, device=dev).index_add(0, req[lrow[keep]].to(dev), tok_nll)
        kk = active[req[kl_rows]]                                # KL rows of active requests
        kl_logp = model.head(out[new_id[kl_rows[kk]], kl_col[kk]]).float().log_softmax(-1)
        if kl_init is None:                                      # step 0: delta = 0, every row active: p0
            kl_init = kl_logp.detach()
        kl_row = kl_rows_term(kl_logp, kl_init[kk], hp.kl_direction) * kl_w[kk].to(dev)
        kl = torch.zeros(n, device=dev).index_add(0, req[kl_rows[kk]].to(dev), kl_row)
        loss = z_objective(nll, kl, delta, h_init, hp)           # (n,), meaningful where active
        steps[active] += 1
        done = active & (loss.detach().cpu() < hp.loss_stop)
        z[done] = h_init[done] + delta.detach()[done]
        active = active & ~done
        if not active.any() or step == hp.v_steps - 1:
            break
        opt.zero_grad()
        loss[active].sum().backward()
        opt.step()
        with torch.no_grad():                                    # project into the L2 ball
            scale = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
    z[active] = h_init[active] + delta.detach()[active]
    return z.cpu(), h_init.cpu(), {"steps": steps.tolist(), "final_loss": loss.detach().tolist()}


class rewound:
    """Context manager: the edited layers' original down projections are in place inside it
    (NSE's weights rewinding: z is found on theta_0, not on the weights earlier batches edited)."""

    def __init__(self, model, W0: dict | None):
        self.model, self.W0, self.saved = model, W0 or {}, {}

    def __enter__(self):
        for l, w in self.W0.items():
            p = self.model.layers[l].mlp.down_proj.weight
            self.saved[l] = p.data
            p.data = w.to(p.dtype)

    def __exit__(self, *exc):
        for l, w in self.saved.items():
            self.model.layers[l].mlp.down_proj.weight.data = w


def cached_z(zcache: harness.ZCache, model, tok, records, templates, hp: Settings):
    """compute_z for the requests zcache does not hold yet: (Z (n, D), {"steps", "cache_hits"}).
    NSE's z depends only on the original weights, the request, the contexts and the z settings."""
    k = {"templates": templates, "layer": hp.layers[-1], "dtype": str(model.dtype), "device": model.device.type,
         **{f: getattr(hp, f) for f in ("v_lr", "v_steps", "clamp", "v_weight_decay", "kl_factor", "loss_stop")}}
    if hp.kl_relations:                                          # (absent at their defaults: older keys stay valid)
        k["kl_relations"] = KL_RELATIONS[:hp.kl_relations]
    if hp.kl_direction != "p0_p":
        k["kl_direction"] = hp.kl_direction
    keys = [{**k, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
             **({"asked": r.meta["asked"]} if "asked" in r.meta else {})} for r in records]   # chat-asked
    def compute(miss):
        z, _, log = compute_z(model, tok, [records[i] for i in miss], templates, hp)
        return z, log["steps"]
    Z, steps, hits = zcache.get_or_compute(keys, compute)
    return Z, {"steps": steps, "cache_hits": hits}


# ----------------------------------------------------------------------------------------------
# Step 2: the keys K and the current hidden states H at the subject

@torch.no_grad()
def subject_states(model, tok, records, templates, layers, z_layer):
    """K[l] (F, n): 0.5 * k(bare prompt) + 0.5 * mean_c k(c + prompt) at the subject's last token,
    and H (n, D): the output of block z_layer there, on the bare prompt."""
    rows = key_rows(tok, records, templates)
    ids, mask = llama.pad_batch([r[0] for r in rows], side="right")
    trace = llama.Trace()
    top = max(list(layers) + [z_layer]) + 1
    model.run_layers(model.embed(ids.to(model.device)), 0, top, mask.to(model.device), trace=trace)
    pos = torch.tensor([r[1] for r in rows])
    c = len(templates)
    K = {}
    for l in layers:
        k = trace.ffn_in[l][torch.arange(len(rows)), pos].float().view(len(records), c, -1)  # (n, c, F)
        k = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1) if c > 1 else k[:, 0]
        K[l] = k.T.contiguous().cpu()                                                    # (F, n)
    H = trace.block_output(z_layer)[torch.arange(len(rows)), pos].float().view(len(records), c, -1)[:, 0]
    return K, H.cpu()          # the solves run on the CPU in float64, next to C0 and Cp


# ----------------------------------------------------------------------------------------------
# Step 3: neuron selection and the closed-form update (MEMIT Eq. 14 on the columns S)

def select_neurons(K: torch.Tensor, threshold: float) -> torch.Tensor:
    """S = the smallest set of neurons j, by descending Q_j = sum_i |K_ji|, whose Q mass reaches
    `threshold` of the total (NSE Fig. 2b). Neurons with Q_j = 0 are never selected."""
    Q = K.abs().sum(1)                                           # (F,)
    order = Q.argsort(descending=True)
    cum = Q[order].double().cumsum(0)
    m = int((cum < threshold * cum[-1] * (1 - 1e-12)).sum()) + 1
    m = min(m, int((Q > 0).sum()))
    return order[:max(m, 1)].sort().values


def solve_update(R, K_S, C0_SS, Cp_SS, lam: float) -> torch.Tensor:
    """MEMIT Eq. 14 on the columns S: dW_S = R K_S^T (lam C0[S,S] + Cp[S,S] + K_S K_S^T)^-1, the
    minimiser of ||dW_S K_S - R||^2 + tr(dW_S (lam C0 + Cp) dW_S^T). R (D, n), K_S (|S|, n).
    Normal equations in float64 by Cholesky, built in a copy (C0 is never changed, whatever its dtype)."""
    K64 = K_S.double()
    A = C0_SS.to(torch.float64, copy=True).mul_(lam)              # (|S|, |S|)
    if Cp_SS is not None:                                        # None: memit, or no earlier batch yet
        A += Cp_SS
    A.addmm_(K64, K64.T)
    return torch.cholesky_solve(K64 @ R.double().T, cholesky_ridged(A)).T   # (D, |S|)


def cholesky_ridged(A: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of A (modified in place); if A is not positive definite (C0 from fewer tokens
    than neurons, float32 rounding), add a ridge of 1e-6, 1e-4, ... times its mean diagonal."""
    L, info = torch.linalg.cholesky_ex(A)
    ridge, eps = A.diagonal().mean().item(), 1e-6
    while info.item() > 0:
        A.diagonal().add_(eps * ridge)
        L, info = torch.linalg.cholesky_ex(A)
        eps *= 100
    return L


def restrict(C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """C[S, S] (no copy when S is every neuron)."""
    return C if len(S) == C.shape[0] else C[S][:, S]


# AlphaEdit's solve: every neuron, the update confined to the null space of C0 ------------------

def null_space_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T, U0 = the eigenvectors of C0 whose eigenvalue is below `threshold`: dW P K0 ~ 0
    for the preserved keys K0. Symmetric and idempotent. (F, F)"""
    e, U = torch.linalg.eigh(C0.double())                        # ascending eigenvalues
    U0 = U[:, e < threshold]                                     # (F, null dim)
    return U0 @ U0.T


def solve_projected_update(R, K, P, Cp, l2: float) -> torch.Tensor:
    """dW = X^T, X = (P (K K^T + Cp) + l2 I)^-1 P K R^T (AlphaEdit's closed form, as its official code
    solves it): the minimiser of ||dW' P K - R||^2 + ||dW' P Kp||^2 + l2 ||dW'||^2 over dW = dW' P.
    R (D, n), K (F, n), P (F, F), Cp or None. Not symmetric: LU solve, float64."""
    K64, P64 = K.double(), P.double()
    A = K64 @ K64.T                                              # (F, F)
    if Cp is not None:
        A += Cp
    A = P64 @ A
    A.diagonal().add_(l2)
    return torch.linalg.solve(A, P64 @ K64 @ R.double().T).T     # (D, F)


# ----------------------------------------------------------------------------------------------
# One sequential batch: steps 1-4, and the passes (NSE Fig. 2c)

@dataclass
class EditState:
    """What sequential editing carries across batches: W0 (the original down projections, for
    rewinding), Cp (sum of K K^T of every edited request, per layer), progress."""
    W0: dict
    Cp: dict
    n_done: int = 0
    log: list = field(default_factory=list)

    @classmethod
    def fresh(cls, model, layers):
        return cls({l: model.layers[l].mlp.down_proj.weight.detach().clone() for l in layers}, {})


def edit_batch(model, tok, records, templates, hp: Settings, state: EditState, C0: dict, timer: dict,
               P: dict | None = None, zcache: harness.ZCache | None = None):
    """One sequential batch (steps 1-4). Returns the batch log: passes, residuals, requests left.
    alphaedit: P[l] the null-space projector of each edited layer; zcache: NSE's z on disk."""
    model.requires_grad_(False)
    nse, l0, layers = hp.method == "nse", hp.layers[-1], hp.layers
    t = time.perf_counter()
    with rewound(model, state.W0 if nse else None):              # MEMIT family: z on the current weights
        if nse and zcache is not None:
            Z, zlog = cached_z(zcache, model, tok, records, templates, hp)
        else:
            Z, _, zlog = compute_z(model, tok, records, templates, hp)
    timer["z"] = timer.get("z", 0.0) + time.perf_counter() - t
    blog = {"z_steps": zlog["steps"], "z_cache_hits": zlog.get("cache_hits"), "passes": []}
    for it in range(hp.max_iterations if nse else 1):
        t = time.perf_counter()
        _, H = subject_states(model, tok, records, templates, [], l0)
        r = (Z - H).norm(dim=1)                                  # ||z_i - h_i||
        sel = ((r > hp.alpha) & (r < hp.upper_bound)) if nse else torch.ones(len(records), dtype=torch.bool)
        timer["keys"] = timer.get("keys", 0.0) + time.perf_counter() - t
        p = {"r_mean": r.mean().item(), "edited": int(sel.sum()), "below_alpha": int((r <= hp.alpha).sum()),
             "above_upper": int((r >= hp.upper_bound).sum()), "neurons": []}
        blog["passes"].append(p)
        if not sel.any():
            break
        chosen = [rec for rec, s in zip(records, sel) if s]
        for j, l in enumerate(layers):
            t = time.perf_counter()
            K, H = subject_states(model, tok, chosen, templates, [l], l0)
            K = K[l]                                                          # (F, n)
            S = select_neurons(K, hp.neuron_threshold) if nse else torch.arange(K.shape[0])
            Rj = (Z[sel] - H).T / (len(layers) - j)              # (D, n): residual spread over layers left
            timer["keys"] = timer.get("keys", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            Cp = state.Cp.get(l) if hp.method != "memit" else None   # MEMIT as published: no earlier keys
            if hp.method == "alphaedit":
                dW = solve_projected_update(Rj, K, P[l], Cp, hp.l2)
            else:
                dW = solve_update(Rj, K[S], restrict(C0[l], S), None if Cp is None else restrict(Cp, S), hp.lam)
            w = model.layers[l].mlp.down_proj.weight
            if len(S) == w.shape[1]:
                w.data.copy_(w.data.double().add_(dW.to(w.device)))
            else:
                w.data[:, S.to(w.device)] = (w.data[:, S.to(w.device)].double() + dW.to(w.device)).to(w.dtype)
            p["neurons"].append(len(S))
            timer["solve"] = timer.get("solve", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    K, H = subject_states(model, tok, records, templates, layers, l0)        # step 4: Cp += K K^T
    for l in layers if hp.method != "memit" else ():
        KKt = K[l] @ K[l].T                                                  # (F, F)
        KKt = (KKt + KKt.T) / 2                                              # exactly symmetric
        state.Cp[l] = KKt.float() if state.Cp.get(l) is None else state.Cp[l].add_(KKt.to(state.Cp[l].dtype))
    r = (Z - H).norm(dim=1)
    blog["final_r"] = r.tolist()
    blog["left_above_upper"] = [i for i in range(len(records)) if r[i] >= hp.upper_bound]
    timer["cp"] = timer.get("cp", 0.0) + time.perf_counter() - t
    return blog


# ----------------------------------------------------------------------------------------------
# Defaults for the checkpoint at hand (the papers give Llama3-8B's absolute values)

# SmolLM2-135M, first 20 CounterFact edits, layers 4-8: median ||h_8|| = 132, median q = 2703; the
# calibrated alpha 30 / upper_bound 200 / lambda 2500 are 0.23 m / (2 * clamp 0.75) m / 0.92 q.
H_ALPHA, LAM_PER_Q, L2_PER_PK2 = 0.23, 0.92, 0.1


def default_layers(n_layers: int) -> list[int]:
    """Llama3-8B edits layers 4-8 of 32: the same relative depth, 5 layers (fewer on a tiny model)."""
    k = min(5, max(1, n_layers // 4))
    start = min(round(n_layers / 8), n_layers - k)
    return list(range(start, start + k))


def derive_scale_defaults(model, tok, records, templates, layers, C0, clamp: float = 0.75):
    """alpha, upper_bound and lambda from the checkpoint's own scale. m = median ||h_l0|| at the
    subjects: alpha = H_ALPHA m, upper_bound = 2 clamp m (no fresh request starts above it).
    lambda = LAM_PER_Q median q, q = k^T C0^-1 k (last edited layer): one request's update then
    realises q / (lambda + q) of its residual, whatever the key scale or width."""
    K, H = subject_states(model, tok, records, templates, [layers[-1]], layers[-1])
    m = H.norm(dim=1).median().item()
    L = cholesky_ridged(C0[layers[-1]].to(torch.float64, copy=True))   # (F, F)
    k = K[layers[-1]].double()                                   # (F, n)
    q = (k * torch.cholesky_solve(k, L)).sum(0).median().item()
    return {"alpha": H_ALPHA * m, "upper_bound": 2 * clamp * m, "lam": LAM_PER_Q * q,
            "hidden_norm_median": m, "mahalanobis_q_median": q}


def default_nullspace_threshold(C0, layers) -> float:
    """AlphaEdit's threshold for this checkpoint: the mean eigenvalue of C0 (trace / F, averaged over
    the edited layers): the null space is the directions with less than average key variance."""
    return sum(C0[l].diagonal().double().mean().item() for l in layers) / len(layers)


def default_l2(P_last: torch.Tensor, K_last: torch.Tensor) -> dict:
    """AlphaEdit's ridge: l2 = L2_PER_PK2 median ||P k||^2 over the first batch's keys at the last
    edited layer, so a lone request's solve realises about 1 / (1 + L2_PER_PK2) of its residual."""
    pk2 = (P_last @ K_last.double()).pow(2).sum(0).median().item()
    return {"l2": L2_PER_PK2 * pk2, "projected_key_norm2_median": pk2}


# ----------------------------------------------------------------------------------------------
# The editor: batches in sequence, and the state that lets editing continue

class Editor(harness.Editor):
    """Sequential NSE (or MEMIT, memit-seq, AlphaEdit) edits of a few down projections:

        ed = nse.Editor(model, tokenizer, Settings(batch_size=20), stats_text="wikitext.txt")
        ed.edit(prompts=["The Eiffel Tower is in"], target_new=["Rome"], subject=["The Eiffel Tower"])

    lam, alpha and upper_bound left unset are derived from the first batch. C0 comes from the
    text file `stats_text`, or from text the model writes when it is None (cached in cache_dir).
    The result is a plain checkpoint: export()."""
    name, Settings, default_template, needs_subject, exports = "nse", Settings, "raw", True, True
    description = "NSE / MEMIT / AlphaEdit editing of a Llama checkpoint. No arguments: the demo world."

    def __init__(self, model, tokenizer, settings: Settings | None = None, template="raw", stats_text=None,
                 cache_dir=None, z_cache: bool = True):
        super().__init__(model, tokenizer, template)
        self.given = settings or Settings()
        self.check_settings(self.given, model.config)
        self.stats_text, self.cache_dir = stats_text, str(cache_dir or harness.CACHE_DIR)
        model.requires_grad_(False)
        self.contexts = context_templates(model, tokenizer, self.given.seed)
        self.W0 = {l: w.detach().clone() for l, w in self._weights(self.given).items()}
        self.C0, self.P, self.derived, self.timer = None, None, {}, {}
        self.zcache = harness.ZCache(self.cache_dir, model) if z_cache and self.given.method == "nse" else None
        self._start()

    def _weights(self, s):
        layers = s.layers or default_layers(self.model.config.num_hidden_layers)
        return {l: self.model.layers[l].mlp.down_proj.weight for l in layers}

    def _start(self):
        """No edits yet: the given settings (derived ones are derived again), an empty state."""
        self.s = replace(self.given, layers=list(self.W0))
        self.state = EditState(self.W0, {})
        self.log = self.state.log

    @classmethod
    def check_settings(cls, s, config):
        super().check_settings(s, config)
        L = config.num_hidden_layers
        if s.layers is not None and (sorted(set(s.layers)) != s.layers or not all(0 <= l < L for l in s.layers)
                                     or not s.layers):
            raise EditError(f"layers {s.layers}: must be ascending layer indices below {L}")

    def restore(self):
        """The original down projections back (the unedited model, bit for bit) and no edits."""
        for l, w in self._weights(self.given).items():
            w.data.copy_(self.W0[l])
        self._start()

    @property
    def unit(self) -> int:
        return self.s.batch_size

    def apply(self, records) -> list[dict]:
        """Batches of batch_size requests in sequence (steps 1-4 each)."""
        if self.C0 is None:                                      # step 5, on the unedited model
            t = time.perf_counter()
            with rewound(self.model, self.W0):
                self.C0 = harness.load_or_compute_c0(self.model, self.tokenizer, self.stats_text, self.s.layers,
                                                     self.s.stats_tokens, self.cache_dir, key_second_moment,
                                                     log=harness.say)
            self.timer["stats"] = self.timer.get("stats", 0.0) + time.perf_counter() - t
        rows, st, records = [], self.state, self.as_asked(records)
        for i in range(0, len(records), self.s.batch_size):
            batch = records[i:i + self.s.batch_size]
            if None in (self.s.lam, self.s.alpha, self.s.upper_bound):    # from the first batch
                self.derived = derive_scale_defaults(self.model, self.tokenizer, batch, self.contexts,
                                                     self.s.layers, self.C0, self.s.clamp)
                self.s = replace(self.s, **{k: self.derived[k] for k in ("lam", "alpha", "upper_bound")
                                            if getattr(self.s, k) is None})
            if self.s.method == "alphaedit":
                self._alphaedit_projectors(batch)
            t = time.perf_counter()
            blog = edit_batch(self.model, self.tokenizer, batch, self.contexts, self.s, st, self.C0, self.timer,
                              self.P, self.zcache)
            blog["left_above_upper"] = [st.n_done + j for j in blog["left_above_upper"]]   # global indices
            st.n_done += len(batch)
            blog.update(n=len(batch), n_done=st.n_done, seconds=time.perf_counter() - t)
            blog["note"] = ", ".join(f"[r {p['r_mean']:.1f} edited {p['edited']} above {p['above_upper']}]"
                                     for p in blog["passes"])
            st.log.append(blog)
            rows.append(blog)
        return rows

    def as_asked(self, records):
        """The requests as the model is asked them: under a chat template (QA on an instruction-tuned
        model) every row is the templated turn, and z's target is the answer then the turn's end
        token, which generation stops on. Raw prompts (CounterFact, the papers' protocol) stay raw."""
        if self.template.kind == "raw":
            return records
        if self.template.end_id(self.tokenizer) is None:
            raise EditError("the chat template has no end token to end an answer")
        return [replace(r, meta={**r.meta, "asked": [self.template.kind, self.template.system]}) for r in records]

    def _alphaedit_projectors(self, batch):
        """The threshold (from C0), one projector per edited layer, then l2 (from the first batch's
        projected keys); a resumed editor has both settings and only rebuilds the projectors."""
        s, top = self.s, self.s.layers[-1]
        if s.nullspace_threshold is None:
            self.s = s = replace(s, nullspace_threshold=default_nullspace_threshold(self.C0, s.layers))
            self.derived["nullspace_threshold"] = s.nullspace_threshold
        if self.P is None:
            self.P = {l: null_space_projector(self.C0[l], s.nullspace_threshold) for l in s.layers}
            self.derived["null_dims"] = {str(l): round(torch.trace(p).item()) for l, p in self.P.items()}
        if s.l2 is None:
            K, _ = subject_states(self.model, self.tokenizer, batch, self.contexts, [top], top)
            self.derived.update(default_l2(self.P[top], K[top]))
            self.s = replace(s, l2=self.derived["l2"])

    def report_notes(self) -> list[str]:
        total, left = sum(self.timer.values()) or 1.0, sum(len(b["left_above_upper"]) for b in self.log)
        shares = {k: round(v / total, 3) for k, v in self.timer.items()}
        return [f"derived from the first batch: {self.derived}", f"requests left above upper_bound (never "
                f"edited): {left}", f"time shares: {shares}"] + (
                [f"z read from the cache: {self.zcache.hits} requests"] if self.zcache else [])

    # -- the state (harness.write_state keeps it): W.l and Cp.l, the settings and the log; W0 is
    # the checkpoint's own weights, so only its digest is kept, and from_state checks it --------
    def to_state(self) -> dict:
        t = {}
        for l, w in self._weights(self.s).items():
            t[f"W.{l}"] = w
            if l in self.state.Cp:
                t[f"Cp.{l}"] = self.state.Cp[l]
        meta = {"settings": asdict(self.s), "given": asdict(self.given), "contexts": self.contexts,
                "W0_digest": llama.weights_digest(sorted(self.W0.items())).hex(),
                "template": [self.template.kind, self.template.system], "cache_dir": self.cache_dir,
                "stats_text": self.stats_text and str(self.stats_text), "n_done": self.state.n_done,
                "log": self.log, "derived": self.derived, "z_cache": self.zcache is not None}
        return {"tensors": t, "meta": meta}

    @classmethod
    def from_state(cls, model, tokenizer, st):
        """The saved editor, applied to `model`, which must be the unedited checkpoint."""
        meta, t, ed = st["meta"], st["tensors"], cls.__new__(cls)
        harness.Editor.__init__(ed, model, tokenizer, data.Template(*meta["template"]))
        ed.given, ed.s = Settings(**meta["given"]), Settings(**meta["settings"])
        ed.contexts, ed.derived = meta["contexts"], meta["derived"]
        ed.stats_text, ed.cache_dir, ed.C0, ed.P, ed.timer = meta["stats_text"], meta["cache_dir"], None, None, {}
        model.requires_grad_(False)
        ed.W0 = {l: w.detach().clone() for l, w in ed._weights(ed.s).items()}
        if llama.weights_digest(sorted(ed.W0.items())).hex() != meta["W0_digest"]:
            raise EditError(f"the model is not the one these edits started from (the down projections of "
                            f"layers {ed.s.layers} differ): load them on the unedited checkpoint")
        ed.zcache = harness.ZCache(ed.cache_dir, model) if meta.get("z_cache") and ed.s.method == "nse" else None
        for l, w in ed._weights(ed.s).items():
            w.data.copy_(t[f"W.{l}"])
        Cp = {l: t[f"Cp.{l}"].cpu() for l in ed.s.layers if f"Cp.{l}" in t}
        ed.state = EditState(ed.W0, Cp, meta["n_done"], meta["log"])
        ed.log = ed.state.log
        return ed

    add_inputs, inputs_from = classmethod(harness.add_c0_inputs), classmethod(harness.c0_inputs_from)


# ----------------------------------------------------------------------------------------------
# `python nse.py`: the demo. Its settings were chosen on the demo world of seed 1 and are reported
# on seed 0's: blocks 0-1, up to 8 passes, z within 4 ||h|| in 60 steps at lr 1 to loss 0.01, no KL term (the
# "{subject} is a" prompts mean nothing to this model).

DEMO = harness.Demo("nse", [["--ckpt", "{ckpt}", "--edits", "{edits_cf}", "--stats-text", "{corpus}",
                             "--batch-size", "10", "--layers", "0,1", "--max-iterations", "8", "--alpha", "1",
                             "--clamp", "4", "--v-steps", "60", "--v-lr", "1", "--loss-stop", "0.01", "--kl-factor", "0",
                             "--threads", "1"]],
                    title="demo: {n} CounterFact-style edits in batches of 10, NSE on its tiny demo model")



def main(argv=None):
    return harness.main(Editor, argv, DEMO)


if __name__ == "__main__":
    main()
