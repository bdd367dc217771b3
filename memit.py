"""
memit.py: what the MEMIT family (MEMIT, Meng et al. 2023; NSE; AlphaEdit) shares: an edit request
(a prompt that contains its subject, a new target) becomes token rows, a target hidden state z at the
subject's last token (ROME/MEMIT's z objective), the keys k there (the down projection's inputs), and
the closed-form update of a down projection that maps those keys to z (MEMIT Eq. 14, solved on any
subset S of its columns).

nse.py builds NSE and sequential MEMIT from these pieces (its steps 1-4), alphaedit.py replaces the
solve. The settings each function reads (hp) are nse.Settings' fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import data
import eval as ev
import llama


# ----------------------------------------------------------------------------------------------
# Requests as token rows

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
# The target value z (NSE step 1; MEMIT's z objective)

# Prompts about the subject that ask OTHER relations, for the KL term (kl_relations > 0): the
# subject's other facts are read from the same hidden state z replaces, so a z that keeps their
# next-token distributions keeps those facts. data.OTHER_RELATIONS' completions, our own phrasings
# (tests/test_nse.py checks that none is a CounterFact prompt when ../shared is there).
KL_RELATIONS = [c for c, _, _ in data.OTHER_RELATIONS]


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
                raise ev.RunError(f"request {i}: the target must come after the subject in {r.prompt!r}")
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
    optimisation (Adam is elementwise, the losses add), so grouping bounds memory (the activations
    kept for backward grow with the rows optimised together: about 90 MB per request on
    SmolLM2-135M) and changes z only in the last bits (other padding)."""
    parts = [compute_z_together(model, tok, records[i:i + hp.z_chunk], templates, hp)
             for i in range(0, len(records), hp.z_chunk)]
    if len(parts) == 1:
        return parts[0]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            {k: sum((p[2][k] for p in parts), []) for k in ("steps", "final_loss")})


def compute_z_together(model, tok, records, templates, hp):
    """z_i = h_i + delta_i, delta_i = argmin  mean_c NLL(target | c + prompt; h_l0[s] += delta)
                                             + kl_factor KL(p_0 || p_delta)("{subject}" next token)  [kl_direction]
                                             + kl_factor mean_k KL(p_0 || p_delta)(relation prompt k)
                                             + v_weight_decay ||delta|| / ||h||^2,
    s.t. ||delta|| <= clamp ||h||  (step 1; ROME/MEMIT's z objective). Adam, early stop per request.

    Speed: the tokens before each subject's last token never see delta, so rows are split there:
    the prefix (left-padded, aligned) runs once through all blocks into a KV cache, the suffix
    runs blocks 0..l0 once without grad, and each step runs only the suffix through blocks l0+1..L-1
    with the LM head only at the loss positions. The whole batch shares one forward/backward."""
    cfg, dev, l0, L = model.config, model.device, hp.layers[-1], model.config.num_hidden_layers
    rows = z_rows(tok, records, templates, hp.kl_relations)
    n, R = len(records), len(rows)
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
        sub = llama.KVCache(cfg, 0, 0)
        sub.k = [c[rsel] if i > l0 else None for i, c in enumerate(cache.k)]
        sub.v = [c[rsel] if i > l0 else None for i, c in enumerate(cache.v)]
        sub.key_mask, sub.length = cache.key_mask[rsel].clone(), P
        d = delta[req[rsel]].to(h0.dtype)                        # (rows, D)
        h = torch.cat([h0[rsel, :1] + d[:, None], h0[rsel, 1:]], 1)
        out = model.run_layers(h, l0 + 1, L, suf_mask[rsel], suf_pos[rsel], cache=sub)
        keep = active[req[lrow]]
        logp = model.head(out[new_id[lrow[keep]], lcol[keep]]).float().log_softmax(-1)   # (N, V)
        tok_nll = -logp.gather(1, ltok[keep].to(dev)[:, None])[:, 0] * lw[keep].to(dev)
        nll = torch.zeros(n, device=dev).index_add(0, req[lrow[keep]].to(dev), tok_nll)
        kk = active[req[kl_rows]]                                # KL rows of active requests
        kl_logp = model.head(out[new_id[kl_rows[kk]], kl_col[kk]]).float().log_softmax(-1)
        if kl_init is None:                                      # step 0: delta = 0, every row active
            kl_init = kl_logp.detach()
        if hp.kl_direction == "p0_p":                            # KL(p0 || p_delta)
            kl_row = F.kl_div(kl_logp, kl_init[kk], log_target=True, reduction="none").sum(1)
        else:                                                    # KL(p_delta || p0), the official code's
            kl_row = F.kl_div(kl_init[kk], kl_logp, log_target=True, reduction="none").sum(1)
        kl_row = kl_row * kl_w[kk].to(dev)
        kl = torch.zeros(n, device=dev).index_add(0, req[kl_rows[kk]].to(dev), kl_row)
        wd = hp.v_weight_decay * delta.norm(dim=1) / h_init.norm(dim=1) ** 2
        loss = nll + hp.kl_factor * kl + wd                      # (n,), meaningful where active
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


# ----------------------------------------------------------------------------------------------
# The keys and the current hidden state at the subject (NSE step 2)

@torch.no_grad()
def subject_states(model, tok, records, templates, layers, z_layer):
    """K[l] (F, n): 0.5 * k(bare prompt) + 0.5 * mean_c k(c + prompt) at the subject's last token
    (step 2), and H (n, D): the output of block z_layer there, on the bare prompt."""
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
    H = trace.hidden[z_layer][torch.arange(len(rows)), pos].float().view(len(records), c, -1)[:, 0]
    return K, H.cpu()          # the solves run on the CPU in float64, next to C0 and Cp


# ----------------------------------------------------------------------------------------------
# The closed-form update (MEMIT Eq. 14; NSE step 3 solves it on the selected neurons)

def solve_update(R, K_S, C0_SS, Cp_SS, lam: float) -> torch.Tensor:
    """dW_S = R K_S^T (lam C0[S,S] + Cp[S,S] + K_S K_S^T)^-1  (MEMIT Eq. 14 restricted to the
    columns S, NSE Fig. 2b): the minimiser of ||dW_S K_S - R||^2 + tr(dW_S (lam C0 + Cp) dW_S^T).
    R (D, n), K_S (|S|, n). Solve the normal equations in float64 by Cholesky, built in place (a 7B
    layer's system is 11008^2); a ridge is added only if the matrix is not positive definite.""" 
    K64 = K_S.double()
    A = C0_SS.double().mul_(lam)                                 # (|S|, |S|)
    if Cp_SS is not None:                                        # None: no earlier batch yet
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
