"""The one Editor API and the run harness: save/load/restore for every method, the --out and
--resume rules, the README's Python API snippet, the llama3 template."""
import functools
import json
import re
import importlib.util

import pytest
import torch

from conftest import ROOT, tiny_checkpoint

import data
import eval as ev
import harness
import llama
import nse
import scen

SCEN_TINY = dict(layer=1, expert_lr=3e-2, expert_steps=150, expert_nll=1.0, neuron_steps=300)
NSE_TINY = dict(v_steps=8, stats_tokens=1000)
PROMPTS = ["Where does Kim Lo live?", "Where does Ann Pi live?"]
TARGETS, SUBJECTS = ["Oslo", "Lima"], ["Kim Lo", "Ann Pi"]
ASK = PROMPTS + ["What is red?"]
UNRELATED = ["What is red?", "Who wrote Hamlet?", "How many legs does a spider have?", "Which planet is closest to the sun?"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("harness")
    tiny_checkpoint(r / "ckpt")
    (r / "corpus.txt").write_text("the cat sat on the mat. a dog ran in the park.\n" * 60)
    recs = [{"prompt": p, "target_new": t, "subject": s} for p, t, s in zip(PROMPTS, TARGETS, SUBJECTS)]
    (r / "edits.jsonl").write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    (r / "unrelated.jsonl").write_text("\n".join(json.dumps({"prompt": q, "target_new": "x"}) for q in UNRELATED) + "\n")
    return r


def make(method, root):
    model, tok = llama.load(root / "ckpt")
    if method == "scen":
        return scen.Editor(model, tok, scen.Settings(**SCEN_TINY), template="raw", unrelated=UNRELATED)
    return nse.Editor(model, tok, nse.Settings(**NSE_TINY), stats_text=root / "corpus.txt", cache_dir=root / "cache")


@pytest.mark.parametrize("method", ["scen", "nse"])
def test_save_load_generate_equals_the_editor_in_memory(method, root, tmp_path):
    ed = make(method, root)
    before = ed.generate(ASK, 8)
    rows = ed.edit(prompts=PROMPTS, target_new=TARGETS, subject=SUBJECTS)
    assert ed.n_edits == 2 and len(rows) == (2 if method == "scen" else 1)      # one row per edit / batch
    after = ed.generate(ASK, 8)
    assert after != before                                                     # the edits did something
    if method == "scen":
        assert after[:2] == TARGETS and after[2] == before[2]
    ed.save(tmp_path / "out")
    model, tok = llama.load(root / "ckpt")
    back = type(ed).load(tmp_path / "out", model, tok)
    assert back.generate(ASK, 8) == after and back.n_edits == 2
    with pytest.raises(ValueError, match="empty target"):
        back.edit(prompts=["Q?"], target_new=[" "], subject=["Q"])


@pytest.mark.parametrize("method", ["scen", "nse"])
def test_restore_gives_the_unedited_logits_bit_for_bit(method, root):
    ed = make(method, root)
    x = torch.tensor([ed.tokenizer.encode(PROMPTS[0]), ed.tokenizer.encode(PROMPTS[1])])
    em = ed.eval_model()
    prompt_end = torch.tensor([x.shape[1] - 1] * 2)
    ref = em.logits(x, torch.ones_like(x), prompt_end)
    ed.edit(prompts=PROMPTS, target_new=TARGETS, subject=SUBJECTS)
    assert not torch.equal(em.logits(x, torch.ones_like(x), prompt_end), ref)
    ed.restore()
    assert torch.equal(ed.eval_model().logits(x, torch.ones_like(x), prompt_end), ref) and ed.n_edits == 0


def test_nse_load_refuses_a_model_that_is_not_the_unedited_one(root, tmp_path):
    ed = make("nse", root)
    ed.edit(prompts=PROMPTS, target_new=TARGETS, subject=SUBJECTS)
    ed.save(tmp_path)
    with pytest.raises(nse.EditError, match="not the one these edits started from"):
        nse.Editor.load(tmp_path, ed.model, ed.tokenizer)                      # already edited


def cli(root, out, *extra, template="raw"):
    return ["--ckpt", str(root / "ckpt"), "--edits", str(root / "edits.jsonl"), "--template", template,
            "--unrelated", str(root / "unrelated.jsonl"),
            "--layer", "1", "--expert-lr", "3e-2", "--expert-steps", "150", "--expert-nll", "1", "--out", str(out), *extra]


def test_out_and_resume_rules_refuse_naming_the_reason(root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    scen.main(cli(root, out, "--no-baseline"))
    assert (out / "run.json").exists() and (out / "results.json").exists()
    loads = []
    real = llama.load_model
    monkeypatch.setattr(llama, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    for extra, msg in [((), "already holds a run: pass --resume"),
                       (("--resume", "--theta", "0.7"), "--resume: setting theta was 0.65, now 0.7"),
                       (("--resume", "--n", "1"), "--resume: records was"),
                       (("--resume", "llama2"), "--resume: template was 'raw', now 'llama2'")]:
        args = cli(root, out, "--no-baseline", *extra) if "llama2" not in extra else \
            cli(root, out, "--no-baseline", "--resume", template="llama2")
        with pytest.raises(SystemExit, match=re.escape(msg)):
            scen.main(args)
    with pytest.raises(SystemExit, match="holds no run to resume"):
        scen.main(cli(root, tmp_path / "empty", "--resume"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(SystemExit, match="is not empty and holds no run"):
        scen.main(cli(root, tmp_path / "junk"))
    with pytest.raises(SystemExit, match="the run is scen, not nse"):
        nse.main(["--load-edits", str(out), "--prompt", "hi"])
    assert loads == []                                   # every refusal came before the model was loaded
    rep = scen.main(cli(root, out, "--no-baseline", "--resume"))           # a finished run: nothing to redo
    assert rep.sections["scen"]["Reliability (gen)"]["value"] == 100.0 and len(loads) == 1


def test_progress_line_has_rate_and_eta():
    line = harness.progress(3, 10, 6.0, 0, {"note": "expert 4 steps"})
    assert re.match(r"edit 3/10  0\.5\d\d edits/s  ETA 0\.2 min  \| expert 4 steps", line), line


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python-api snippet"
    return m.group(1)


def test_readme_python_api_snippet_runs_for_scen_and_nse(root, tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scen, "Settings", functools.partial(scen.Settings, **SCEN_TINY))
    monkeypatch.setattr(nse, "Settings", functools.partial(nse.Settings, **NSE_TINY))
    monkeypatch.setattr(harness, "CACHE_DIR", str(root / "cache"))
    code = code.replace('"path/to/checkpoint"', repr(str(root / "ckpt")))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == printed[1] == "['Oslo']"                 # edited, then reloaded
    nse_code = code.replace("ed = scen.Editor(model, tok)", 'ed = nse.Editor(model, tok, stats_text="wiki.txt")')
    nse_code = nse_code.replace("scen.Editor.load", "nse.Editor.load")
    assert sum("nse.Editor" in line.split("#")[0] for line in nse_code.splitlines()) == 2
    (tmp_path / "wiki.txt").write_text((root / "corpus.txt").read_text())
    exec(compile(nse_code, "README.md (nse)", "exec"), {})
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]    # not the C0 line
    assert printed[0] == printed[1]                                # reloaded edits answer the same


LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                   "<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_template_ids_equal_the_reference_chat_template(tmp_path):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        pytest.skip("transformers/tokenizers not installed (reference only)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Who wrote Dune? Frank Herbert wrote Dune in 1965.", "user assistant system"] * 20,
                           trainers.BpeTrainer(vocab_size=330, special_tokens=specials,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours = llama.load_tokenizer(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    template = data.template_for(ours, "auto")
    assert template.kind == "llama3"
    for q in ["Who wrote Dune?", "  Who wrote Dune in 1965?  "]:
        want = ref.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert data.encode_prompt(ours, template, q) == list(want)
        e = data.encode_prompt_target(ours, template, q, "Frank Herbert")
        assert e.ids[-1] == ours.token_to_id("<|eot_id|>") and ours.decode(e.ids[e.target_start:e.target_end]) == "Frank Herbert"
    assert template.stop_strings[0] == "<|eot_id|>"


def test_load_edits_answers_with_the_saved_edits_for_nse(root, tmp_path, capsys):
    out = tmp_path / "run"
    nse.main(["--ckpt", str(root / "ckpt"), "--edits", str(root / "edits.jsonl"), "--stats-text",
              str(root / "corpus.txt"), "--cache-dir", str(root / "cache"), "--stats-tokens", "1000",
              "--v-steps", "8", "--no-baseline", "--no-fluency", "--out", str(out)])
    model, tok = llama.load(root / "ckpt")
    unedited = nse.Editor(model, tok, nse.Settings(**NSE_TINY), stats_text=root / "corpus.txt").generate(PROMPTS, 8)
    ed = nse.Editor.load(out, model, tok)
    want = ed.generate(PROMPTS, 8)
    assert want != unedited
    alone = [ed.generate([p], 8)[0] for p in PROMPTS]          # --load-edits asks one prompt: batch 1 too
    capsys.readouterr()
    for p, w in zip(PROMPTS, alone):
        assert nse.main(["--load-edits", str(out), "--prompt", p, "--max-new-tokens", "8"]) == w
        assert capsys.readouterr().out.strip() == w.strip()
    exported, _ = llama.load(out / "model")                   # the plain checkpoint answers the same
    assert ev.generate_answers(exported, tok, data.Template("raw"), PROMPTS, max_new_tokens=8) == want


def test_nse_exports_in_the_checkpoints_dtype_and_reports_that_checkpoints_figures(root, tmp_path):
    ck = tmp_path / "ckpt16"
    tiny_checkpoint(ck)
    llama.Llama.from_pretrained(ck).save_pretrained(ck, dtype=torch.bfloat16)       # a bf16 checkpoint
    out = tmp_path / "run"
    rep = nse.main(["--ckpt", str(ck), "--edits", str(root / "edits.jsonl"), "--stats-text", str(root / "corpus.txt"),
                    "--cache-dir", str(tmp_path / "cache"), "--stats-tokens", "1000", "--v-steps", "8",
                    "--no-baseline", "--out", str(out)])
    assert json.loads((out / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported, tok = llama.load(out / "model")                                          # float32 compute
    records = data.load_edits(root / "edits.jsonl")
    figs = ev.evaluate_qa(ev.LlamaEvalModel(exported, tok, data.Template("raw")), tok, data.Template("raw"), records)
    assert {k: v["value"] for k, v in figs.items()} == {k: v["value"] for k, v in rep.sections["nse"].items()
                                                         if not k.startswith("s/edit")}
    assert any("weights in torch.bfloat16" in n for n in rep.notes)
    # the model in memory is the exported one, bit for bit (rounded before it is evaluated)
    model, tok = llama.load(ck)
    ed = nse.Editor(model, tok, nse.Settings(**NSE_TINY), stats_text=root / "corpus.txt", cache_dir=tmp_path / "cache")
    ed.edit(records)
    assert ed.export(tmp_path / "exp") == torch.bfloat16
    back, _ = llama.load(tmp_path / "exp")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
