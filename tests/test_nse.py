"""NSE / MEMIT: the algebra, the pieces, and whole edits on tiny random Llamas (no downloads)."""
import json
import random
import subprocess
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, edit_files, tiny_model

import data
import harness
import llama
import nse


class CharTok:
    """Character tokenizer for tests, with one merge: a space before a capital letter is one token
    (so " Q" is a single-token target). BOS 1, EOS 2, ids < 97."""
    bos_id, eos_id, pad_id, add_bos, vocab_size = 1, 2, 0, True, 97
    chars = [" "] + [chr(c) for c in range(97, 123)] + [chr(c) for c in range(65, 91)] + list(".,\n0123456789")
    pieces = chars + [" " + chr(c) for c in range(65, 91)]           # 94 pieces -> ids 3..96
    ids = {p: i + 3 for i, p in enumerate(pieces)}

    def encode(self, text, bos=None, eos=False):
        out, i = [], 0
        while i < len(text):
            two = text[i:i + 2]
            if two in self.ids and len(two) == 2:
                out.append(self.ids[two]); i += 2
            else:
                out.append(self.ids.get(text[i], self.ids["."])); i += 1
        return ([1] if (self.add_bos if bos is None else bos) else []) + out + ([2] if eos else [])

    def decode(self, ids, skip_special=False):
        return "".join(self.pieces[i - 3] for i in ids if i >= 3)


TOK = CharTok()
TEMPLATES = ["{}", "Ab. {}"]


def rec(prompt, subject, new, true="x", **kw):
    return data.EditRecord(prompt, new, true, subject, **kw)


def sharp_model(**kw):
    """A tiny random Llama whose head is sharp enough that one hidden vector can decide a token
    (the subject ends each test prompt: a random model's attention barely carries it further)."""
    torch.manual_seed(0)
    model = tiny_model(**kw)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def hp_for(model, **kw):
    kw = {"layers": [0], "lam": 1.0, "alpha": 0.0, "upper_bound": 1e9, "v_lr": 0.5, "v_steps": 30,
          "loss_stop": 1e-3, **kw}
    return nse.Settings(**kw)


# -- the algebra ---------------------------------------------------------------------------------

def test_restricted_update_is_the_exact_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    D, Fs, n = 6, 9, 4
    R, K = torch.randn(D, n, generator=g), torch.randn(Fs, n, generator=g)
    A = torch.randn(Fs, 3 * Fs, generator=g)
    C0 = A @ A.T / (3 * Fs)
    B = torch.randn(Fs, 2, generator=g)
    Cp, lam = B @ B.T, 2.5
    # a float32 A @ A.T need not be exactly symmetric (it depends on the CPU's gemm kernel), and the
    # Cholesky solve reads one triangle: make both exactly symmetric, as nse.py's C0 and Cp are
    C0, Cp = (C0 + C0.T) / 2, (Cp + Cp.T) / 2
    dW = nse.solve_update(R, K, C0, Cp, lam)
    # min ||X K - R||^2 + ||X L||^2 with L L^T = lam C0 + Cp: least squares on stacked columns
    L = torch.linalg.cholesky(lam * C0.double() + Cp.double())
    lhs = torch.cat([K.double(), L], 1).T                         # (n + Fs, Fs)
    rhs = torch.cat([R.double(), torch.zeros(D, Fs, dtype=torch.float64)], 1).T
    X = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(dW, X, atol=1e-10)
    # and the gradient of the objective vanishes there, but not at a perturbed point
    grad = lambda W: (W @ K.double() - R.double()) @ K.double().T + W @ (lam * C0.double() + Cp.double())
    assert grad(dW).abs().max() < 1e-10
    assert grad(dW + 1e-3).abs().max() > 1e-6


