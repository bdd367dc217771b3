"""train_sft.py: schedule, data order, masked loss, memorisation, checkpoint/resume equivalence,
the D_edit/D_loc split, the demo cache and the CLI."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
import harness  # noqa: E402
import llama  # noqa: E402
import train_sft as ts  # noqa: E402
from data import EditRecord, Template  # noqa: E402
from test_eval import CharTok, V  # noqa: E402


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, bos_token_id=1,
               eos_token_id=[2])
    cfg.update(kw)
    return llama.Llama(llama.LlamaConfig(**cfg)).reset_parameters(std=0.1)


RECS = [EditRecord("where is ada", "paris"), EditRecord("where is bob", "rome"),
        EditRecord("who is eve", "a spy")]


def test_lr_schedule_by_hand():
    cfg = ts.TrainConfig(lr=1.0, warmup=2, schedule="cosine", min_lr_ratio=0.0)
    got = [ts.lr_at(s, 6, cfg) for s in range(6)]
    assert got[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert got[4] == pytest.approx(0.5)                               # p = 2/4
    assert got[5] == pytest.approx((1 + math.cos(0.75 * math.pi)) / 2)
    lin = replace(cfg, schedule="linear", min_lr_ratio=0.2)
    assert ts.lr_at(4, 6, lin) == pytest.approx(0.2 + 0.8 * 0.5)
    assert ts.lr_at(5, 6, replace(cfg, schedule="constant")) == 1.0
    assert ts.lr_at(2, 6, replace(cfg, warmup=0.5)) == pytest.approx(1.0)   # W = 3 steps
    with pytest.raises(ValueError, match="schedule"):
        ts.lr_at(5, 6, replace(cfg, schedule="step"))


def test_plan_steps_covers_each_epoch_and_is_deterministic():
    cfg = ts.TrainConfig(epochs=2, batch_size=3, grad_accum=2, seed=5)
    plan = ts.plan_steps(10, cfg)
    assert len(plan) == 4                                             # 4 micro-batches / 2 per epoch
    assert [len(mb) for mb in plan[0] + plan[1]] == [3, 3, 3, 1]
    for ep in (plan[:2], plan[2:]):
        assert sorted(i for step in ep for mb in step for i in mb) == list(range(10))
    assert plan == ts.plan_steps(10, cfg)
    assert plan[:2] != plan[2:]


def test_sft_loss_counts_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    loss, n = ts.sft_loss(logits, labels)
    lp = torch.log_softmax(logits, -1)
    hand = -(lp[0, 1, 3] + lp[0, 2, 4] + lp[1, 0, 1] + lp[1, 1, 2] + lp[1, 2, 6] + lp[1, 3, 0])
    assert n == 6 and loss.item() == pytest.approx(hand.item(), rel=1e-6)
    moved = logits.clone()
    moved[0, 0] += 5.0                                                # a prompt position: no effect
    assert ts.sft_loss(moved, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_with_head_on_labels_only_equals_full_loss():
    model = tiny(3)
    batch = data.collate([data.Encoded([1, 5, 6, 7, 8], 3, 5, "joint"), data.Encoded([1, 9, 4], 1, 3, "joint")], 0)
    full, n = ts.sft_loss(model(batch.tokens, attention_mask=batch.attention_mask), batch.labels)
    part, n2 = ts.sft_loss_on_labels(model, batch.tokens, batch.attention_mask, batch.labels)
    assert n == n2 == 4 and part.item() == pytest.approx(full.item(), rel=1e-5)


def test_train_memorises_and_split(tmp_path):
    tok, model = CharTok(), tiny()
    ex = ts.encode_records(tok, Template("raw"), RECS, add_eos=True)
    assert ex[0].ids[-1] == 2 and ex[0].ids[ex[0].target_start] == tok.encode(" ", bos=False)[0]
    cfg = ts.TrainConfig(epochs=30, batch_size=3, lr=2e-2, warmup=5, log_every=1e9)
    stats = ts.train(model, ex, cfg, pad_id=0, log=lambda s: None)
    assert stats["steps"] == 30 and stats["final_loss"] < 0.05 and stats["tokens_per_s"] > 0
    acc, res = ts.answer_accuracy(model, tok, Template("raw"), RECS)
    assert acc == 100.0 and [t for t, _ in res] == ["paris", "rome", "a spy"]
    tests = RECS + [EditRecord("where is ada", "lima")]
    d_edit, d_loc, acc = ts.split_edit_loc(model, tok, Template("raw"), tests)
    assert [r.target_new for r in d_edit] == ["lima"] and len(d_loc) == 3 and acc == 75.0
    assert d_edit[0].meta["sft_prediction"] == "paris"


def test_resume_reproduces_uninterrupted_run(tmp_path):
    tok = CharTok()
    ex = ts.encode_records(tok, Template("raw"), RECS * 2, add_eos=True)
    cfg = ts.TrainConfig(epochs=3, batch_size=2, grad_accum=2, lr=5e-3, warmup=1, save_every=2, log_every=0)
    ref = tiny()
    ts.train(ref, ex, cfg, pad_id=0, log=lambda s: None)

    class Killed(Exception):
        pass

    def killer(line):
        if line.startswith("step 3/"):
            raise Killed

    m = tiny()
    with pytest.raises(Killed):
        ts.train(m, ex, cfg, pad_id=0, out_dir=tmp_path, log=killer)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest == {"step": 2, "dir": "step-0000002"}
    m2 = tiny(seed=123)                                     # other weights: resume must overwrite them
    logs = []
    stats = ts.train(m2, ex, cfg, pad_id=0, out_dir=tmp_path, resume=True, log=logs.append)
    assert "continuing at step 2/6" in logs[0] and stats["steps_run"] == 4
    for (n, a), b in zip(ref.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert not (tmp_path / "checkpoints").exists()           # finished: checkpoints cleaned up
    assert json.loads((tmp_path / "trainer_state.json").read_text())["done"] is True
    final = llama.Llama.from_pretrained(tmp_path)            # the HF-layout final save
    assert torch.equal(final.lm_head.weight, m2.lm_head.weight)
    m3 = tiny(seed=7)
    again = ts.train(m3, ex, cfg, pad_id=0, out_dir=tmp_path, resume=True, log=lambda s: None)
    assert again["steps_run"] == 0 and torch.equal(m3.lm_head.weight, m2.lm_head.weight)
    with pytest.raises(ValueError, match="other data or settings"):
        ts.train(tiny(), ex, replace(cfg, lr=1e-3), pad_id=0, out_dir=tmp_path, resume=True)


def test_bfloat16_autocast_step_runs():
    tok = CharTok()
    ex = ts.encode_records(tok, Template("raw"), RECS, add_eos=True)
    stats = ts.train(tiny(), ex, ts.TrainConfig(epochs=1, batch_size=3, dtype="bfloat16", warmup=1),
                     pad_id=0, log=lambda s: None)
    assert math.isfinite(stats["final_loss"])
    with pytest.raises(ValueError, match="dtype"):
        ts.train(tiny(), ex, ts.TrainConfig(dtype="int8"), pad_id=0)


def test_demo_cache_key_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "DEMO_MODEL", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(ts, "DEMO_TRAIN", replace(ts.DEMO_TRAIN, epochs=1, warmup=2))
    monkeypatch.setattr(ts, "answer_accuracy", lambda *a, **k: (0.0, []))   # keep the test short
    full_world = data.demo_world
    small = lambda seed, **kw: full_world(seed, n_people=6, n_countries=2, cities_per_country=2, n_orgs=2, n_edits=4, **kw)
    monkeypatch.setattr(data, "demo_world", small)
    paths = ts.ensure_demo(tmp_path, log=lambda s: None)
    for k in ("ckpt", "edits_qa", "edits_cf", "loc_qa", "unrelated_qa", "train", "corpus", "info"):
        assert Path(paths[k]).exists(), k
    assert [p.name for p in tmp_path.iterdir()] == [paths["dir"].name]      # no temp folder left
    qa = data.load_edits(paths["edits_qa"])
    cf = data.load_edits(paths["edits_cf"], require_subject=True)
    assert len(qa) == len(cf) == 4 and all(r.target_true for r in cf)
    tok = llama.load_tokenizer(paths["ckpt"])
    assert tok.chat_format == "llama2" and data.template_for(tok).kind == "llama2"
    assert "[INST]" in [tok.id_to_piece(i) for i in tok.encode("[INST]", bos=False)]
    model = llama.Llama.from_pretrained(paths["ckpt"])
    assert model.config.num_hidden_layers == 2
    # found again without training
    monkeypatch.setattr(ts, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert ts.ensure_demo(tmp_path, log=lambda s: None) == paths
    # a changed generator or setting is a new key, never the stale folder
    monkeypatch.setattr(data, "DEMO_VERSION", "changed")
    assert ts._demo_key(data.demo_world(0)) not in str(paths["dir"])
    # the NSE demo: its own folder; the same facts and edits, completions that end with the subject
    monkeypatch.setattr(ts, "DEMO_MODEL_NSE", dict(ts.DEMO_MODEL, intermediate_size=96))
    monkeypatch.setattr(ts, "train", lambda *a, **k: {"seconds": 0.0})
    nse_paths = ts.ensure_demo(tmp_path, log=lambda s: None, kind="nse")
    assert nse_paths["dir"] != paths["dir"] and Path(nse_paths["info"]).exists()
    cf2 = data.load_edits(nse_paths["edits_cf"], require_subject=True)
    assert [r.subject for r in cf2] == [r.subject for r in cf] and [r.target_new for r in cf2] == [r.target_new for r in cf]
    assert all(r.prompt.endswith(r.subject) and r.rephrases[0].endswith(r.subject) for r in cf2)
    assert not any(r.prompt.endswith(r.subject) for r in cf)
    assert llama.Llama.from_pretrained(nse_paths["ckpt"]).config.intermediate_size == 96
    with pytest.raises(ValueError, match="demo kind"):
        ts.demo_spec("memit")


def test_cli_init_tiny_split_and_errors(tmp_path, capsys):
    from test_data import make_sp_tokenizer
    make_sp_tokenizer(tmp_path / "tok")
    train = tmp_path / "train.jsonl"
    data.save_jsonl([EditRecord("Where was Ada born?", "Paris"), EditRecord("Who does Bob work for?", "Acme Labs")],
                    train)
    test = tmp_path / "test.jsonl"
    data.save_jsonl([EditRecord("Where was Ada born?", "Paris"), EditRecord("Where was Ada born?", "Acme Labs")],
                    test)
    out = tmp_path / "out"
    tiny_cfg = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2})
    summary = ts.main(["--init", "tiny", "--tokenizer", str(tmp_path / "tok"), "--tiny-config", tiny_cfg,
                       "--data", str(train), "--out", str(out), "--epochs", "40", "--batch-size", "2",
                       "--lr", "1e-2", "--split", str(test), "--eval-train", "2"])
    assert summary["template"] == "llama2" and summary["train_accuracy"]["value"] == 100.0
    assert summary["d_edit"] == 1 and summary["d_loc"] == 1
    assert data.load_edits(out / "d_edit.jsonl")[0].target_new == "Acme Labs"
    assert (out / "config.json").exists() and (out / "tokenizer.model").exists()
    assert "tok/s" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('[{"src": "q"}]')
    with pytest.raises(SystemExit, match=r"bad\.json:1: answers: missing field"):
        ts.main(["--init", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit):
        ts.main(["--data", str(train), "--out", str(out)])             # neither --ckpt nor --init


def test_both_no_argument_demos_run_end_to_end(tmp_path, monkeypatch, capsys):
    """`python scen.py` and `python nse.py` with no arguments, on a small world and model (the real
    demo trains for about a minute): each prints its table of figures."""
    import nse
    import scen
    monkeypatch.setenv("EDIT_DEMO_CACHE", str(tmp_path / "demo"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(harness, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ts, "DEMO_MODEL", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(ts, "DEMO_TRAIN", replace(ts.DEMO_TRAIN, epochs=2, warmup=2))
    full_world = data.demo_world
    monkeypatch.setattr(ts, "DEMO_MODEL_NSE", dict(ts.DEMO_MODEL, intermediate_size=96))
    monkeypatch.setattr(data, "demo_world", lambda seed, **kw: full_world(seed, n_people=8, n_countries=2, cities_per_country=2,
                                                                          n_orgs=2, n_edits=3, **kw))
    monkeypatch.setattr(scen, "DEMO", replace(scen.DEMO, runs=[r + ["--expert-steps", "5", "--neuron-steps", "50"]
                                                               for r in scen.DEMO.runs]))
    figs = scen.main([]).sections
    assert set(figs) == {"unedited", "ft", "scen"}
    out = capsys.readouterr().out
    assert "Reliability (gen)" in out and "Locality (gen)" in out and "ft" in out and "scen" in out
    rep = nse.main([])
    assert {"unedited", "nse"} <= set(rep.sections) and "Efficacy" in rep.sections["nse"]
    assert "Specificity" in capsys.readouterr().out


def _small_demo(monkeypatch, tmp_path):
    """A small demo world and model (seconds to train), with the repository's demo/ moved into tmp_path."""
    monkeypatch.setattr(ts, "DEMO_MODEL", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(ts, "DEMO_MODEL_NSE", dict(ts.DEMO_MODEL, intermediate_size=96))
    monkeypatch.setattr(ts, "DEMO_TRAIN", replace(ts.DEMO_TRAIN, epochs=1, warmup=2))
    monkeypatch.setattr(ts, "DEMO_TRAIN_NSE", {"epochs": 2})
    monkeypatch.setattr(ts, "answer_accuracy", lambda *a, **k: (0.0, []))   # keep the test short
    full_world = data.demo_world
    monkeypatch.setattr(data, "demo_world", lambda seed, **kw: full_world(
        seed, n_people=6, n_countries=2, cities_per_country=2, n_orgs=2, n_edits=4, **kw))
    monkeypatch.setattr(ts, "SHIPPED_DEMO_ROOT", tmp_path / "repo" / "demo")
    return tmp_path / "repo" / "demo"


def _no_training(monkeypatch):
    monkeypatch.setattr(ts, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))


