"""SCEN: losses, neurons, routing, editing a tiny random Llama, persistence, bad inputs."""
import json

import pytest
import torch

import harness
import llama
import scen
from conftest import assert_same_greedy, tiny_checkpoint, tiny_model

# The tiny model's single down projection needs a larger step than a real model's.
TINY = dict(layer=1, expert_lr=3e-2, expert_steps=150, expert_nll=0.5)
UNREL = [[1, 5 + i, 7, 9 + i, 11] for i in range(6)]
EDITS = [([1, 20 + i, 30 + i, 40, 41, 50 + i, 2], 5) for i in range(4)]   # prompt = 5 ids, target + EOS


def make_editor(seed=0, **kw):
    return scen.Editor(tiny_model(seed), None, scen.Settings(**{**TINY, **kw}), unrelated=UNREL)


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    a_t, a = torch.rand((), generator=g), torch.rand(7, generator=g)
    al, be, m = 0.7, 0.3, 0.5
    assert torch.allclose(scen.activate_loss(a_t), torch.exp(-a_t))
    assert torch.allclose(scen.disactivate_loss(a, al), sum(torch.exp(x + al) for x in a) / 7)
    assert torch.allclose(scen.margin_loss(a, a_t, be), sum(torch.exp(x - a_t + be) for x in a) / 7)
    paper = torch.exp(-a_t) + m * (sum(torch.exp(x + al) for x in a) / 7 + sum(torch.exp(x - a_t + be) for x in a) / 7)
    assert torch.allclose(scen.index_loss(a_t, a, al, be, m), paper)
    code = torch.exp(-a_t) + m * (torch.exp(a).mean() + al + (torch.exp(a) - a_t).mean() + be)
    assert torch.allclose(scen.index_loss(a_t, a, al, be, m, code=True), code)
    assert torch.allclose(scen.index_loss(a_t, a[:0], al, be, m), torch.exp(-a_t))   # first edit


def test_route_threshold_and_argmax():
    a = torch.tensor([[0.1, 0.9, 0.7], [0.64, 0.2, 0.3], [0.66, 0.1, 0.2]])
    assert scen.route(torch.logit(a), 0.65).tolist() == [1, -1, 0]
    assert scen.route(torch.zeros(2, 0), 0.65).tolist() == [-1, -1]


def test_route_breaks_saturated_ties_by_logit():
    # both neurons saturate (sigmoid == 1.0 exactly in float32): the harder-firing one is chosen
    z = torch.tensor([[20.0, 30.0]])
    assert torch.sigmoid(z).tolist() == [[1.0, 1.0]]
    assert scen.route(z, 0.65).tolist() == [1]
    assert torch.sigmoid(z).argmax(-1).tolist() == [0]        # what argmax over a would pick


def test_neuron_separates_on_cached_features():
    torch.manual_seed(0)
    base = torch.randn(64) * 3
    feats = torch.nn.functional.normalize(base + torch.randn(6, 64), dim=-1)   # shared template direction
    s = scen.Settings(bias=True)
    w, b, steps = scen.train_neuron(feats[0], feats[1:], s, generator=torch.Generator().manual_seed(0))
    a = torch.sigmoid(feats @ w + b)
    assert a[0] > s.theta and (a[1:] < s.theta).all() and steps < s.neuron_steps
    # the paper's 20 steps at lr 1e-4 do not separate them (docs/CALIBRATION.md)
    p = scen.Settings(**scen.PAPER)
    w, b, _ = scen.train_neuron(feats[0], feats[1:], p, generator=torch.Generator().manual_seed(0))
    assert torch.sigmoid(feats[0] @ w + b) < p.theta


def same_expert(x, y):
    return all(torch.equal(a, b) for a, b in zip(x, y)) if isinstance(x, scen.LowRank) else torch.equal(x, y)


@pytest.mark.parametrize("expert", ["full", "lowrank"])
def test_edits_route_to_their_own_expert_in_a_batch(expert):
    ed = make_editor(expert=expert)
    for ids, ts in EDITS:
        ed.edit_ids(ids, ts)
    f = ed.feats(torch.stack(ed.U))
    a = scen.neuron_activations(f, ed.router.W, ed.router.b)
    assert (a.diag() > ed.s.theta).all()
    assert (a - torch.eye(len(EDITS)) * 10 < ed.s.theta).all()          # off-diagonal below theta
    prompts = [EDITS[2][0][:5], [1, 60, 61], EDITS[0][0][:5], EDITS[3][0][:5]]      # left padding
    outs = ed.generate_ids(prompts, 6, eos_ids=[2])
    assert ed.router.choice.tolist() == [2, -1, 0, 3]
    assert outs[0] == EDITS[2][0][5:-1] and outs[2] == EDITS[0][0][5:-1] and outs[3] == EDITS[3][0][5:-1]
    for p, o in zip(prompts, outs):                                       # batch == one by one (up to a near tie)
        def routed(x, p=p):                                               # routed at the prompt's end, as generation is
            ed.prepare(x, None, torch.tensor([len(p) - 1]))
            return ed.model(x)
        assert_same_greedy(routed, p, ed.generate_ids([p], 6, eos_ids=[2])[0], o)