def test_neuron_selection_keeps_the_smallest_set_holding_the_mass():
    K = torch.zeros(6, 2)
    K[:, 0] = torch.tensor([5.0, 0.0, -3.0, 1.0, 0.5, 0.5])       # |K| row sums: 5, 0, 3, 1, .5, .5 (+ col 1)
    K[:, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert nse.select_neurons(K, 0.5).tolist() == [0]             # 5 of 10 reaches 50%
    assert nse.select_neurons(K, 0.51).tolist() == [0, 2]          # 8 of 10
    assert nse.select_neurons(K, 0.85).tolist() == [0, 2, 3]       # 9 of 10
    assert nse.select_neurons(K, 1.0).tolist() == [0, 2, 3, 4, 5]  # everything but the silent neuron


def test_default_layers_follow_the_relative_depth():
    assert nse.default_layers(32) == [4, 5, 6, 7, 8]
    assert nse.default_layers(30) == [4, 5, 6, 7, 8]
    assert nse.default_layers(2) == [0]


# -- z, keys and an edit on a tiny model ---------------------------------------------------------

def test_z_split_forward_matches_the_plain_forward_and_reaches_its_target():
    model = sharp_model(num_hidden_layers=3).requires_grad_(False)
    recs = [rec("Home of Bob", "Bob", "Q"), rec("Dog Rex", "Dog Rex", "Z")]
    hp = hp_for(model, layers=[0, 1], kl_factor=0.0, v_steps=40)
    z, h, log = nse.compute_z(model, TOK, recs, TEMPLATES, hp)
    # h is the plain forward's block-1 output at the subject's last token of the bare prompt
    for i, r in enumerate(recs):
        ids, s = nse.subject_row(TOK, r.prompt, r.subject)
        tr = model.forward_trace(torch.tensor([ids]))
        assert torch.allclose(tr.hidden[2][0, s], h[i], atol=1e-5)
        # with z in place of h (a hook on block 1), the plain forward gives the target a small NLL
        enc = data.encode_prompt_target(TOK, data.Template("raw"), r.prompt, r.target_new)
        hook = model.layers[1].register_forward_hook(
            lambda m, a, o: torch.cat([o[:, :s], z[i].view(1, 1, -1), o[:, s + 1:]], 1))
        logp = model(torch.tensor([enc.ids])).log_softmax(-1)[0]
        hook.remove()
        nll = -torch.stack([logp[t - 1, enc.ids[t]] for t in range(enc.target_start, enc.target_end)]).mean()
        base = model(torch.tensor([enc.ids])).log_softmax(-1)[0]
        nll0 = -torch.stack([base[t - 1, enc.ids[t]] for t in range(enc.target_start, enc.target_end)]).mean()
        assert nll < 0.15 and nll0 > 1.0
        assert (z[i] - h[i]).norm() <= hp.clamp * h[i].norm() + 1e-4   # inside the L2 ball


def _margin(model, r):
    """NLL(target_true) - NLL(target_new) after the prompt: > 0 means the new target wins."""
    def nll(t):
        enc = data.encode_prompt_target(TOK, data.Template("raw"), r.prompt, t)
        lp = model(torch.tensor([enc.ids])).log_softmax(-1)[0]
        return -torch.stack([lp[j - 1, enc.ids[j]] for j in range(enc.target_start, enc.target_end)]).mean()
    with torch.no_grad():
        return (nll(r.target_true) - nll(r.target_new)).item()


def _edit_and_measure(method, identity_prior=False):
    """Edit two requests on a tiny model; return (margins after, mean TV on held-out text, log)."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on in park mat home of boss why not now hello there friend".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(320)]
    model = sharp_model(num_hidden_layers=3, intermediate_size=512)
    C0, n = nse.key_second_moment(model, TOK, "\n".join(lines[:300]), [0, 1], 3000, chunk=50)
    if identity_prior:                        # the same update with C0 replaced by a scaled identity
        C0 = {l: torch.eye(512) * c.trace() / 512 for l, c in C0.items()}
    recs = []
    for prompt, subject in [("The boss of Kim", "Kim"), ("Home of Ann Pi", "Ann Pi")]:
        letters = sorted("ABCDEFGHIJKLMNOPQRSTUVWXYZ", key=lambda c: -_margin(model, rec(prompt, subject, c, "A")))
        recs.append(rec(prompt, subject, letters[-1], letters[0]))    # the model's least / most likely
    assert all(_margin(model, r) < 0 for r in recs)
    held = torch.tensor([TOK.encode(t)[:40] for t in lines[300:]])
    with torch.no_grad():
        before = model(held).softmax(-1)
    hp = hp_for(model, layers=[0, 1], lam=1.0, method=method, kl_factor=0.0, l2=1e-3)
    P = {l: nse.null_space_projector(C0[l], C0[l].diagonal().mean().item()) for l in C0}
    state = nse.EditState.fresh(model, [0, 1])
    log = nse.edit_batch(model, TOK, recs, TEMPLATES, hp, state, C0, {}, P)
    with torch.no_grad():
        tv = 0.5 * (model(held).softmax(-1) - before).abs().sum(-1)           # per position
    if method == "memit":                                                     # MEMIT as published: no Cp
        assert state.Cp == {}
    else:
        assert state.Cp[0].abs().sum() > 0                                    # Cp accumulated
    return [_margin(model, r) for r in recs], tv.mean().item(), log


@pytest.mark.parametrize("method", ["nse", "memit", "memit-seq", "alphaedit"])
def test_edit_batch_makes_targets_win_and_unrelated_prompts_barely_move(method):
    margins, tv, log = _edit_and_measure(method)
    assert all(m > 0 for m in margins), log
    assert tv < 0.1
    if method == "nse":
        assert log["passes"][0]["edited"] == 2 and log["left_above_upper"] == []
        _, tv_identity, _ = _edit_and_measure(method, identity_prior=True)
        assert tv < 0.5 * tv_identity          # C0 is what protects unrelated text


def _preserved_keys(F=32, rank=20, n=400, seed=0):
    """n keys that live (up to 1e-6 noise) in a random rank-`rank` subspace of R^F, and their C0."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(F, rank, generator=g, dtype=torch.float64))[0]      # (F, rank)
    K0 = basis @ torch.randn(rank, n, generator=g, dtype=torch.float64) + 1e-6 * torch.randn(F, n, generator=g, dtype=torch.float64)
    return K0, basis, K0 @ K0.T / n


def test_null_space_projector_is_idempotent_and_annihilates_the_preserved_keys():
    K0, basis, C0 = _preserved_keys()
    P = nse.null_space_projector(C0, threshold=1e-8)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T, atol=1e-12)
    assert round(torch.trace(P).item()) == 32 - 20                     # the null space: the 12 unused directions
    assert (P @ basis).norm() < 1e-5 * basis.norm()                    # the preserved directions are annihilated
    assert (P @ K0).norm() < 1e-5 * K0.norm()                          # (up to the keys own noise)