def test_shipped_demo_is_used_without_training(tmp_path, monkeypatch, capsys):
    shipped = _small_demo(monkeypatch, tmp_path)
    ts.main(["--demo", "--rebuild-demo"])                     # both kinds, into the repository's demo/
    assert "--rebuild-demo" in ts.__doc__
    assert sorted(p.name for p in shipped.iterdir()) == ["nse", "qa"]  # no temporary folder left
    for kind in ("qa", "nse"):
        paths = ts.demo_paths(shipped / kind)
        for f in ts.DEMO_CKPT_FILES:
            assert (paths["ckpt"] / f).exists(), f
        info = json.loads(paths["info"].read_text())
        assert info["kind"] == kind and info["dtype"] == "bfloat16" and info["threads"] == 1
        assert info["train_config"]["epochs"] == (2 if kind == "nse" else 1)    # DEMO_TRAIN_NSE
        header, _ = llama.read_safetensors_header(paths["ckpt"] / "model.safetensors")
        assert {h["dtype"] for h in header.values()} == {"BF16"}      # half the bytes of float32
        model = llama.load_model(paths["ckpt"])                        # loads into float32 on a CPU
        assert model.dtype == torch.float32
    _no_training(monkeypatch)
    cache = tmp_path / "cache"
    for kind in ("qa", "nse"):
        paths = ts.ensure_demo(cache, log=lambda s: None, kind=kind)
        assert paths == ts.demo_paths(shipped / kind)
    assert not cache.exists()                                  # nothing trained, nothing cached
    assert ts.main(["--demo", "--cache-dir", str(cache)])["dir"] == shipped / "qa"
    assert "(shipped)" in capsys.readouterr().out