@pytest.mark.parametrize("expert", ["full", "lowrank"])
def test_edit_becomes_greedy_answer_unrouted_logits_bit_identical(expert):
    ref = tiny_model(0)
    ed = make_editor(expert=expert)
    ids, ts = EDITS[0]
    prompt, other = ids[:ts], [1, 70, 71, 72, 73, 74]
    before = llama_generate(ref, prompt)
    assert before != ids[ts:-1]                                            # not already the answer
    ed.edit_ids(ids, ts)
    assert ed.generate_ids([prompt], 6, eos_ids=[2])[0] == ids[ts:-1]
    x = torch.tensor([other])
    with torch.no_grad():
        ed.prepare(x, None, torch.tensor([len(other) - 1]))
        got = ed.model(x)
        assert ed.router.choice.tolist() == [-1]
        assert torch.equal(got, ref(x))
        # batched with a routed row: the unrouted row is still bit-identical
        y = torch.tensor([other, prompt + [9]])
        ed.prepare(y, None, torch.tensor([5, 4]))
        got = ed.model(y)
        assert ed.router.choice.tolist() == [-1, 0] and torch.equal(got[0], ref(y)[0])


def llama_generate(model, prompt):
    import llama
    return llama.generate(model, [prompt], 6, eos_ids=[2])[0]


def test_ft_changes_the_shared_weight():
    ref = tiny_model(0)
    ed = make_editor(method="ft")
    ids, ts = EDITS[0]
    ed.edit_ids(ids, ts)
    assert ed.generate_ids([ids[:ts]], 6, eos_ids=[2])[0] == ids[ts:-1]
    x = torch.tensor([[1, 70, 71, 72, 73, 74]])
    with torch.no_grad():
        assert not torch.equal(ed.model(x), ref(x))                          # no routing: everything moves


def test_cost_per_edit_is_flat_layers_below_l_run_once():
    ed = make_editor(layer=1)
    calls = []
    ed.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    for ids, ts in EDITS:
        n = len(calls)
        ed.edit_ids(ids, ts)
        assert len(calls) - n == 1                      # one pass below l per edit, whatever t


@pytest.mark.parametrize("expert", ["full", "lowrank"])
def test_save_load_and_resume_reproduce(tmp_path, expert):
    full = make_editor(expert=expert)
    for ids, ts in EDITS[:3]:
        full.edit_ids(ids, ts)
    full.save(tmp_path / "a")
    part = make_editor(expert=expert)
    for ids, ts in EDITS[:2]:
        part.edit_ids(ids, ts)
        part.save(tmp_path / "b")                                        # after every edit, as the harness does
    resumed = scen.Editor.load(tmp_path / "b", tiny_model(0))            # a killed run, restarted
    resumed.edit_ids(*EDITS[2])
    resumed.save(tmp_path / "b")
    loaded = scen.Editor.load(tmp_path / "a", tiny_model(0))
    again = scen.Editor.load(tmp_path / "b", tiny_model(0))
    for ed in (resumed, loaded, again):
        assert torch.equal(ed.router.W, full.router.W) and torch.equal(ed.router.b, full.router.b)
        assert len(ed.router.experts) == 3
        assert all(same_expert(x, y) for x, y in zip(ed.router.experts, full.router.experts))
    prompts = [ids[:ts] for ids, ts in EDITS] + [[1, 70, 71, 72]]
    want = full.generate_ids(prompts, 6, eos_ids=[2])
    assert want[0] == EDITS[0][0][5:-1]
    assert resumed.generate_ids(prompts, 6, eos_ids=[2]) == want == loaded.generate_ids(prompts, 6, eos_ids=[2])
    log = harness.read_state(tmp_path / "a", "scen", "expert")["meta"]["log"]
    assert len(log) == 3 and sorted(p.name for p in (tmp_path / "a" / "experts").iterdir())[-1] == "expert_00003.safetensors"
    assert not list(tmp_path.rglob("*.tmp"))