def test_alphaedit_update_keeps_preserved_outputs_and_moves_the_edited_keys():
    K0, basis, C0 = _preserved_keys()
    P = nse.null_space_projector(C0, threshold=1e-8)
    g = torch.Generator().manual_seed(1)
    K1 = torch.randn(32, 3, generator=g, dtype=torch.float64)         # new keys, partly outside the preserved span
    R = torch.randn(16, 3, generator=g, dtype=torch.float64)          # residuals z - h they must realise
    dW = nse.solve_projected_update(R, K1, P, None, l2=1e-6)           # (D, F)
    assert dW.shape == (16, 32)
    assert (dW @ K0).norm() < 1e-5 * (dW @ K1).norm()                   # W k0 unchanged (to the keys noise)
    assert (dW @ basis).norm() < 1e-6 * dW.norm()
    assert (dW @ K1 - R).norm() < 1e-3 * R.norm()                      # the edited keys reach their targets
    # MEMIT's update for the same request does move the preserved outputs
    dW_memit = nse.solve_update(R, K1, C0.clone(), None, 1e-6)
    assert (dW_memit @ K0).norm() > 10 * (dW @ K0).norm()
    # a larger ridge realises less of the residual; with Cp the earlier keys are held too
    far = nse.solve_projected_update(R, K1, P, None, l2=10.0)
    assert (far @ K1 - R).norm() > (dW @ K1 - R).norm()


