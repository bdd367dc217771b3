"""
nse.py: NSE, neuron-level sequential editing (Jiang et al. 2024), with sequential MEMIT as the baseline.

An edit request is (prompt containing a subject, new target). Per batch of requests:
  1. z      target hidden state at the output of block l0 (the last edited layer), at the subject's
            last token, optimised on the ORIGINAL weights ("weights rewinding", NSE Fig. 2a).
  2. keys   down-projection inputs k at the subject's last token on the current model.
  3. update for each edited layer, bottom to top: pick the neurons that carry the batch's keys
            (NSE Fig. 2b), spread the remaining residual z - h over the layers left, solve the
            regularised normal equations on those columns of W_down; repeat while requests are
            still far from z (NSE Fig. 2c, the alpha / upper_bound rule).
  4. Cp     accumulate K K^T of the batch, so later batches protect earlier edits.
C0 = E[k k^T] over a text corpus is the prior that protects everything else; it is computed on the
unedited model once and cached as safetensors under --cache-dir (key: checkpoint weights, layer,
corpus, token count). z depends only on the original weights: it is cached per request (cached_z).
Baselines: MEMIT (--method memit): all neurons, no rewinding, one pass. AlphaEdit (--method
alphaedit; Fang et al., ICLR 2025; its math in alphaedit.py): MEMIT's z and keys, the update confined
to the null space of C0, Cp protecting earlier batches, one pass.
Step numbers ("step 1".."step 5") refer to the NSE section of shared/docs/METHODS.md. What NSE
shares with MEMIT (requests as rows, the z objective, the keys, the closed-form solve) is memit.py;
here is what NSE adds (rewinding, neuron selection, the passes) and the Editor.

    python nse.py                                    # the demo: its own tiny model, end to end
    python nse.py --ckpt DIR --edits counterfact-edit.json --n 200 --batch-size 20 --out runs/nse
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import alphaedit
import data
import eval as ev
import llama
import memit
import stats
from eval import setting


class EditError(ev.RunError):
    """A request or setting that cannot be edited; the message names the request and field."""


@dataclass
class Settings:
    method: str = setting("nse", "nse; memit (MEMIT as published: every neuron, z on the current weights, one "
                                 "pass, no earlier keys); memit-seq (memit plus the earlier batches' keys Cp in the "
                                 "solve: the AlphaEdit repository's memit_seq); or alphaedit (memit-seq with the "
                                 "update projected onto the null space of C0)",
                          choices=("nse", "memit", "memit-seq", "alphaedit"))
    layers: list[int] | None = setting(None, "edited layers, ascending, e.g. 4,5,6,7,8; z lives at the output "
                                             "of the last (default: 5 layers at 1/8 of the depth)")
    batch_size: int = setting(100, "requests per sequential batch", min=1)
    lam: float | None = setting(None, "lambda (mom2_update_weight), weight of the corpus prior C0 "
                                      "(default: derived from the checkpoint)", gt=0)
    alpha: float | None = setting(None, "a request with ||z - h|| <= alpha is done (default: derived)", min=0)
    upper_bound: float | None = setting(None, "a request with ||z - h|| >= upper_bound is left alone and "
                                              "reported (default: derived)", gt=0)
    v_lr: float = setting(0.5, "Adam lr of the z optimisation", gt=0)
    v_steps: int = setting(25, "at most this many z steps", min=1)
    clamp: float = setting(0.75, "||z - h|| <= clamp * ||h|| in the z optimisation", gt=0)
    v_weight_decay: float = setting(0.5, "weight of ||delta|| / ||h||^2 in the z objective", min=0)
    kl_factor: float = setting(0.0625, "weight of the KL term in the z objective", min=0)
    kl_direction: str = setting("p0_p", "the KL term's direction: p0_p is KL(p0 || p_delta) (this project's "
                                "default); p_p0 is KL(p_delta || p0), what the official ROME/MEMIT/NSE code computes "
                                "(kl_div(init, new, log_target=True))", choices=("p0_p", "p_p0"))
    kl_relations: int = setting(0, "KL rows asking other relations of the subject (the first N of KL_RELATIONS, "
                                   "next-token distribution kept as the unedited model's); 0: only the "
                                   "paper's '{subject} is a'", min=0, max=8)
    loss_stop: float = setting(5e-2, "a request's z optimisation stops below this loss")
    max_iterations: int = setting(3, "NSE passes per batch", min=1)
    neuron_threshold: float = setting(1.0, "share of the |K| mass the selected neurons hold", gt=0, max=1)
    stats_tokens: int = setting(200_000, "tokens of the corpus used for C0", min=1)
    seed: int = setting(0, "seed of the context templates")
    z_chunk: int = setting(20, "requests whose z are optimised together (bounds memory; results move only in "
                               "the last bits)", min=1)
    nullspace_threshold: float | None = setting(None, "alphaedit: eigen-directions of C0 with eigenvalue below this "
                                                      "span the null space (default: derived per layer)", gt=0)
    l2: float | None = setting(None, "alphaedit: ridge of the projected solve (default: derived)", gt=0)


# ----------------------------------------------------------------------------------------------
# Step 1: target values z (memit.compute_z), computed on the original weights (weights rewinding)

class rewound:
    """Context manager: the edited layers' original down projections are in place inside it."""

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