def test_own_negatives_keep_every_neuron_off_them_and_survive_save_load(tmp_path):
    """own_neg: prompts made from an edit (here its prompt cut short, as a passage's earlier
    sentence) are negatives of its neuron and of every later one; without them the cut prompt
    reaches the edit's expert."""
    ids, ts = EDITS[0]
    cut = ids[:3]
    feats = lambda ed, qs: ed.prompt_features(qs)
    plain = make_editor()
    plain.edit_ids(ids, ts)
    assert plain.router.pick(feats(plain, [ids[:ts], cut])).tolist() == [0, 0]     # the cut prompt bleeds
    ed = make_editor()
    rec = ed.edit_ids(ids, ts, negatives=[cut])
    assert rec["own_negatives"] == 1 and len(ed.U_own) == 1
    assert ed.router.pick(feats(ed, [ids[:ts], cut])).tolist() == [0, -1]
    ed.edit_ids(*EDITS[1])                                              # a later neuron keeps off it too
    assert ed.router.pick(feats(ed, [ids[:ts], EDITS[1][0][:5], cut])).tolist() == [0, 1, -1]
    ed.save(tmp_path)
    again = scen.Editor.load(tmp_path, tiny_model(0))
    assert torch.equal(torch.stack(again.U_own), torch.stack(ed.U_own))
    assert torch.equal(again.negatives(exclude=0), ed.negatives(exclude=0))


def test_compact_expert_is_small_and_routed_inference_equals_the_dense_expert():
    ed = make_editor(expert="lowrank", expert_rank=2)
    ids, ts = EDITS[0]
    ed.edit_ids(ids, ts)
    e, W0 = ed.router.experts[0], ed.base.weight
    D, F_ = W0.shape
    assert isinstance(e, scen.LowRank) and e.A.shape == (2, F_) and e.B.shape == (D, 2)
    assert ed.expert_bytes() == 2 * (D + F_) * 4                        # (D + F) r floats, not D F
    assert (e.B @ e.A).abs().max() > 0                                    # it changed something
    u = torch.randn(3, 5, F_)
    ed.router.route_at(torch.tensor([4, 4, 4]), force=torch.tensor([0, -1, 0]))
    got = ed.router(u)
    dense = torch.nn.functional.linear(u, W0 + e.B @ e.A)                # the explicit (D, F) expert
    assert torch.allclose(got[[0, 2]], dense[[0, 2]], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], ed.base(u)[1])              # unrouted row: the original in the same batch, exactly
    # the same edit with a full expert gives the same answer
    full = make_editor(expert="full")
    full.edit_ids(ids, ts)
    assert full.generate_ids([ids[:ts]], 6, eos_ids=[2]) == ed.generate_ids([ids[:ts]], 6, eos_ids=[2])


def test_restore_gives_the_unedited_logits_bit_for_bit():
    ref = tiny_model(0)
    for method in ("scen", "ft"):
        ed = make_editor(method=method)
        x = torch.tensor([EDITS[0][0][:5], [1, 70, 71, 72, 73]])
        for ids, ts in EDITS[:2]:
            ed.edit_ids(ids, ts)
        with torch.no_grad():
            ed.prepare(x, None, torch.tensor([4, 4]))
            assert not torch.equal(ed.model(x), ref(x))
            ed.restore()
            assert torch.equal(ed.model(x), ref(x)) and ed.log == []
        ed.edit_ids(*EDITS[0])                                           # edits again after restore
        assert ed.generate_ids([EDITS[0][0][:5]], 6, eos_ids=[2])[0] == EDITS[0][0][5:-1]


def test_ft_save_load(tmp_path):
    ed = make_editor(method="ft")
    ed.edit_ids(*EDITS[0])
    ed.save(tmp_path)
    back = scen.Editor.load(tmp_path, tiny_model(0))
    assert torch.equal(back.ft.weight, ed.ft.weight) and not torch.equal(back.ft.weight, back.base.weight)


def test_bad_settings():
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        make_editor(layer=5)
    with pytest.raises(ValueError, match="theta"):
        make_editor(theta=1.5)