def test_stale_shipped_demo_is_trained_into_the_cache_not_the_repository(tmp_path, monkeypatch):
    shipped = _small_demo(monkeypatch, tmp_path)
    ts.rebuild_shipped_demo("qa", log=lambda s: None)
    before = {p: p.read_bytes() for p in (shipped / "qa").rglob("*") if p.is_file()}
    shipped_cfg = ts.DEMO_TRAIN
    monkeypatch.setattr(ts, "DEMO_TRAIN", replace(shipped_cfg, lr=1e-3))    # another setting: another key
    logs, cache = [], tmp_path / "cache"
    paths = ts.ensure_demo(cache, log=logs.append)
    assert paths["dir"].parent == cache and paths["dir"].name == f"demo-{json.loads(paths['info'].read_text())['key']}"
    assert any("--rebuild-demo" in line for line in logs)      # says why it trains
    assert {p: p.read_bytes() for p in (shipped / "qa").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in shipped.iterdir()) == ["qa"]
    # an incomplete shipped folder (a missing file) is not used either
    monkeypatch.setattr(ts, "DEMO_TRAIN", shipped_cfg)
    assert ts.ensure_demo(cache, log=lambda s: None) == ts.demo_paths(shipped / "qa")
    (shipped / "qa" / "corpus.txt").unlink()
    assert ts.ensure_demo(cache, log=lambda s: None)["dir"].parent == cache
    # force trains into the cache even when the shipped demo is current
    ts.rebuild_shipped_demo("qa", log=lambda s: None)
    forced = ts.ensure_demo(cache, force=True, log=lambda s: None)
    assert forced["dir"].parent == cache


