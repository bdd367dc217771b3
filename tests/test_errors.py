"""Bad input: one line naming the flag, field or file, exit code 1 or 2, before the model is loaded."""
import subprocess
import sys

import pytest

from conftest import ROOT, edit_files

import harness
import llama
import nse
import scen


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    r = edit_files(tmp_path_factory.mktemp("errors"))
    (r / "bad_ckpt").mkdir()
    (r / "bad_ckpt" / "config.json").write_text('{"hidden_size": 32}')
    return r


def no_load(monkeypatch):
    monkeypatch.setattr(llama, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    monkeypatch.setattr(llama.Llama, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))


@pytest.mark.parametrize("method, extra, msg", [
    ("nse", ["--layers", "4,x"], "expected comma-separated integers such as 4,5,6, got '4,x'"),
    ("nse", ["--threads", "0"], "--threads: must be >= 1, got 0"),
    ("nse", ["--batch-size", "0"], "batch_size 0: must be >= 1"),
    ("nse", ["--stats-tokens", "0"], "stats_tokens 0: must be >= 1"),
    ("nse", ["--neuron-threshold", "1.5"], "neuron_threshold 1.5: must be in (0, 1]"),
    ("nse", ["--layers", "0,7"], "layers [0, 7]: must be ascending layer indices below 3"),
    ("nse", ["--n", "5"], "--n 5: "),
    ("nse", ["--n", "0"], "--n: must be >= 1, got 0"),
    ("nse", ["--stats-text", "nowhere.txt"], "--stats-text nowhere.txt: file not found"),
    ("scen", ["--layer", "99"], "layer 99 is out of range"),
    ("scen", ["--n", "20"], "--n 20: "),
    ("scen", ["--expert-lr", "0"], "expert_lr 0.0: must be > 0"),
    ("scen", ["--method", "rome"], "invalid choice: 'rome'"),
])
def test_errors_come_before_loading_in_one_line(files, monkeypatch, capsys, method, extra, msg):
    no_load(monkeypatch)
    base = ["--ckpt", str(files / "ckpt"), "--edits", str(files / "edits.jsonl")]
    if method == "nse":
        base += ["--stats-text", str(files / "corpus.txt")]
    with pytest.raises(SystemExit) as e:
        {"nse": nse, "scen": scen}[method].main(base + extra)
    text = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert msg in text and text.strip().count("\n") == 0


def test_bad_checkpoint_is_one_line_for_every_command(files):
    """The real scripts, as a user runs them: exit code 1 or 2, one line, no traceback."""
    runs = [[ROOT / "scen.py", "--ckpt", files / "bad_ckpt", "--edits", files / "edits.jsonl"],
            [ROOT / "nse.py", "--ckpt", files / "bad_ckpt", "--edits", files / "edits.jsonl", "--stats-text",
             files / "corpus.txt"],
            [ROOT / "eval.py", "--ckpt", files / "bad_ckpt", "--data", files / "edits.jsonl"],
            [ROOT / "eval.py", "--ckpt", files / "ckpt", "--data", files / "edits.jsonl", "--batch-size", "0"],
            [ROOT / "llama.py", "--ckpt", files / "bad_ckpt", "--prompt", "hi"],
            [ROOT / "llama.py", "--ckpt", files / "ckpt", "--prompt", "hi", "--max-new-tokens", "-1"],
            [ROOT / "llama.py", "--ckpt", files / "ckpt", "--prompt", "hi", "--top-k", "0"],
            [ROOT / "llama.py", "--ckpt", files / "ckpt", "--prompt", "hi", "--temperature", "-1"]]
    for cmd in runs:
        p = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True)
        assert p.returncode in (1, 2) and "Traceback" not in p.stderr, (cmd, p.stderr)
        assert "error" in p.stderr.strip().splitlines()[-1], (cmd, p.stderr)


def test_settings_bounds_hold_in_python_too():
    with pytest.raises(harness.RunError, match="v_steps 0: must be >= 1"):
        harness.check_bounds(nse.Settings(v_steps=0))
    with pytest.raises(harness.RunError, match="method 'rome': must be one of nse, memit"):
        harness.check_bounds(nse.Settings(method="rome"))
    harness.check_bounds(nse.Settings())
    harness.check_bounds(scen.Settings())