def test_cli_bad_inputs_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    ck = tiny_checkpoint(tmp_path / "ckpt")
    loads = []
    monkeypatch.setattr(llama, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "target_new": "A"}\n{"prompt": "Q2?"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Q?", "target_new": "A"}\n')
    base = ["--ckpt", str(ck), "--edits", str(good)]
    for argv, msg in [(["--ckpt", str(ck), "--edits", str(bad)], r"bad.jsonl:2: target_new"),
                      (["--ckpt", str(ck), "--edits", str(tmp_path / "missing.json")], "not found|no such file|cannot read"),
                      (["--ckpt", str(tmp_path / "nowhere"), "--edits", str(good)], "nowhere"),
                      (base + ["--theta", "2"], r"theta 2.0: must be in \(0, 1\)"),
                      (base + ["--layer", "3"], "layer 3 is out of range"),
                      (base + ["--unrelated", str(bad)], r"bad.jsonl:2"),
                      (base + ["--n-unrelated", "5"], "--n-unrelated 5: needs --unrelated"),
                      (base + ["--own-neg", "relations"], r"good.jsonl:1: subject"),   # it asks about the subject
                      (base + ["--loc", str(tmp_path / "missing.json")], "missing.json"),
                      (base + ["--template", "chatml"], "--template chatml: template chatml: this tokenizer's chat format is 'none'"),
                      (["--load-edits", str(tmp_path)], "needs --prompt"),
                      (["--load-edits", str(tmp_path), "--prompt", "hi"], "no run.json")]:
        with pytest.raises(SystemExit, match=msg):
            scen.main(argv)
    assert loads == []


def test_pool_mean_ignores_padding_and_target():
    u = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    got = scen.pool(u, torch.tensor([4, 2]), mask, "mean")
    assert torch.allclose(got[0], u[0, 2:5].mean(0)) and torch.allclose(got[1], u[1, :3].mean(0))
    assert torch.equal(scen.pool(u, torch.tensor([4, 2]), mask, "last"), torch.stack([u[0, 4], u[1, 2]]))


def test_cli_settings_paper_and_code_loss():
    ap = harness.parser(scen.Editor)
    s = harness.settings_from(scen.Editor, ap.parse_args(["--paper"]))
    assert (s.expert_lr, s.expert_steps, s.expert_until, s.neuron_lr, s.neuron_steps, s.features, s.pool,
            s.bias, s.unrelated_neg, s.retrain, s.theta) == (1e-4, 10, False, 1e-4, 20, "raw", "last",
                                                            False, False, False, 0.65)
    s = harness.settings_from(scen.Editor, ap.parse_args(["--paper", "--loss", "code", "--bias", "true"]))
    assert s.loss == "code" and s.bias and s.expert_lr == 1e-4
    assert harness.settings_from(scen.Editor, ap.parse_args([])) == scen.Settings()
    assert "--neuron-lr" in ap.format_help() and "neuron Adam lr" in ap.format_help()   # help from the field


def test_default_layer_scales_with_depth():
    assert scen.default_layer(32, 20 / 32) == 20 and scen.default_layer(30, 20 / 32) == 19   # the paper's
    assert scen.default_layer(30) == 24 and scen.default_layer(6) == 4 and scen.default_layer(2) == 1
    assert scen.Editor(tiny_model(0), None, scen.Settings(expert_lr=1e-2), unrelated=UNREL).s.layer == 1


def test_cli_end_to_end_unrelated_excludes_edit_prompts_and_load_edits(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ckpt")
    edits = [{"prompt": f"Where does {s} live?", "target_new": t} for s, t in [("Kim", "Oslo"), ("Ann", "Lima")]]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in edits) + "\n")
    others = [{"prompt": q, "target_new": "x"} for q in ("What is red?", "Who is Bo?")]
    (tmp_path / "unrel.jsonl").write_text("\n".join(json.dumps(r) for r in others + edits) + "\n")
    out = tmp_path / "out"
    args = ["--ckpt", str(ck), "--edits", str(tmp_path / "edits.jsonl"), "--unrelated", str(tmp_path / "unrel.jsonl"),
            "--template", "raw", "--layer", "1", "--expert-lr", "3e-2", "--expert-steps", "150", "--expert-nll", "1",
            "--neuron-steps", "300", "--out", str(out)]
    scen.main(args)
    saved = harness.read_state(out, "scen", "expert")["meta"]
    assert saved["unrelated"] == ["What is red?", "Who is Bo?"]             # an edit's own prompt is no negative
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["scen"]["Reliability (gen)"]["value"] == 100.0 and res["results"]["unedited"]["Reliability (gen)"]["value"] == 0.0
    capsys.readouterr()
    scen.main(["--load-edits", str(out), "--prompt", "Where does Kim live?", "--max-new-tokens", "8"])
    got = capsys.readouterr()
    assert got.out.startswith("Oslo") and "routed to expert 1" in got.err