def cached_z(zcache: stats.ZCache, model, tok, records, templates, hp: Settings):
    """compute_z for the requests zcache does not hold yet; (Z (n, D), {"steps", "cache_hits"}).
    z is computed on the original weights, so its key is the request, the context templates and the
    z settings (ZCache adds the weights); a second run (another neuron_threshold, more edits) pays
    only for the updates."""
    k = {"templates": templates, "layer": hp.layers[-1], "dtype": str(model.dtype), "device": model.device.type,
         **{f: getattr(hp, f) for f in ("v_lr", "v_steps", "clamp", "v_weight_decay", "kl_factor", "loss_stop")}}
    if hp.kl_relations:                                          # (absent at 0: earlier caches stay valid)
        k["kl_relations"] = memit.KL_RELATIONS[:hp.kl_relations]
    if hp.kl_direction != "p0_p":                                # (absent at the default, likewise)
        k["kl_direction"] = hp.kl_direction
    keys = [{**k, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
             **({"asked": r.meta["asked"]} if "asked" in r.meta else {})} for r in records]   # chat-asked
    def compute(miss):
        z, _, log = memit.compute_z(model, tok, [records[i] for i in miss], templates, hp)
        return z, log["steps"]
    Z, steps, hits = zcache.get_or_compute(keys, compute)
    return Z, {"steps": steps, "cache_hits": hits}


# ----------------------------------------------------------------------------------------------
# Step 2: the keys K and the current states H at the subject (memit.subject_states).
# Step 3: neuron selection, and the closed-form update on the selected columns (memit.solve_update)

def select_neurons(K: torch.Tensor, threshold: float) -> torch.Tensor:
    """S = the smallest set of neurons j, by descending Q_j = sum_i |K_ji|, whose Q mass reaches
    `threshold` of the total (NSE Fig. 2b). Neurons with Q_j = 0 are never selected."""
    Q = K.abs().sum(1)                                           # (F,)
    order = Q.argsort(descending=True)
    cum = Q[order].double().cumsum(0)
    m = int((cum < threshold * cum[-1] * (1 - 1e-12)).sum()) + 1
    m = min(m, int((Q > 0).sum()))
    return order[:max(m, 1)].sort().values

# --method alphaedit solves with alphaedit.solve_projected_update instead: every neuron, the update
# projected onto the null space of C0 (alphaedit.py).


@dataclass
class EditState:
    """What sequential editing carries across batches: W0 (original down projections of the
    edited layers, for rewinding), Cp (sum of K K^T of every edited request; made by the first
    batch), progress."""
    W0: dict
    Cp: dict
    n_done: int = 0
    log: list = field(default_factory=list)

    @classmethod
    def fresh(cls, model, layers):
        return cls({l: model.layers[l].mlp.down_proj.weight.detach().clone() for l in layers}, {})