def test_demo_build_is_deterministic_at_one_thread(tmp_path, monkeypatch):
    _small_demo(monkeypatch, tmp_path)
    a = ts.ensure_demo(tmp_path / "a", log=lambda s: None, kind="nse")
    b = ts.ensure_demo(tmp_path / "b", log=lambda s: None, kind="nse")
    for f in ("ckpt/model.safetensors", "ckpt/tokenizer.model", "edits_cf.jsonl", "corpus.txt"):
        assert (a["dir"] / f).read_bytes() == (b["dir"] / f).read_bytes(), f


def test_repository_ships_current_demos(monkeypatch):
    """demo/qa and demo/nse hold the demos of the current world and settings: `python scen.py` and
    `python nse.py` use them as they are (else: python train_sft.py --demo --rebuild-demo)."""
    _no_training(monkeypatch)
    for kind in ts.DEMO_KINDS:
        world, sizes = ts.demo_spec(kind)
        key = ts._demo_key(world, sizes, ts.demo_train_config(kind))
        assert ts.demo_is_current(ts.shipped_demo_dir(kind), key), (
            f"demo/{kind} is stale: run python train_sft.py --demo --rebuild-demo")
        assert ts.ensure_demo(log=lambda s: None, kind=kind)["dir"] == ts.shipped_demo_dir(kind)
        info = json.loads((ts.shipped_demo_dir(kind) / "demo.json").read_text())
        digest = __import__("hashlib").sha256((ts.shipped_demo_dir(kind) / "ckpt" / "model.safetensors")
                                              .read_bytes()).hexdigest()
        assert info["model_sha256"] == digest