def test_requests_above_upper_bound_are_reported_not_dropped_silently():
    torch.manual_seed(0)
    model = tiny_model(num_hidden_layers=2)
    C0, _ = nse.key_second_moment(model, TOK, "abc def ghi " * 100, [0], 500, chunk=40)
    recs = [rec("Kim Lo works at", "Kim Lo", "Zeta", "Beta")]
    state = nse.EditState.fresh(model, [0])
    w = model.layers[0].mlp.down_proj.weight.detach().clone()
    log = nse.edit_batch(model, TOK, recs, TEMPLATES, hp_for(model, upper_bound=1e-6), state, C0, {})
    assert log["left_above_upper"] == [0] and log["passes"][0]["above_upper"] == 1
    assert torch.equal(model.layers[0].mlp.down_proj.weight, w)     # nothing edited


# -- covariance cache ----------------------------------------------------------------------------

def test_c0_cache_reuses_and_invalidates(tmp_path):
    model = tiny_model(num_hidden_layers=2)
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat\n" * 40)
    cache = tmp_path / "cache"
    logs = []
    a = harness.load_or_compute_c0(model, TOK, text, [0, 1], 300, cache, nse.key_second_moment, chunk=64, log=logs.append)
    assert len(logs) == 1 and len(list(cache.glob("*.safetensors"))) == 2
    b = harness.load_or_compute_c0(model, TOK, text, [0, 1], 300, cache, nse.key_second_moment, chunk=64, log=logs.append)
    assert len(logs) == 1 and torch.equal(a[1], b[1])              # cached, identical
    harness.load_or_compute_c0(model, TOK, text, [0, 1], 200, cache, nse.key_second_moment, chunk=64, log=logs.append)
    assert len(logs) == 2                                          # another token count: recomputed
    text.write_text("a dog ran in the park\n" * 40)
    harness.load_or_compute_c0(model, TOK, text, [0], 300, cache, nse.key_second_moment, chunk=64, log=logs.append)
    assert len(logs) == 3                                          # another corpus
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(1.5)               # other weights below layer 1
    c = harness.load_or_compute_c0(model, TOK, text, [1], 300, cache, nse.key_second_moment, chunk=64, log=logs.append)
    assert len(logs) == 4 and not torch.allclose(c[1], b[1])
    d = harness.load_or_compute_c0(model, TOK, text, [1], 300, cache, nse.key_second_moment, chunk=64, log=logs.append, keep_bytes=0)
    assert len(logs) == 4 and dict.__len__(d) == 0 and 1 in d       # above keep_bytes: read per use
    assert torch.equal(d[1], c[1]) and d[1] is not d[1]


# -- the CLI: bad inputs, save / resume ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint with a tokenizer.json, an edit file and a corpus, for the CLI."""
    root = edit_files(tmp_path_factory.mktemp("nse_cli"),
                      [("Kim Lo", "Oslo"), ("Ann Pi", "Lima"), ("Joe Wu", "Baku"), ("Tim Ka", "Riga")])
    return root