def edit_batch(model, tok, records, templates, hp: Settings, state: EditState, C0: dict, timer: dict,
               P: dict | None = None, zcache: stats.ZCache | None = None):
    """One sequential batch (steps 1-4). Returns the batch log: passes, residuals, requests left.
    alphaedit: P[l] the null-space projector of each edited layer; one pass, every neuron.
    zcache: NSE's z read from / written to disk (MEMIT's and AlphaEdit's z see the current weights)."""
    model.requires_grad_(False)
    nse, l0, layers = hp.method == "nse", hp.layers[-1], hp.layers
    t = time.perf_counter()
    with rewound(model, state.W0 if nse else None):              # MEMIT: z on the current weights
        if nse and zcache is not None:
            Z, zlog = cached_z(zcache, model, tok, records, templates, hp)
        else:
            Z, _, zlog = memit.compute_z(model, tok, records, templates, hp)
    timer["z"] = timer.get("z", 0.0) + time.perf_counter() - t
    blog = {"z_steps": zlog["steps"], "z_cache_hits": zlog.get("cache_hits"), "passes": []}
    for it in range(hp.max_iterations if nse else 1):
        t = time.perf_counter()
        _, H = memit.subject_states(model, tok, records, templates, [], l0)
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
            K, H = memit.subject_states(model, tok, chosen, templates, [l], l0)
            K = K[l]                                                          # (F, n)
            S = select_neurons(K, hp.neuron_threshold) if nse else torch.arange(K.shape[0])
            Rj = (Z[sel] - H).T / (len(layers) - j)              # (D, n): residual spread over layers left
            timer["keys"] = timer.get("keys", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            Cp = state.Cp.get(l) if hp.method != "memit" else None   # MEMIT as published: no earlier keys
            if hp.method == "alphaedit":
                dW = alphaedit.solve_projected_update(Rj, K, P[l], Cp, hp.l2)
            else:
                Cp_SS = None if Cp is None else memit.restrict(Cp, S)
                dW = memit.solve_update(Rj, K[S], memit.restrict(C0[l], S), Cp_SS, hp.lam)
            w = model.layers[l].mlp.down_proj.weight
            if len(S) == w.shape[1]:
                w.data.copy_(w.data.double().add_(dW.to(w.device)))
            else:
                w.data[:, S.to(w.device)] = (w.data[:, S.to(w.device)].double() + dW.to(w.device)).to(w.dtype)
            p["neurons"].append(len(S))
            timer["solve"] = timer.get("solve", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    K, H = memit.subject_states(model, tok, records, templates, layers, l0)  # step 4: Cp += K K^T
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
# Defaults for the checkpoint at hand, and the state that lets editing continue

# SmolLM2-135M, first 20 CounterFact edits, layers 4-8: median ||h_8|| = 132, median q = 2703; the
# calibrated alpha 30 / upper_bound 200 / lambda 2500 are 0.23 m / (2 * clamp 0.75) m / 0.92 q.
H_ALPHA, LAM_PER_Q = 0.23, 0.92


def default_layers(n_layers: int) -> list[int]:
    """Llama3-8B edits layers 4-8 of 32: the same relative depth, 5 layers (fewer on a tiny model)."""
    k = min(5, max(1, n_layers // 4))
    start = min(round(n_layers / 8), n_layers - k)
    return list(range(start, start + k))


def derive_scale_defaults(model, tok, records, templates, layers, C0, clamp: float = 0.75):
    """alpha, upper_bound and lambda from the checkpoint's own scale (overridable on the CLI).
    m = median ||h_l0|| at the subjects: alpha = H_ALPHA m, upper_bound = 2 clamp m (z starts within
    clamp * m of h, so no fresh request is above upper_bound). lambda = LAM_PER_Q * median q,
    q = k^T C0^-1 k (last edited layer): one request's update realises q / (lambda + q) of its
    residual, whatever the key scale or width. The three constants reproduce the SmolLM2-135M
    calibration (shared/docs/CALIBRATION.md: alpha 30, upper_bound 200, lambda 2500)."""
    K, H = memit.subject_states(model, tok, records, templates, [layers[-1]], layers[-1])
    m = H.norm(dim=1).median().item()
    L = memit.cholesky_ridged(C0[layers[-1]].double())          # (F, F)
    k = K[layers[-1]].double()                                   # (F, n)
    q = (k * torch.cholesky_solve(k, L)).sum(0).median().item()
    return {"alpha": H_ALPHA * m, "upper_bound": 2 * clamp * m, "lam": LAM_PER_Q * q,
            "hidden_norm_median": m, "mahalanobis_q_median": q}


# ----------------------------------------------------------------------------------------------
# The editor: batches in sequence, the state that lets editing continue, persistence

CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama-edit", "nse")


class Editor(ev.Editor):
    """Sequential NSE (or MEMIT) edits of the down projections of a few layers of a llama.Llama:

        ed = nse.Editor(model, tokenizer, Settings(batch_size=20), stats_text="wikitext.txt")
        ed.edit(prompts=["The Eiffel Tower is in"], target_new=["Rome"], subject=["The Eiffel Tower"])

    lam, alpha and upper_bound left unset are derived from the first batch (derive_scale_defaults).
    C0 comes from the text file `stats_text`, or from text the model generates when it is None
    (cached in `cache_dir`). The result is a plain checkpoint: export()."""
    name, Settings, default_template, needs_subject = "nse", Settings, "raw", True
    description = "NSE / sequential MEMIT editing of a Llama checkpoint. No arguments: the demo world."

    def __init__(self, model, tokenizer, settings: Settings | None = None, template="raw", stats_text=None,
                 cache_dir=None, z_cache: bool = True):
        super().__init__(model, tokenizer, template)
        self.given = settings or Settings()
        self.check_settings(self.given, model.config)
        self.stats_text, self.cache_dir = stats_text, str(cache_dir or CACHE_DIR)
        model.requires_grad_(False)
        self.contexts = memit.context_templates(model, tokenizer, self.given.seed)
        self.W0 = {l: w.detach().clone() for l, w in self._weights(self.given).items()}
        self.C0, self.P, self.derived, self.timer = None, None, {}, {}
        self.zcache = stats.ZCache(self.cache_dir, model) if z_cache and self.given.method == "nse" else None
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
        if self.C0 is None:
            t = time.perf_counter()
            with rewound(self.model, self.W0):                   # C0 is the unedited model's (step 5)
                self.C0 = stats.load_or_compute_c0(self.model, self.tokenizer, self.stats_text, self.s.layers,
                                             self.s.stats_tokens, self.cache_dir, log=ev.say)
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
        """The requests as the model is asked them: under a chat template (QA, e.g. ZsRE on an
        instruction-tuned model) every row is the templated turn (context prefix inside the user's
        message, the subject in it), and z's target is the answer then the turn's end token, which
        generation stops on. Raw prompts (CounterFact completions, the papers' protocol) stay raw."""
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
            self.s = s = replace(s, nullspace_threshold=alphaedit.default_nullspace_threshold(self.C0, s.layers))
            self.derived["nullspace_threshold"] = s.nullspace_threshold
        if self.P is None:
            self.P = {l: alphaedit.null_space_projector(self.C0[l], s.nullspace_threshold) for l in s.layers}
            self.derived["null_dims"] = {str(l): round(torch.trace(p).item()) for l, p in self.P.items()}
        if s.l2 is None:
            K, _ = memit.subject_states(self.model, self.tokenizer, batch, self.contexts, [top], top)
            self.derived.update(alphaedit.default_l2(self.P[top], K[top]))
            self.s = replace(s, l2=self.derived["l2"])

    def report_notes(self) -> list[str]:
        total, left = sum(self.timer.values()) or 1.0, sum(len(b["left_above_upper"]) for b in self.log)
        shares = {k: round(v / total, 3) for k, v in self.timer.items()}
        return [f"derived from the first batch: {json.dumps(self.derived)}",
                f"requests left above upper_bound (never edited): {left}", f"time shares: {json.dumps(shares)}"] + (
                [f"z read from the cache: {self.zcache.hits} requests"] if self.zcache else [])

    # -- persistence: OUT/nse_state.safetensors (W.l, Cp.l + settings and log), atomic ---------
    # W0 is the checkpoint's own weights: the state keeps only its digest, load() checks it
    def save(self, out):
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
        llama.write_safetensors(Path(out) / "nse_state.safetensors", t, {"state": json.dumps(meta)})

    @classmethod
    def saved(cls, out) -> bool:
        return (Path(out) / "nse_state.safetensors").exists()

    @classmethod
    def load(cls, out, model, tokenizer):
        """The editor saved in OUT, applied to `model`, which must be the unedited checkpoint."""
        path = Path(out) / "nse_state.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
        t, ed = load_file(str(path)), cls.__new__(cls)
        ev.Editor.__init__(ed, model, tokenizer, data.Template(*meta["template"]))
        ed.given, ed.s = Settings(**meta["given"]), Settings(**meta["settings"])
        ed.contexts, ed.derived = meta["contexts"], meta["derived"]
        ed.stats_text, ed.cache_dir, ed.C0, ed.P, ed.timer = meta["stats_text"], meta["cache_dir"], None, None, {}
        model.requires_grad_(False)
        ed.W0 = {l: w.detach().clone() for l, w in ed._weights(ed.s).items()}
        if llama.weights_digest(sorted(ed.W0.items())).hex() != meta["W0_digest"]:
            raise EditError(f"{path}: the model is not the one these edits started from (the down projections "
                            f"of layers {ed.s.layers} differ): load them on the unedited checkpoint")
        ed.zcache = stats.ZCache(ed.cache_dir, model) if meta.get("z_cache") and ed.s.method == "nse" else None
        for l, w in ed._weights(ed.s).items():
            w.data.copy_(t[f"W.{l}"])
        Cp = {l: t[f"Cp.{l}"] for l in ed.s.layers if f"Cp.{l}" in t}
        ed.state = EditState(ed.W0, Cp, meta["n_done"], meta["log"])
        ed.log = ed.state.log
        return ed

    def export(self, out_dir, tokenizer_dir=None, dtype=None):
        """The edited model as a plain Hugging Face checkpoint folder (atomic files), its weights in
        `dtype` (default: the dtype of the checkpoint that came in, config.json's torch_dtype). The
        model in memory is rounded to it too, so what is evaluated next is what was written."""
        dtype = llama.DTYPES.get(dtype or self.model.config.torch_dtype, self.model.dtype)
        for p in self.model.parameters():
            if p.dtype != dtype:
                p.data.copy_(p.data.to(dtype))                   # round in place, one tensor at a time
        tokenizer_dir = tokenizer_dir or getattr(self.tokenizer, "source_dir", None)
        self.model.save_pretrained(out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
        return dtype

    # -- the run harness's inputs: the corpus for C0 ---------------------------------------------
    @classmethod
    def add_inputs(cls, g):
        g.add_argument("--stats-text", help="text corpus for C0, e.g. WikiText-2 raw (default: text the model "
                       "generates itself, generated_corpus)")
        g.add_argument("--cache-dir", default=CACHE_DIR, help="where C0 and NSE's z are cached")
        g.add_argument("--no-z-cache", action="store_true", help="compute NSE's z afresh instead of reading it "
                       "from --cache-dir (it depends only on the original weights, the request and the z settings)")

    @classmethod
    def inputs_from(cls, args, records) -> dict:
        if args.stats_text is not None and not Path(args.stats_text).is_file():
            raise EditError(f"--stats-text {args.stats_text}: file not found")
        return {"stats_text": args.stats_text and Path(args.stats_text), "cache_dir": args.cache_dir,
                "z_cache": not args.no_z_cache}


# ----------------------------------------------------------------------------------------------
# Command line: the run harness of eval.py, and the demo

def demo(log=ev.say):
    """`python nse.py`: the NSE demo's completions (they end with the subject: see
    data.DEMO_SUBJECT_LAST) on its 6-layer model. Settings chosen on the demo world of seed 1 (NSE
    96.7 / 90.0 / 98.3 there) and reported on seed 0's: blocks 0-1, up to 8 passes, z within
    4 ||h|| in 60 steps with no KL term (the "{subject} is a" prompts mean nothing to this model)."""
    import train_sft
    p = train_sft.ensure_demo(log=log, kind="nse")
    return ev.run(Editor, ["--ckpt", str(p["ckpt"]), "--edits", str(p["edits_cf"]), "--stats-text", str(p["corpus"]),
                           "--batch-size", "10", "--layers", "0,1", "--max-iterations", "8", "--alpha", "1",
                           "--clamp", "4", "--v-steps", "60", "--kl-factor", "0",
                           "--threads", "1"], log=log)                          # a tiny model: one thread


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return ev.run(Editor, argv) if argv else demo()


if __name__ == "__main__":
    main()
