"""Bad input tried on purpose, at the entry points (the method CLIs, eval.py, the Python Editor):
each case has one decided outcome, a one-line error before work and before anything is written to
--out, or a labelled repair. The file-format battery is tests/test_data_published.py, the
checkpoint battery tests/test_checkpoint_errors.py, the flag bounds tests/test_errors.py."""
import json
import os
import shutil
import subprocess
import sys
import time
import unicodedata

import pytest
import torch

from conftest import ROOT, edit_files

import harness
import llama
import nse
import scen

NSE_FAST = ["--layers", "0,1", "--v-steps", "2", "--batch-size", "2", "--stats-tokens", "300", "--no-fluency",
            "--eval-batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return edit_files(tmp_path_factory.mktemp("bad"))


def no_load(monkeypatch):
    monkeypatch.setattr(llama, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def nse_args(files, edits, out=None):
    return (["--ckpt", str(files / "ckpt"), "--edits", str(edits), "--stats-text", str(files / "corpus.txt"),
             "--cache-dir", str(files / "cache")] + NSE_FAST + (["--out", str(out)] if out else []))


def one_line_error(excinfo) -> str:
    text = str(excinfo.value.code)
    assert text.startswith("error: ") and "\n" not in text.strip(), text
    return text


def test_a_prompt_longer_than_the_context_is_one_line_in_seconds(files, tmp_path, monkeypatch):
    no_load(monkeypatch)
    rec = {"prompt": "Kim Lo " + "lives in a house " * 25_000 + "in", "subject": "Kim Lo", "target_new": "Oslo",
           "target_true": "Rome"}                                      # 400k characters; the context is 64 tokens
    (tmp_path / "long.jsonl").write_text(json.dumps(rec) + "\n")
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        nse.main(nse_args(files, tmp_path / "long.jsonl", tmp_path / "out"))
    assert time.perf_counter() - t < 20
    msg = one_line_error(e)
    assert "long.jsonl:1" in msg and "prompt + target_new" in msg and "context is 64" in msg
    assert not (tmp_path / "out").exists()                              # nothing written to --out


def test_too_long_optional_items_are_dropped_counted_and_the_run_goes_on(files, tmp_path, capsys):
    recs = [json.loads(l) for l in (files / "edits.jsonl").read_text().splitlines()]
    recs[0]["locality"].append(["Ed Lu " + "x" * 200 + " lives in", "Rome"])     # > 64 tokens: dropped
    recs[1]["rephrases"].append("Where " * 40 + "Ann Pi lives is")                # > 64 tokens: dropped
    (tmp_path / "e.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    nse.main(nse_args(files, tmp_path / "e.jsonl", tmp_path / "out"))
    err = capsys.readouterr().err
    assert "dropped 2 unusable optional items" in err and "e.jsonl:1" in err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["args"]["dropped_items"] == 2 and "Efficacy" in res["results"]["nse"]


def test_records_beyond_n_and_the_probe_bank_never_refuse_a_run(files, tmp_path):
    """The relation probes read the whole file; a record there that could not be edited (an empty
    target, a broken line) is skipped for probes, and --n 2 edits the two good records."""
    lines = (files / "edits.jsonl").read_text().splitlines()
    bad = json.dumps({"prompt": "Bo Ek lives in", "subject": "Bo Ek", "target_new": " ", "target_true": "Rome"})
    (tmp_path / "e.jsonl").write_text("\n".join(lines + [bad, "{not json"]) + "\n")
    rep = nse.main(nse_args(files, tmp_path / "e.jsonl", tmp_path / "out") + ["--n", "2"])
    assert rep.args["n"] == 2 and "Efficacy" in rep.sections["nse"]
    with pytest.raises(SystemExit) as e:                                  # the same record edited: refused
        nse.main(nse_args(files, tmp_path / "e.jsonl", tmp_path / "out3") + ["--n", "3"])
    assert "e.jsonl:3: target_new" in one_line_error(e)


def test_out_that_is_a_file_is_refused_before_work(files, tmp_path, monkeypatch):
    no_load(monkeypatch)
    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(SystemExit) as e:
            nse.main(nse_args(files, files / "edits.jsonl", out))
        assert f"{tmp_path / 'f'} is a file, not a folder" in one_line_error(e)
    assert (tmp_path / "f").read_text() == "mine"


def test_resume_of_a_folder_from_another_method_or_checkpoint_is_refused(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nse.main(nse_args(files, files / "edits.jsonl", out) + ["--no-baseline"])
    before = sorted(p.name for p in out.iterdir())
    no_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        scen.main(["--ckpt", str(files / "ckpt"), "--edits", str(files / "edits.jsonl"), "--out", str(out),
                   "--resume", "--unrelated", str(files / "unrelated.jsonl")])
    assert "method was 'nse', now 'scen'" in one_line_error(e)
    other = tmp_path / "other_ckpt"
    shutil.copytree(files / "ckpt", other)
    args = nse_args(files, files / "edits.jsonl", out) + ["--no-baseline", "--resume"]
    with pytest.raises(SystemExit) as e:
        nse.main([str(other) if a == str(files / "ckpt") else a for a in args])
    assert "--resume: ckpt was" in one_line_error(e)
    assert sorted(p.name for p in out.iterdir()) == before               # nothing written


def test_a_second_process_on_a_live_folder_is_refused_and_a_killed_ones_lock_is_not(files, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import harness; "
                               "from pathlib import Path\nwith harness.run_lock(Path(sys.argv[2])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(ROOT), str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(harness.RunError, match=rf"a run is live in this folder \(pid {holder.pid} on "):
            with harness.run_lock(out):
                pass
    finally:
        holder.kill()                                                    # like a killed run: the lock stays on disk
        holder.wait()
    assert (out / "run.lock").exists()
    with harness.run_lock(out):                                          # ... and does not block the next run
        pass


def test_threads_beyond_the_cores_are_capped_with_a_note(capsys):
    n = torch.get_num_threads()
    try:
        harness.set_threads(99_999)
        assert torch.get_num_threads() == os.cpu_count()
        assert f"--threads 99999: this machine has {os.cpu_count()} cores; using {os.cpu_count()}" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)


def test_the_python_editor_repairs_unicode_and_refuses_what_it_cannot_edit(files):
    model, tok = llama.load(files / "ckpt")
    recs = harness.as_records(prompts=[unicodedata.normalize("NFC", "Frédéric lives in")],
                              target_new=["Lima\x07"], subject=[unicodedata.normalize("NFD", "Frédéric")])
    assert recs[0].subject == "Frédéric" and recs[0].subject in recs[0].prompt    # NFC: the subject is found
    assert recs[0].target_new == "Lima"                                             # a control character removed
    with pytest.raises(harness.RunError, match="edit\\(\\): expected strings, got int"):
        harness.as_records(prompts=[123], target_new=["x"])
    ed = nse.Editor(model, tok, nse.Settings(layers=[0, 1], v_steps=2, stats_tokens=300),
                    stats_text=files / "corpus.txt", cache_dir=files / "cache")
    with pytest.raises(harness.RunError, match="context is 64"):
        ed.edit(prompts=["Kim Lo " * 40 + "lives in"], target_new=["Oslo"], subject=["Kim Lo"])
    with pytest.raises(ValueError, match="subject"):
        ed.edit(prompts=["Kim Lo lives in"], target_new=["Oslo"], subject=["kim lo"])        # case differs
    assert ed.n_edits == 0


@pytest.mark.parametrize("text", ["مرحبا lives in", "Kim 🙂 lives in"])
def test_right_to_left_text_and_emoji_load_unchanged_and_pass_the_checks(files, tmp_path, text):
    import data
    rec = {"prompt": text, "subject": text.split(" lives")[0], "target_new": "Oslo", "target_true": "Rome"}
    (tmp_path / "e.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    got = data.load_edits(tmp_path / "e.jsonl", require_subject=True)
    assert got[0].prompt == text and got[0].subject == rec["subject"]
    model, tok = llama.load(files / "ckpt")
    ed = harness.Editor(model, tok, "raw")
    ed.check(got)                                                         # no error: nothing to repair


def test_first_line_comes_at_once_and_quiet_keeps_the_log_empty(files, tmp_path):
    cmd = [sys.executable, str(ROOT / "nse.py"), *nse_args(files, files / "edits.jsonl", tmp_path / "o1")]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    t = time.perf_counter()
    first = p.stderr.readline()
    assert time.perf_counter() - t < 15 and first.startswith("nse: checking")
    p.stderr.read()
    assert p.wait() == 0
    q = subprocess.run([*cmd[:-1], str(tmp_path / "o2"), "--quiet"], capture_output=True, text=True)
    assert q.returncode == 0 and q.stderr == "" and "Efficacy" in q.stdout