def run_cli(root, *extra):
    cmd = [sys.executable, str(ROOT / "nse.py"), "--ckpt", str(root / "ckpt"), "--edits", str(root / "edits.jsonl"),
           "--stats-text", str(root / "corpus.txt"), "--stats-tokens", "1000", "--cache-dir", str(root / "cache"),
           "--layers", "0,1", "--no-fluency", "--threads", "1", "--v-steps", "8", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(subject="Nobody"), "does not occur in the prompt"),
    (lambda r: r.update(target_new=" "), "target_new: empty target"),
])
def test_bad_requests_fail_before_work_naming_line_and_field(tiny_ckpt, tmp_path, change, message):
    lines = (tiny_ckpt / "edits.jsonl").read_text().splitlines()
    r = json.loads(lines[2])
    change(r)
    lines[2] = json.dumps(r)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    p = subprocess.run([sys.executable, str(ROOT / "nse.py"), "--ckpt", str(tiny_ckpt / "ckpt"), "--edits", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "bad.jsonl:3" in last and message in last and "Traceback" not in p.stderr


def test_bad_layers_and_missing_corpus_are_refused_before_loading(tiny_ckpt):
    p = run_cli(tiny_ckpt, "--layers", "1,0")
    assert p.returncode != 0 and "layers [1, 0]: must be ascending" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(tiny_ckpt, "--stats-text", str(tiny_ckpt / "nowhere.txt"))
    assert p.returncode != 0 and "nowhere.txt: file not found" in p.stderr


@pytest.mark.parametrize("method", ["nse", "alphaedit"])
def test_save_and_resume_reproduce_the_weights(tiny_ckpt, tmp_path, monkeypatch, method):
    args = ["--ckpt", str(tiny_ckpt / "ckpt"), "--edits", str(tiny_ckpt / "edits.jsonl"),
            "--stats-text", str(tiny_ckpt / "corpus.txt"), "--stats-tokens", "1000", "--cache-dir",
            str(tiny_ckpt / "cache"), "--layers", "0,1", "--no-fluency", "--threads", "2", "--v-steps", "8",
            "--method", method, "--batch-size", "2"]
    nse.main(args + ["--out", str(tmp_path / "full")])
    full = load_file(str(tmp_path / "full" / "nse_state.safetensors"))
    real, calls = nse.edit_batch, []

    def killed_after_one_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(nse, "edit_batch", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        nse.main(args + ["--out", str(tmp_path / "part")])
    half = load_file(str(tmp_path / "part" / "nse_state.safetensors"))
    assert not torch.equal(half["W.1"], full["W.1"])               # the state after batch 1 only
    assert not (tmp_path / "part" / "model").exists()              # exported once, at the end
    nse.main(["--export", str(tmp_path / "part"), "--export-dtype", "float32"])   # ... or by a command, any time
    assert torch.equal(llama.Llama.from_pretrained(tmp_path / "part" / "model").layers[1].mlp.down_proj.weight, half["W.1"])
    shutil.rmtree(tmp_path / "part" / "model")
    monkeypatch.setattr(nse, "edit_batch", real)
    rep = nse.main(args + ["--out", str(tmp_path / "part"), "--resume"])
    assert "Efficacy" in rep.sections[method] and len(calls) == 2
    again = load_file(str(tmp_path / "part" / "nse_state.safetensors"))
    for k in full:
        assert torch.equal(full[k], again[k]), k
    # the saved model is a loadable Hugging Face checkpoint holding the edited weights
    edited = llama.Llama.from_pretrained(tmp_path / "full" / "model")
    assert torch.equal(edited.layers[1].mlp.down_proj.weight, full["W.1"])
    assert not torch.equal(full["W.1"], llama.Llama.from_pretrained(tiny_ckpt / "ckpt").layers[1].mlp.down_proj.weight)
    out = json.loads((tmp_path / "full" / "results.json").read_text())
    assert "Efficacy" in out["results"][method] and "Efficacy" in out["results"]["unedited"]
    with pytest.raises(SystemExit, match="--resume: setting batch_size was 2, now 1"):
        nse.main(args[:-1] + ["1", "--out", str(tmp_path / "part"), "--resume"])


def _widened_weights_saved_for_backward(model, fn):
    """How many tensors autograd keeps for backward during fn() that are a float32 copy of one of
    the model's bfloat16 weight matrices."""
    narrow = [w for w in model.parameters() if w.dtype == torch.bfloat16 and w.dim() == 2]
    found = []

    def pack(t):
        if t.dtype == torch.float32 and t.dim() == 2 and any(
                (t.shape == w.shape and torch.equal(t, w.float())) or
                (t.shape == w.T.shape and torch.equal(t, w.float().T)) for w in narrow):
            found.append(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return len(found), out


def test_z_with_bf16_weights_keeps_no_widened_weight_and_matches_fp32(monkeypatch):
    """bf16 weights, fp32 compute: autograd keeps the narrow weights, not float32 copies of them
    (llama._WidenOnTheFly re-widens in backward), and z equals the fp32 model's with the same
    (bf16-rounded) weights."""
    model = sharp_model(num_hidden_layers=4)
    narrow = llama.Llama(model.config).to(torch.bfloat16)
    narrow.load_state_dict(model.state_dict())
    wide = llama.Llama(model.config)
    wide.load_state_dict(narrow.state_dict())
    narrow.compute_dtype = torch.float32
    recs = [rec("Home of Bob", "Bob", "Q"), rec("Dog Rex", "Dog Rex", "Z")]
    hp = hp_for(model, layers=[0], v_steps=5, kl_factor=0.0625)
    run = lambda m: nse.compute_z(m.requires_grad_(False), TOK, recs, TEMPLATES, hp)
    kept, (z_narrow, _, log_n) = _widened_weights_saved_for_backward(narrow, lambda: run(narrow))
    assert kept == 0
    z_wide, _, log_w = run(wide)
    assert torch.allclose(z_narrow, z_wide, atol=1e-4) and log_n["steps"] == log_w["steps"]
    # the check can fail: a plain widen-then-matmul keeps a float32 copy of every weight it touches
    monkeypatch.setattr(llama._WidenOnTheFly, "apply", lambda x, w: torch.nn.functional.linear(x, w.to(x.dtype)))
    kept, _ = _widened_weights_saved_for_backward(narrow, lambda: run(narrow))
    assert kept > 0


def test_without_a_corpus_c0_comes_from_text_the_model_generates(tiny_ckpt, tmp_path):
    model, tok = llama.load(tiny_ckpt / "ckpt")
    a = harness.generated_corpus(model, tok, 300, length=40, batch=4)
    b = harness.generated_corpus(model, tok, 300, length=40, batch=4)
    assert a == b and sum(map(len, a)) == 300 and all(s[0] == tok.eos_id for s in a)   # seeded; from EOS
    assert len({tuple(s) for s in a}) == len(a)                                            # sampled, not greedy
    logs = []
    C0 = harness.load_or_compute_c0(model, tok, None, [0, 1], 300, tmp_path, nse.key_second_moment, log=logs.append)
    assert "the model writes 300 tokens" in logs[0] and "300 tokens of generated text" in logs[1]
    assert torch.allclose(C0[0], C0[0].T)
    again = harness.load_or_compute_c0(model, tok, None, [0, 1], 300, tmp_path, nse.key_second_moment, log=logs.append)
    assert len(logs) == 2 and torch.equal(again[1], C0[1])                                  # cached
    other = harness.load_or_compute_c0(model, tok, tiny_ckpt / "corpus.txt", [0], 300, tmp_path, nse.key_second_moment, log=logs.append)
    assert len(logs) == 3 and not torch.equal(other[0], C0[0])                              # a different key
    # the command line, with no corpus at all (a fresh clone has no ../shared)
    p = subprocess.run([sys.executable, str(ROOT / "nse.py"), "--ckpt", str(tiny_ckpt / "ckpt"), "--edits",
                        str(tiny_ckpt / "edits.jsonl"), "--stats-tokens", "500", "--cache-dir", str(tmp_path / "c"),
                        "--layers", "0,1", "--no-fluency", "--threads", "1", "--v-steps", "4", "--n", "2"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "500 tokens of generated text" in p.stdout and "Efficacy" in p.stdout


def test_z_cache_returns_the_computed_z_and_recomputes_when_a_key_part_changes(tmp_path, monkeypatch):
    model = sharp_model(num_hidden_layers=2)
    recs = [rec("The boss of Kim", "Kim", " Q", " A"), rec("Home of Ann Pi", "Ann Pi", " Z", " B")]
    hp = hp_for(model, layers=[0], v_steps=5)
    real, calls = nse.compute_z, []
    monkeypatch.setattr(nse, "compute_z", lambda m, t, rs, *a, **k: calls.append(len(rs)) or real(m, t, rs, *a, **k))
    cache = harness.ZCache(tmp_path, model)
    Z, log = nse.cached_z(cache, model, TOK, recs, TEMPLATES, hp)
    assert calls == [2] and log["cache_hits"] == 0 and len(list((tmp_path / "z").glob("*.safetensors"))) == 2
    expect, _, _ = real(model, TOK, recs, TEMPLATES, hp)
    assert torch.equal(Z, expect)
    Z2, log = nse.cached_z(cache, model, TOK, recs[::-1], TEMPLATES, hp)              # both read back, in order
    assert calls == [2] and log["cache_hits"] == 2 and torch.equal(Z2, Z.flip(0))
    nse.cached_z(cache, model, TOK, recs, TEMPLATES, hp_for(model, layers=[0], v_steps=6))   # another z setting
    assert calls == [2, 2]
    nse.cached_z(cache, model, TOK, [rec("The boss of Kim", "Kim", " R", " A")], TEMPLATES, hp)   # another target
    assert calls == [2, 2, 1]
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3                    # another checkpoint
    nse.cached_z(harness.ZCache(tmp_path, model), model, TOK, recs, TEMPLATES, hp)
    assert calls == [2, 2, 1, 2]


def _kl_after(model, delta, r, prompt):
    """KL(unedited || with delta = z - h added at the subject) of the next token after `prompt`."""
    s = nse.subject_row(TOK, prompt, r.subject)[1]
    ids = TOK.encode(prompt)
    base = model(torch.tensor([ids])).log_softmax(-1)[0, -1]
    hook = model.layers[1].register_forward_hook(
        lambda m, a, o: torch.cat([o[:, :s], o[:, s:s + 1] + delta.view(1, 1, -1), o[:, s + 1:]], 1))
    new = model(torch.tensor([ids])).log_softmax(-1)[0, -1]
    hook.remove()
    return torch.nn.functional.kl_div(new, base, log_target=True, reduction="sum").item()


def test_relation_kl_rows_keep_the_subjects_other_next_tokens(monkeypatch):
    """kl_relations > 0: z also keeps the next-token distribution of a prompt asking another
    relation of the subject, and still reaches the target."""
    model = sharp_model(num_hidden_layers=3).requires_grad_(False)
    monkeypatch.setattr(nse, "KL_RELATIONS", ["Ab Bobc", "Of Bobx"])
    r = rec("Home of Bob", "Bob", "Q")
    rows = nse.z_rows(TOK, [r], TEMPLATES, 2)
    assert [x[5] for x in rows] == [None, None, rows[2][1], len(TOK.encode("Ab Bobc")) - 1,
                                    len(TOK.encode("Of Bobx")) - 1]
    paper = hp_for(model, layers=[0, 1], kl_factor=5.0, v_steps=60, loss_stop=0.0)
    z0, h, _ = nse.compute_z(model, TOK, [r], TEMPLATES, paper)
    z1, _, _ = nse.compute_z(model, TOK, [r], TEMPLATES, replace_hp(paper, kl_relations=1))
    kl0, kl1 = (_kl_after(model, z - h[0], r, "Ab Bobc") for z in (z0[0], z1[0]))
    assert kl1 < 0.6 * kl0 and kl0 > 0.05                   # measured: 0.037 vs 0.071
    enc = data.encode_prompt_target(TOK, data.Template("raw"), r.prompt, r.target_new)
    for z in (z0, z1):                                      # the target is reached either way
        assert _target_nll(model, r, enc, z[0]) < 0.5       # measured: 0.38, 0.39 (unedited > 1)
    assert _target_nll(model, r, enc, h[0]) > 1.0


def _target_nll(model, r, enc, z):
    s = nse.subject_row(TOK, r.prompt, r.subject)[1]
    hook = model.layers[1].register_forward_hook(lambda m, a, o: torch.cat([o[:, :s], z.view(1, 1, -1), o[:, s + 1:]], 1))
    logp = model(torch.tensor([enc.ids])).log_softmax(-1)[0]
    hook.remove()
    return -logp[enc.target_start - 1, enc.ids[enc.target_start]].item()


def replace_hp(hp, **kw):
    import dataclasses
    return dataclasses.replace(hp, **kw)


def test_relation_kl_prompts_are_not_counterfact_prompts():
    """KL_RELATIONS are our own phrasings: no prompt or rephrase of the CounterFact files (the
    relation-specificity probes come from those) is among them."""
    root = ROOT.parent / "shared" / "data" / "counterfact"
    if not root.exists():
        pytest.skip("../shared is absent")
    seen = set()
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        for r in json.loads((root / name).read_text()):
            for p in [r["prompt"], r.get("rephrase_prompt") or ""]:
                if r["subject"] in p:
                    seen.add(p[p.index(r["subject"]):].replace(r["subject"], "{}", 1))
                    seen.add(p.replace(r["subject"], "{}", 1))
    assert not seen & set(nse.KL_RELATIONS)


def test_chat_template_requests_are_edited_as_asked_with_the_end_token():
    """Under a chat template (ZsRE on an instruction-tuned model) a request's rows are the templated
    turn, and z learns the answer as the template splits it, then the end token generation stops
    on; keys are read at the subject inside the turn; raw requests are as given."""
    r = rec("Home of Bob", "Bob", "Q")
    ed = nse.Editor.__new__(nse.Editor)
    ed.template, ed.tokenizer = data.Template("llama2"), TOK
    [a] = ed.as_asked([r])
    assert a.prompt == r.prompt and a.meta["asked"] == ["llama2", None] and not r.meta
    rows = [x for x in nse.z_rows(TOK, [a], TEMPLATES) if x[5] is None]
    assert [x[0][:x[2]] for x in rows] == [TOK.encode("[INST]Home of Bob[/INST]"), TOK.encode("[INST]Ab. Home of Bob[/INST]")]
    assert all(x[0][x[2]:x[3]] == [TOK.ids["Q"], TOK.eos_id] for x in rows)     # no space: llama2's split
    keys = nse.key_rows(TOK, [a], TEMPLATES)
    assert [ids for ids, _ in keys] == [TOK.encode("[INST]Home of Bob"), TOK.encode("[INST]Ab. Home of Bob")]
    assert [s for _, s in keys] == [x[1] for x in rows]
    ed.template = data.Template("raw")
    assert ed.as_asked([r]) == [r]
    rows = [x for x in nse.z_rows(TOK, [r], TEMPLATES) if x[5] is None]
    assert all(x[0][x[2]:x[3]] == [TOK.ids[" Q"]] for x in rows)


def test_kl_direction_is_each_formula_computed_by_hand():
    """z's KL term: p0_p = sum p0 log(p0 / p), p_p0 = sum p log(p / p0) (the official code's)."""
    p0 = torch.tensor([[0.7, 0.2, 0.1]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    by_hand_p0_p = (p0 * (p0 / p).log()).sum().item()           # 0.5838...
    by_hand_p_p0 = (p * (p / p0).log()).sum().item()            # 0.5375...
    assert abs(by_hand_p0_p - by_hand_p_p0) > 0.01               # the two directions differ here
    got = {d: nse.kl_rows_term(p.log(), p0.log(), d).item() for d in ("p0_p", "p_p0")}
    assert abs(got["p0_p"] - by_hand_p0_p) < 1e-6 and abs(got["p_p0"] - by_hand_p_p0) < 1e-6


def test_memit_as_published_ignores_earlier_keys_and_memit_seq_uses_them():
    """Two batches: the second batch's update of memit-seq depends on the first batch's keys (Cp),
    MEMIT's does not (its solve has lam C0 + K K^T only)."""
    R, K, C0 = torch.randn(4, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), torch.eye(6)
    Kp = torch.randn(6, 3, dtype=torch.float64)
    plain = nse.solve_update(R, K, C0, None, 1.0)
    seq = nse.solve_update(R, K, C0, Kp @ Kp.T, 1.0)
    assert not torch.allclose(plain, seq)
    C0_64 = torch.eye(6, dtype=torch.float64)
    nse.solve_update(R, K, C0_64, None, 3.0)
    assert torch.equal(C0_64, torch.eye(6, dtype=torch.float64))    # the caller's C0 is never scaled in place
