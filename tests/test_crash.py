"""Crash safety: a run killed at any write resumes to the result of an uninterrupted run, bit for bit,
with no temp file left and the exported checkpoint complete."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import edit_files

import harness
import llama
import nse
import scen


class Killed(BaseException):
    """Like SIGKILL: nothing in the program catches it."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return edit_files(tmp_path_factory.mktemp("crash"))


def argv(method, files, out):
    common = ["--ckpt", str(files / "ckpt"), "--edits", str(files / "edits.jsonl"), "--out", str(out),
              "--no-fluency", "--eval-batch-size", "4"]
    if method == "scen":
        return common + ["--template", "raw", "--unrelated", str(files / "unrelated.jsonl"), "--layer", "1", "--expert-lr", "3e-2", "--expert-steps", "30", "--expert-nll", "1",
                         "--neuron-steps", "100"]
    return common + ["--stats-text", str(files / "corpus.txt"), "--stats-tokens", "400", "--cache-dir",
                     str(files / "cache"), "--layers", "0,1", "--v-steps", "4", "--batch-size", "1"]


def run(method, args, monkeypatch, kill_at=None):
    """Run the CLI; with kill_at=k the k-th file write stops half-way (its temp file written, never
    renamed) and the run dies there. Returns the number of writes made."""
    real, calls = llama.atomic_write, [0]

    def write(path, write_fn):
        calls[0] += 1
        if calls[0] == kill_at:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_fn(path.parent / f".{path.name}.killed.tmp")
            raise Killed
        return real(path, write_fn)
    monkeypatch.setattr(llama, "atomic_write", write)
    try:
        (scen if method == "scen" else nse).main(args)
    finally:
        monkeypatch.setattr(llama, "atomic_write", real)
    return calls[0]


def snapshot(method, out):
    """Everything a finished run folder holds, less wall-clock times."""
    clean = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rows]
    res = json.loads((out / "results.json").read_text())["results"]
    figs = {s: {k: v["value"] for k, v in f.items() if not k.startswith("s/edit")} for s, f in res.items()}
    if method == "scen":
        st = harness.read_state(out, "scen", "expert")
        tensors = dict(st["tensors"])
        tensors.update({f"{p.name}.{k}": v for p in sorted((out / "experts").iterdir())
                        for k, v in load_file(str(p)).items()})               # weight, or lowrank A and B
        return figs, clean(st["meta"]["log"]), tensors
    from safetensors import safe_open
    with safe_open(str(out / "nse_state.safetensors"), "pt") as f:
        log = json.loads(f.metadata()["state"])["log"]
    tensors = load_file(str(out / "nse_state.safetensors"))
    exported = llama.Llama.from_pretrained(out / "model")            # complete and loadable
    tensors.update({f"model.{k}": v for k, v in exported.state_dict().items()})
    return figs, clean(log), tensors


@pytest.mark.parametrize("method", ["scen", "nse"])
def test_killed_at_every_write_resumes_bit_identical(method, files, tmp_path, monkeypatch):
    if method == "nse":
        run(method, argv(method, files, tmp_path / "warm"), monkeypatch)  # C0 cached: same writes every run
    ref = tmp_path / "ref"
    n_writes = run(method, argv(method, files, ref), monkeypatch)
    want = snapshot(method, ref)
    assert n_writes >= 8
    for k in range(1, n_writes + 1):
        out = tmp_path / f"k{k}"
        with pytest.raises(Killed):
            run(method, argv(method, files, out), monkeypatch, kill_at=k)
        assert list(out.rglob("*.tmp"))                                  # the kill left its temp file
        resume = ["--resume"] if (out / "run.json").exists() else []     # killed before the run existed
        run(method, argv(method, files, out) + resume, monkeypatch)
        got = snapshot(method, out)
        assert got[0] == want[0] and got[1] == want[1], k
        assert got[2].keys() == want[2].keys(), k
        assert all(torch.equal(got[2][n], want[2][n]) for n in want[2]), k
        assert not list(out.rglob("*.tmp")), k
