"""
harness.py: what every method shares and no method file holds: settings as flags, the Editor's
common shape, persistence of an editor's state, the on-disk caches (C0, z), the run harness
(--out / --resume, progress, reports), the evaluation CLI and the demos.

A method file (scen.py, nse.py) is its method: settings, equations, the sequential loop, and an
Editor that declares its state as tensors plus a small dict (`state` / `from_state`). Here:
  - Report, table, side_by_side      results.json / results.md and the terminal tables
  - setting, check_bounds, Editor   a Settings field with its help and bounds; the Editor base
  - write_state, read_state         an editor's state in OUT, atomically, resumable after a kill
  - C0Cache, ZCache, generated_corpus   per-layer C0 and per-request z kept on disk
  - parser, run, main               a method's command line: edit, evaluate, save, resume, export
  - evaluate_task, eval_main        task dispatch (written once) and `python eval.py`
  - Demo, demo                      the built-in demos (`python scen.py`, `python nse.py`)
The metrics themselves are eval.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import data
import eval as ev
import llama
from data import Template
from eval import (LlamaEvalModel, Snapshot, evaluate_counterfact, evaluate_perplexity, evaluate_qa,
                  evaluate_relation_specificity, generate_answers, metric, relation_snapshot)

# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
class Report:
    """Every figure of a run with its protocol, the run's arguments and timings.

    add(section, figures)  figures as returned by the evaluate_* functions
    timer(name)            context manager adding the elapsed seconds under timings[name]
    write(out_dir)         results.json and results.md, each written atomically
    """

    def __init__(self, title: str, args: dict | None = None):
        self.title = title
        self.args = dict(args or {})
        self.sections: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def add(self, section: str, figures: dict) -> None:
        self.sections.setdefault(section, {}).update(figures)

    @contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict:
        return {"title": self.title, "started": self.started, "args": self.args,
                "results": self.sections, "timings_s": self.timings, "notes": self.notes}

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for sec, figs in self.sections.items():
            lines += [f"## {sec}", "", "| metric | value | n | protocol |", "|---|---|---|---|"]
            for name, f in figs.items():
                v = f["value"]
                vs = f"{v:.2f}" if isinstance(v, float) else str(v)
                lines.append(f"| {name} | {vs} | {f.get('n', '')} | {f.get('protocol', '')} |")
            lines.append("")
        if self.timings:
            lines += ["## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in self.timings.items()] + [""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def write(self, out_dir) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        j, m = out_dir / "results.json", out_dir / "results.md"
        data.atomic_write_text(j, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        data.atomic_write_text(m, self.markdown())
        return j, m


def table(figures: dict, title: str | None = None) -> str:
    """One section of figures for the terminal, under a title line."""
    return "\n".join(([title] if title else []) + [side_by_side({"value": figures})])


def side_by_side(sections: dict, prefixes=None) -> str:
    """One terminal table, a column per section ("unedited", "scen", ...), a row per metric (those
    starting with one of `prefixes`, or all), with each metric's n."""
    names = list(dict.fromkeys(k for figs in sections.values() for k in figs
                               if prefixes is None or k.startswith(tuple(prefixes))))
    w = max([len(k) for k in names] + [6])
    cell = lambda f: "" if f is None else f"{f['value']:.2f}" if isinstance(f["value"], float) else str(f["value"])
    lines = [f"{'':<{w}}" + "".join(f"{s:>12}" for s in sections) + "     n"]
    for k in names:
        n = next(figs[k].get("n", "") for figs in sections.values() if k in figs)
        lines.append(f"{k:<{w}}" + "".join(f"{cell(figs.get(k)):>12}" for figs in sections.values()) + f"  {n:>4}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Editors: the one shape every method has
# --------------------------------------------------------------------------------------------
def setting(default, help: str, **meta):
    """A Settings field with its command-line help beside it (the harness makes one flag per
    field). meta: choices=(...), and bounds min= / max= (inclusive), gt= / lt= (strict)."""
    return field(default=default, metadata={"help": help, **meta})


BOUNDS = {"min": (lambda v, b: v >= b, ">=", "["), "gt": (lambda v, b: v > b, ">", "("),
          "max": (lambda v, b: v <= b, "<=", "]"), "lt": (lambda v, b: v < b, "<", ")")}


def check_bounds(s) -> None:
    """Every field of a Settings dataclass within its declared choices and bounds (None = unset);
    the message gives the interval when the field has both ends, e.g. "theta 2.0: must be in (0, 1)"."""
    for f in fields(s):
        v = getattr(s, f.name)
        if v is None:
            continue
        if "choices" in f.metadata and v not in f.metadata["choices"]:
            raise RunError(f"{f.name} {v!r}: must be one of {', '.join(map(str, f.metadata['choices']))}")
        ends = [(k, f.metadata[k]) for k in BOUNDS if k in f.metadata]
        if not all(BOUNDS[k][0](x, b) for k, b in ends for x in (v if isinstance(v, list) else [v])):
            if len(ends) == 2:
                (lo, a), (hi, b) = ends
                raise RunError(f"{f.name} {v}: must be in {BOUNDS[lo][2]}{a}, {b}{BOUNDS[hi][2]}")
            raise RunError(f"{f.name} {v}: must be {BOUNDS[ends[0][0]][1]} {ends[0][1]}")


def as_records(records=None, *, prompts=None, target_new=None, subject=None) -> list:
    """EditRecords, from records or from parallel lists prompts= / target_new= (/ subject=)."""
    if records is not None:
        if prompts is not None or target_new is not None:
            raise ValueError("edit(): give records, or prompts= and target_new=, not both")
        return [records] if isinstance(records, data.EditRecord) else list(records)
    if prompts is None or target_new is None:
        raise ValueError("edit(): give records, or prompts= and target_new=")
    if isinstance(prompts, str):
        prompts, target_new, subject = [prompts], [target_new], None if subject is None else [subject]
    subject = [None] * len(prompts) if subject is None else list(subject)
    if not len(prompts) == len(target_new) == len(subject):
        raise ValueError(f"edit(): {len(prompts)} prompts, {len(target_new)} targets, {len(subject)} subjects")
    for i, v in enumerate((*prompts, *target_new, *[x for x in subject if x is not None])):
        if not isinstance(v, str):
            raise RunError(f"edit(): expected strings, got {type(v).__name__} {v!r:.40}")
    clean = data.clean_text                              # NFC, control characters out (as load_edits does)
    return [data.EditRecord(clean(p), clean(t), subject=None if s is None else clean(s), meta={"source": f"edit()[{i}]"})
            for i, (p, t, s) in enumerate(zip(prompts, target_new, subject))]


class Editor:
    """What every method's editor is (scen.Editor, nse.Editor, ...):

        ed = Editor(model, tokenizer, settings, template=..., **inputs)
        ed.edit(records) / ed.edit(prompts=[...], target_new=[...], subject=[...])
                            sequential edits; one log row per edit (or per batch)
        ed.generate(prompts) -> answers (text) with the edits applied
        ed.save(out); Editor.load(out, model, tokenizer); ed.restore()  (unedited weights back)

    A subclass implements `apply(records) -> rows`, `restore`, and its state: `to_state()` (tensors
    plus a small dict, see write_state) and `from_state(model, tokenizer, st)`; save / load / saved
    are written once, here. It may set `prepare` (a router's hook, see LlamaEvalModel) and
    `check(records)` (refuse what the method cannot edit). `unit` is how many edits make one log
    row (the harness saves after each).
    For the run harness it also names its `Settings` dataclass, its default template, its
    presets, and the inputs beyond the edits it needs (`add_inputs`, `inputs_from`).
    """
    name = "editor"
    description = ""
    Settings = None
    default_template = "auto"
    presets: dict = {}
    needs_subject = False
    prepare = None

    def __init__(self, model, tokenizer, template="auto"):
        self.model, self.tokenizer = model, tokenizer
        if isinstance(template, str):
            template = data.template_for(tokenizer, template) if tokenizer is not None else Template(
                "raw" if template == "auto" else template)
        self.template = template
        self.log: list[dict] = []

    @property
    def unit(self) -> int:
        return 1

    @property
    def n_edits(self) -> int:
        return sum(r.get("n", 1) for r in self.log)

    @classmethod
    def subject_needed(cls, settings) -> bool:
        """Whether every record must name its subject (in its prompt) under these settings."""
        return cls.needs_subject

    def check(self, records) -> None:
        """Refuse, naming the record, what cannot be edited: an empty target, a subject that is not
        in its prompt (methods that need one), a prompt + target longer than the model's context."""
        for r in records:
            data.check_record(r, self.subject_needed(getattr(self, "s", None)))
        if self.tokenizer is not None:
            fit_lengths(self.tokenizer, self.template, records, self.model.config.max_position_embeddings,
                        "edit()", False, [])

    def edit(self, records=None, *, prompts=None, target_new=None, subject=None) -> list[dict]:
        records = as_records(records, prompts=prompts, target_new=target_new, subject=subject)
        self.check(records)
        return self.apply(records)

    def eval_model(self) -> "LlamaEvalModel":
        return LlamaEvalModel(self.model, self.tokenizer, self.template, prepare=self.prepare)

    def generate(self, prompts, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
        """Greedy answers to the templated prompts, with the edits applied."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_answers(self.eval_model(), self.tokenizer, self.template, prompts,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)

    def note(self) -> str | None:
        """What the last query did, for the terminal (SCEN: which expert answered)."""
        return None

    # -- what the run harness asks of a method (defaults: nothing beyond the edits) -----------
    @classmethod
    def check_settings(cls, s, config) -> None:
        """Refuse settings that cannot work on this checkpoint (config.json), naming the field."""
        check_bounds(s)

    @classmethod
    def add_inputs(cls, group) -> None:
        """Command-line flags for the method's inputs beyond the edits (files, folders)."""

    @classmethod
    def inputs_from(cls, args, records) -> dict:
        """The keyword arguments of __init__ made from those flags, checked before any work."""
        return {}

    def report_notes(self) -> list[str]:
        return []

    # -- persistence: the method declares its state, write_state / read_state keep it ----------
    part_name = "part"                   # the append-only per-edit tensors' file names (SCEN: expert)

    def to_state(self) -> dict:
        """{"tensors": {name: tensor}, "meta": JSON-able dict, "parts": [per-edit {name: tensor}],
        "once": {name: tensor} (written once per folder)}; parts and once are optional."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, model, tokenizer, st: dict) -> "Editor":
        raise NotImplementedError

    def save(self, out) -> None:
        """The editor's state in OUT, atomically (write_state); parts already there are not rewritten."""
        self._parts_saved = getattr(self, "_parts_saved", {})
        n = write_state(out, self.name, self.to_state(), self.part_name, self._parts_saved.get(str(out), 0))
        self._parts_saved[str(out)] = n

    @classmethod
    def saved(cls, out) -> bool:
        return state_path(out, cls.name).exists()

    exports = False                      # True: the edited model is a plain checkpoint (the MEMIT family)

    def export(self, out_dir, tokenizer_dir=None, dtype=None):
        """The edited model as a plain checkpoint folder (export_checkpoint); returns its dtype."""
        if not self.exports:
            raise RunError(f"--export: {self.name}'s edits are not a plain checkpoint (they need its router)")
        return export_checkpoint(self.model, out_dir, tokenizer_dir or getattr(self.tokenizer, "source_dir", None),
                                 dtype)

    @classmethod
    def load(cls, out, model, tokenizer=None) -> "Editor":
        """The editor saved in OUT, on `model` (the unedited checkpoint the edits were made on)."""
        st = read_state(out, cls.name, cls.part_name, model.device)
        ed = cls.from_state(model, tokenizer, st)
        ed._parts_saved = {str(out): len(st["parts"])}
        return ed


# --------------------------------------------------------------------------------------------
# An editor's state on disk
# --------------------------------------------------------------------------------------------
def state_path(out, name: str) -> Path:
    return Path(out) / f"{name}_state.safetensors"


def write_state(out, name: str, st: dict, part_name: str = "part", parts_on_disk: int = 0) -> int:
    """OUT/<name>_state.safetensors: the tensors, with the meta dict as JSON in its header. The
    append-only parts go first, one file each (OUT/<part>s/<part>_00001.safetensors, ...; those
    already on disk are skipped), the once-tensors to OUT/<name>_once.safetensors if absent, then
    the state file, replaced atomically: a kill at any instant leaves the previous state or the
    new one, never a mix. Parts the state does not count (written before a kill) are removed.
    Returns the number of parts on disk."""
    out = Path(out)
    once = out / f"{name}_once.safetensors"
    if st.get("once") and not once.exists():
        llama.write_safetensors(once, st["once"])
    parts, pdir = st.get("parts", []), out / f"{part_name}s"
    for k in range(parts_on_disk, len(parts)):
        llama.write_safetensors(pdir / f"{part_name}_{k + 1:05d}.safetensors", parts[k])
    llama.write_safetensors(state_path(out, name), st["tensors"],
                            {"state": json.dumps(st["meta"]), "n_parts": str(len(parts))})
    for f in pdir.glob(f"{part_name}_*.safetensors") if pdir.exists() else ():
        if int(f.stem[len(part_name) + 1:]) > len(parts):
            f.unlink()
    return len(parts)


def read_state(out, name: str, part_name: str = "part", device="cpu") -> dict:
    """What write_state wrote: {"tensors", "meta", "parts", "once"}, tensors on `device`."""
    out, dev = Path(out), str(device)
    path = state_path(out, name)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    n = int(header.get("n_parts", 0))
    once = out / f"{name}_once.safetensors"
    return {"tensors": load_file(str(path), device=dev), "meta": json.loads(header["state"]),
            "parts": [load_file(str(out / f"{part_name}s" / f"{part_name}_{k:05d}.safetensors"), device=dev)
                      for k in range(1, n + 1)],
            "once": load_file(str(once), device=dev) if once.exists() else {}}


def add_unrelated_inputs(cls, g) -> None:
    """SCEN's input: prompts unrelated to the edits (the features' centre and extra negatives)."""
    g.add_argument("--unrelated", help="records whose prompts centre the features and serve as "
                   "negatives: give ~1000 prompts of the kind the model will be asked (e.g. its SFT "
                   "set); default: 1000 questions the model writes itself (data.model_questions)")
    g.add_argument("--n-unrelated", type=int, help="use only the first N records of --unrelated")


def unrelated_inputs_from(cls, args, records) -> dict:
    if args.n_unrelated is not None and (args.n_unrelated < 1 or not args.unrelated):
        raise RunError(f"--n-unrelated {args.n_unrelated}: needs --unrelated and N >= 1")
    if not args.unrelated:
        return {"unrelated": None}                         # the model writes them (data.model_questions)
    edit_prompts = {r.prompt for r in records}
    return {"unrelated": [r.prompt for r in data.load_edits(args.unrelated, n=args.n_unrelated)
                          if r.prompt not in edit_prompts]}


def add_c0_inputs(cls, g) -> None:
    """The MEMIT family's inputs: the corpus for C0 and where C0 and z are cached."""
    g.add_argument("--stats-text", help="text corpus for C0, e.g. WikiText-2 raw (default: text the model "
                   "generates itself, generated_corpus)")
    g.add_argument("--cache-dir", default=CACHE_DIR, help="where C0 and NSE's z are cached")
    g.add_argument("--no-z-cache", action="store_true", help="compute NSE's z afresh instead of reading it "
                   "from --cache-dir (it depends only on the original weights, the request and the z settings)")


def c0_inputs_from(cls, args, records) -> dict:
    if args.stats_text is not None and not Path(args.stats_text).is_file():
        raise RunError(f"--stats-text {args.stats_text}: file not found")
    return {"stats_text": args.stats_text and Path(args.stats_text), "cache_dir": args.cache_dir,
            "z_cache": not args.no_z_cache}


def export_checkpoint(model, out_dir, tokenizer_dir=None, dtype=None):
    """The model as a plain Hugging Face checkpoint folder (atomic files), its weights in `dtype`
    (default: the dtype of the checkpoint that came in, config.json's torch_dtype). The model in
    memory is rounded to it too, so what is evaluated next is what was written."""
    dtype = llama.DTYPES.get(dtype or model.config.torch_dtype, model.dtype)
    for p in model.parameters():
        if p.dtype != dtype:
            p.data.copy_(p.data.to(dtype))                       # round in place, one tensor at a time
    model.save_pretrained(out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# Caches of what is computed once on the unedited model: C0 per layer, z per request
# --------------------------------------------------------------------------------------------
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama-edit", "nse")


@torch.no_grad()
def generated_corpus(model, tok, n_tokens: int, length: int = 256, batch: int = 16, seed: int = 0):
    """A corpus for C0 when none is given: text the model writes itself, `length`-token samples
    (temperature 1, top-k 50, seeded) from a document start (BOS, else EOS), n_tokens in all."""
    start = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    length = min(length, model.config.max_position_embeddings - 1)
    g, seqs, total, t0 = torch.Generator().manual_seed(seed), [], 0, time.perf_counter()
    while total < n_tokens:
        for new in llama.generate(model, [start] * batch, length, temperature=1.0, top_k=50, eos_ids=[], generator=g):
            seqs.append((start + new)[:n_tokens - total])
            total += len(seqs[-1])
            if total >= n_tokens:
                break
        inform(eta_line("C0 corpus: the model writes tokens", total, n_tokens, time.perf_counter() - t0))
    return seqs


class C0Store(dict):
    """C0 per layer, {layer: tensor}; layers whose file is in `on_disk` are read when asked for and
    not kept (a 7B layer's C0 is 485 MB: five of them would not fit beside the weights in 24 GB)."""

    def __init__(self, in_memory: dict, on_disk: dict):
        super().__init__(in_memory)
        self.on_disk = on_disk

    def __missing__(self, l):
        if l not in self.on_disk:
            raise KeyError(l)
        return load_file(self.on_disk[l])["C0"]

    def __contains__(self, l):
        return dict.__contains__(self, l) or l in self.on_disk


def load_or_compute_c0(model, tok, text_path, layers, n_tokens, cache_dir, compute, chunk=512, log=print,
                       keep_bytes: int = 1 << 30):
    """C0 per layer from the cache when its key matches exactly (the layer's weights, the corpus,
    the token count), else compute(model, tok, text, layers, n_tokens, chunk, log) -> ({l: C0}, n)
    (nse.key_second_moment) and cached atomically as safetensors. Kept in memory when all layers
    together take at most keep_bytes, else read per use (C0Store)."""
    if text_path is None:                                        # no corpus: the model's own text
        text, corpus, source = None, "generated by the model (generated_corpus, seed 0)", "generated text"
    else:
        text, source = Path(text_path).read_text(encoding="utf-8"), Path(text_path).name
        corpus = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    paths, missing = {}, []
    fingerprints = llama.layer_fingerprints(model, layers)
    for l in layers:
        key = dict(weights=fingerprints[l], layer=l, corpus=corpus, n_tokens=n_tokens, chunk=chunk)
        name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
        paths[l] = (Path(cache_dir) / f"c0-layer{l}-{name}.safetensors", key)
        if not paths[l][0].exists():
            missing.append(l)
    fresh = {}
    if missing:
        t0 = time.perf_counter()
        if text is None:
            log(f"C0: no corpus given: the model writes {n_tokens} tokens first (--stats-text FILE is faster)")
            text = generated_corpus(model, tok, n_tokens)
        inform(f"C0: layers {missing}, {n_tokens} tokens of {source} (computed once, then cached in {cache_dir})")
        fresh, n = compute(model, tok, text, missing, n_tokens, chunk, inform)
        log(f"C0: layers {missing}, {n} tokens of {source}, {time.perf_counter() - t0:.0f} s")
        for l in missing:
            path, key = paths[l]
            meta = {k: str(v) for k, v in key.items()} | {"tokens_used": str(n)}
            llama.write_safetensors(path, {"C0": fresh[l]}, meta)
    F_ = model.config.intermediate_size
    if len(layers) * F_ * F_ * 4 <= keep_bytes:
        return C0Store({l: fresh[l] if l in fresh else load_file(paths[l][0])["C0"] for l in layers}, {})
    return C0Store({}, {l: paths[l][0] for l in layers})


class ZCache:
    """Per-request vectors computed on the unedited model, kept on disk (root/z/<key>.safetensors):
    NSE's z (nse.cached_z). The key hashes the model's every weight and what the caller says the
    vector depends on. A vector read back is the one computed the first time, in its first batch;
    the same request in another batch can differ from it in the last bits (other padding, other
    matmul shapes). Build it on the unedited model: the digest covers every weight."""

    def __init__(self, root, model):
        self.root = Path(root) / "z"
        self.model = llama.weights_digest(sorted(model.state_dict().items())).hex()
        self.hits = 0

    def key(self, parts: dict) -> str:
        k = {"weights": self.model, **parts}
        return hashlib.blake2b(json.dumps(k, sort_keys=True).encode(), digest_size=16).hexdigest()

    def get_or_compute(self, parts: list[dict], compute):
        """(Z (n, D), steps, hits): one vector per key; compute(indices) -> (z (m, D), steps) makes the
        missing ones, which are written atomically."""
        keys = [self.key(p) for p in parts]
        Z, steps, miss = [None] * len(keys), [0] * len(keys), []
        for i, k in enumerate(keys):
            path = self.root / f"{k}.safetensors"
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    Z[i], steps[i] = f.get_tensor("z"), int(f.metadata()["steps"])
            else:
                miss.append(i)
        if miss:
            z, zsteps = compute(miss)
            for j, i in enumerate(miss):
                Z[i], steps[i] = z[j], zsteps[j]
                llama.write_safetensors(self.root / f"{keys[i]}.safetensors", {"z": z[j].contiguous()},
                                        {"steps": str(steps[i])})
        self.hits += len(keys) - len(miss)
        return torch.stack(Z), steps, len(keys) - len(miss)


# --------------------------------------------------------------------------------------------
# The run harness both CLIs share
# --------------------------------------------------------------------------------------------
class RunError(ValueError):
    """A bad argument, input or run folder, found before any work; the message names it."""


def _flag_type(f):
    t = str(f.type).replace(" ", "")
    if t.startswith("bool"):
        return parse_bool
    if t.startswith("list[int]"):
        return int_list
    return {"int": int, "float": float}.get(t.split("|")[0], str)


def int_list(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,5,6, got {v!r}")


def at_least(lo: int):
    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {x}")
        return x
    return parse


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and the problem), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(method) -> argparse.ArgumentParser:
    """The common flags, then one flag per field of method.Settings (help from the field), then
    the method's inputs (method.add_inputs) and presets (method.PRESETS)."""
    ap = Parser(prog=f"{method.name}.py", description=method.description)
    a = ap.add_argument_group("run").add_argument
    a("--ckpt", help="base checkpoint folder (Hugging Face layout); never modified")
    a("--edits", help="edit records (.json/.jsonl: ZsRE, EasyEdit, CounterFact, the project's JSONL)")
    a("--format", choices=data.FORMATS, help="edits format (default: detected)")
    a("--n", type=at_least(1), help="edit the first n records (default: all)")
    a("--loc", help="QA: records whose (prompt, target_new) are the Locality pairs (e.g. D_loc)")
    a("--template", choices=["auto", *data.TEMPLATES], help="prompt template (default: raw for "
      "CounterFact completions, else " + method.default_template + "; auto = the checkpoint's chat format)")
    a("--system", help="chatml/llama3: the system message ('' = none; default: the template's)")
    a("--out", help="run folder: edits, log, results.json/.md (refused if it holds a run, unless --resume)")
    a("--resume", action="store_true", help="continue the run in --out (same settings, data, checkpoint)")
    a("--load-edits", metavar="OUT", help="a run folder whose edits answer --prompt")
    a("--prompt", help="with --load-edits: the prompt to answer")
    a("--export", metavar="OUT", help="methods whose result is a plain checkpoint (NSE, MEMIT, AlphaEdit): write "
      "OUT/model from the edits saved in the run folder OUT, finished or not (--export-dtype applies)")
    a("--no-baseline", action="store_true", help="skip evaluating the unedited model")
    a("--no-fluency", action="store_true", help="CounterFact: skip the Fluency generations")
    a("--max-new-tokens", type=at_least(1), default=32, help="generation length for answers")
    a("--eval-batch-size", type=at_least(1), default=16, help="queries per evaluation forward pass")
    a("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    a("--dtype", choices=list(llama.DTYPES), help="weights dtype (default: float32 on cpu, bfloat16 "
      "elsewhere); on a CPU computation is float32 anyway")
    a("--threads", type=at_least(1), help="torch CPU threads (default: torch's; more than the cores: the cores)")
    a("--quiet", action="store_true", help="no progress lines on stderr (also: EDIT_QUIET=1); figures still print")
    a("--export-dtype", choices=list(llama.DTYPES), help="methods whose result is a plain checkpoint (NSE, "
      "MEMIT): its weights dtype in OUT/model (default: the dtype of --ckpt's config.json)")
    g = ap.add_argument_group(f"{method.name} settings (default: the Settings dataclass)")
    for f in fields(method.Settings):
        g.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f), default=None,
                       choices=f.metadata.get("choices"), help=f.metadata.get("help"))
    for name, preset in method.presets.items():
        g.add_argument(f"--{name}", action="store_true", help=preset["help"])
    method.add_inputs(ap.add_argument_group(f"{method.name} inputs"))
    return ap


def settings_from(method, args):
    """Settings: the dataclass defaults, a preset if one is given, then every flag given."""
    base = {}
    for name, preset in method.presets.items():
        if getattr(args, name, False):
            base.update({k: v for k, v in preset.items() if k != "help"})
    given = {f.name: getattr(args, f.name) for f in fields(method.Settings) if getattr(args, f.name, None) is not None}
    return method.Settings(**{**base, **given})


def digest(obj) -> str:
    """A fingerprint of anything JSON can write: edit records' content, a list of prompts."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def progress(i: int, n: int, seconds: float, done0: int, row: dict) -> str:
    """One flushed line: edits done, edits/s over the `seconds` the edits since done0 took (one-time
    set-up such as NSE's C0 left out), ETA, and the method's note on the last row."""
    rate = (i - done0) / max(seconds, 1e-9)
    eta = (n - i) / rate if rate > 0 else float("nan")
    return (f"edit {i}/{n}  {rate:.3f} edits/s  ETA {eta / 60:.1f} min"
            + (f"  | {row['note']}" if row.get("note") else ""))


def say(msg: str) -> None:
    print(msg, flush=True)


QUIET = os.environ.get("EDIT_QUIET", "") not in ("", "0")


def inform(msg: str) -> None:
    """A progress line (what a long step does, its count and ETA), on stderr, flushed; silent when
    the environment sets EDIT_QUIET=1 or a script sets harness.QUIET = True."""
    if not QUIET:
        print(msg, file=sys.stderr, flush=True)


def eta_line(what: str, i: int, n: int, seconds: float) -> str:
    """'what: i/n, ETA m:ss' from the rate so far."""
    eta = seconds / i * (n - i) if i else float("nan")
    return f"{what}: {i}/{n}" + (f", {seconds:.0f} s so far, ETA {eta:.0f} s" if i and i < n else f", {seconds:.0f} s")


def _key(v) -> str:
    """How an input is compared on --resume: a list by its content's digest, else its text."""
    if isinstance(v, (list, tuple)):
        return "sha:" + digest(v)
    return str(Path(v).resolve()) if isinstance(v, Path) else str(v)


def set_threads(n: int | None) -> None:
    """torch's CPU threads; more than the machine's cores is capped there, with a one-line note
    (an oversubscribed OpenMP pool runs several times slower, and a huge count crashes it)."""
    if not n:
        return
    cores = os.cpu_count() or 1
    if n > cores:
        inform(f"--threads {n}: this machine has {cores} cores; using {cores}")
        n = cores
    torch.set_num_threads(n)


class Ticker:
    """Progress of a long step: 'what: i/n, s so far, ETA s', at most every `every` seconds and
    at the end (harness.inform: stderr, flushed, silent under EDIT_QUIET=1)."""

    def __init__(self, what: str, every: float = 10.0):
        self.what, self.every, self.last, self.i, self.part = what, every, None, 0, 0
        self.t0 = time.perf_counter()

    def __call__(self, i: int, n: int) -> None:
        now = time.perf_counter()
        if i <= self.i:                                  # a new pass over other items (the eval's parts)
            self.t0, self.part = now, self.part + 1
        self.i = i
        if self.last is None or now - self.last >= self.every:
            self.last = now
            what = self.what + (f", part {self.part + 1}" if self.part else "")
            inform(eta_line(what, i, n, now - self.t0))


@contextmanager
def progress_of(what: str):
    """Progress lines for the evaluation batches run inside (eval.PROGRESS), then the step's seconds."""
    inform(what + " ...")
    t0, old = time.perf_counter(), ev.PROGRESS
    ev.PROGRESS = Ticker(what)
    try:
        yield
    finally:
        ev.PROGRESS = old
    inform(f"{what}: done in {hms(time.perf_counter() - t0)}")


def hms(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@contextmanager
def run_lock(out: Path | None):
    """One run per folder: OUT/run.lock held with flock while the run lives (the kernel releases it
    when the process dies, so a lock left by a killed run never blocks --resume); a second process
    given the same --out is refused at once, naming the live one."""
    if out is None:
        yield
        return
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            who = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunError(f"{out}: a run is live in this folder ({who}); wait for it, or give another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)                                     # closing releases the flock


def check_out_path(out: Path | None) -> None:
    """--out must be a folder we can write: not a file, not under a file, writable."""
    if out is None:
        return
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise RunError(f"--out {out}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunError(f"--out {out}: {p} is not writable")
            return


def fit_lengths(tok, template, records, max_pos: int, what: str, optional: bool, notes: list) -> list:
    """Prompts longer than the model's context (max_position_embeddings), in tokens, before any
    work (a text whose UTF-8 bytes fit needs no tokenizing: a token covers at least one byte). A
    record that will be edited is an error naming it; an optional item (a rephrase, a locality or
    portability pair, an unrelated prompt) is dropped and noted."""
    def tokens(p: str, a: str) -> int:
        if len(template.prompt_text(tok, p).encode()) + len(a.encode()) + 8 <= max_pos:
            return 0
        return len(data.encode_prompt_target(tok, template, p, a, add_eos=True).ids)

    out = []
    for i, r in enumerate(records):
        src = r.meta.get("source", f"{what}[{i}]")
        n = tokens(r.prompt, r.target_new)
        if n > max_pos:
            why = f"{n} tokens, the model's context is {max_pos} (max_position_embeddings)"
            if not optional:
                raise RunError(f"{src}: prompt + target_new: {why}")
            notes.append({"file": what, "record": src, "field": "prompt", "why": why})
            continue
        kept = {"rephrases": [p for p in r.rephrases if tokens(p, r.target_new) <= max_pos],
                "locality": [(p, a) for p, a in r.locality if tokens(p, a) <= max_pos],
                "portability": [(p, a) for p, a in r.portability if tokens(p, a) <= max_pos]}
        for k, v in kept.items():
            notes += [{"file": what, "record": src, "field": k, "why": f"longer than the context ({max_pos} tokens)"}
                      ] * (len(getattr(r, k)) - len(v))
        out.append(replace(r, **kept) if any(len(v) < len(getattr(r, k)) for k, v in kept.items()) else r)
    return out


def run(method, argv=None, log=say) -> "Report | None":
    """The command line of a method module (scen, nse): validate everything, load, evaluate the
    unedited model, edit in sequence (saving after every log row, resuming from --out), evaluate
    the edited model, write results.json + results.md. Returns the Report."""
    global QUIET
    args = parser(method).parse_args(argv)
    QUIET = QUIET or args.quiet
    set_threads(args.threads)
    try:
        if args.load_edits:
            return query(method, args, log)
        if args.export:
            return export_run(method, args, log)
        return _edit_run(method, args, log)
    except (RunError, data.DataError, llama.CheckpointError) as e:         # found before any work
        raise SystemExit(f"error: {e}")


def query(method, args, log=say):
    """--load-edits OUT --prompt "...": the saved edits answer one prompt."""
    if not args.prompt:
        raise RunError("--load-edits needs --prompt")
    out = Path(args.load_edits)
    run_info = _run_info(method, out)
    model, tok = llama.load(run_info["ckpt"], args.device, args.dtype)
    ed = method.load(out, model, tok)
    answer = ed.generate([args.prompt], args.max_new_tokens)[0]
    if ed.note():
        print(ed.note(), file=sys.stderr)
    log(answer)
    return answer


def _run_info(method, out: Path) -> dict:
    if not (out / "run.json").exists():
        raise RunError(f"{out}: no run.json (not a run folder)")
    run_info = json.loads((out / "run.json").read_text())
    if run_info["method"] != method.name:
        raise RunError(f"{out}/run.json: method: the run is {run_info['method']}, not {method.name}")
    if not method.saved(out):
        raise RunError(f"{out}: the run holds no saved edits yet")
    return run_info


def export_run(method, args, log=say):
    """--export OUT: the edited model of a run folder as a plain checkpoint, OUT/model."""
    if not method.exports:
        raise RunError(f"--export: {method.name}'s edits are not a plain checkpoint (they need its router)")
    out = Path(args.export)
    run_info = _run_info(method, out)
    model, tok = llama.load(run_info["ckpt"], args.device, args.dtype)
    ed = method.load(out, model, tok)
    dtype = ed.export(out / "model", tokenizer_dir=run_info["ckpt"], dtype=args.export_dtype)
    log(f"{out / 'model'}: the model after {ed.n_edits} edits, weights in {dtype}")
    return out / "model"


def _edit_run(method, args, log):
    if not args.ckpt or not args.edits:
        raise RunError("give --ckpt and --edits (or no arguments for the demo, or --load-edits OUT --prompt ...)")
    # 1. every input and setting checked before the model is loaded, and before --out is touched
    inform(f"{method.name}: checking {args.edits}, {args.ckpt} and the settings")
    out = Path(args.out) if args.out else None
    check_out_path(out)
    cfg = llama.LlamaConfig.from_file(Path(args.ckpt) / "config.json")
    settings = settings_from(method, args)
    method.check_settings(settings, cfg)
    notes: list = []                                 # optional items dropped (data.load_edits, fit_lengths)
    records = data.load_edits(args.edits, args.format, n=args.n, require_subject=method.subject_needed(settings),
                              notes=notes)
    if args.n is not None and len(records) < args.n:
        raise RunError(f"--n {args.n}: {args.edits} holds {len(records)} records")
    loc = data.load_edits(args.loc, notes=notes) if args.loc else None
    inputs = method.inputs_from(args, records)
    task = guess_task(records, args.format)
    tname = args.template or ("raw" if task == "counterfact" else method.default_template)
    tok = llama.load_tokenizer(args.ckpt)
    try:
        template = data.template_for(tok, tname, args.system)
        template.prompt_text(tok, "?")                  # a chat template the tokenizer does not have
    except ValueError as e:
        raise RunError(f"--template {tname}: {e}")
    if task == "qa" and template.kind != "raw" and template.end_id(tok) is None:
        raise RunError(f"{args.ckpt}: the tokenizer has no end token (EOS) to end an answer")
    max_pos = cfg.max_position_embeddings                # every prompt measured in tokens against the context
    records = fit_lengths(tok, template, records, max_pos, str(args.edits), False, notes)
    loc = fit_lengths(tok, template, loc, max_pos, str(args.loc), True, notes) if loc else loc
    for k, v in inputs.items():                          # prompt lists (SCEN's unrelated prompts)
        if isinstance(v, list) and all(isinstance(p, str) for p in v):
            kept = [r.prompt for r in fit_lengths(tok, template, [data.EditRecord(p, "", meta={"source": f"--{k}[{i}]"})
                                                                  for i, p in enumerate(v)], max_pos, k, True, notes)]
            inputs[k] = kept if len(kept) < len(v) else v
    if notes:
        inform(f"warning: {data.format_drops(notes)}")
    info = {"method": method.name, "settings": asdict(settings), "ckpt": str(Path(args.ckpt).resolve()),
            "edits": str(Path(args.edits).resolve()), "records": digest([r.to_dict() for r in records]),
            "n": len(records), "loc": digest([r.to_dict() for r in loc]) if loc else None, "template": tname,
            "system": args.system, "inputs": {k: _key(v) for k, v in inputs.items()}}
    old = _check_out(out, args.resume, info)
    with run_lock(out):                               # one run per folder, from here to the end
        # 2. load, the editor (a resumed one from --out), the unedited figures
        inform(f"loading {args.ckpt} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) on {args.device}")
        model = llama.load_model(args.ckpt, args.device, args.dtype)            # the tokenizer is loaded
        rep = Report(f"{method.name} sequential editing, {len(records)} records of {Path(args.edits).name}",
                     {**info, "device": args.device, "dtype": str(model.dtype), "threads": torch.get_num_threads(),
                      "dropped_items": len(notes)})
        if old is not None and method.saved(out):
            ed = method.load(out, model, tok)
            log(f"resuming after {ed.n_edits} of {len(records)} edits")
        else:
            ed = method(model, tok, settings, template=template, **inputs)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            llama.write_json(out / "run.json", info if old is None else old)
        rel = Snapshot(old["relation_snapshot"]) if old is not None and "relation_snapshot" in old else None
        if rel is None and ed.n_edits == 0 and task == "counterfact" and all(r.subject for r in records):
            inform(f"relation probes: other relations of the {len(records)} subjects, from the whole of {args.edits}")
            bank = data.load_edits(args.edits, args.format, lenient=True, notes=[])   # the whole file, for probes only
            probes = data.relation_probes(records, bank)
            if any(probes):                                  # the unedited model's answers, before any edit
                with progress_of(f"relation snapshot: the unedited model answers {sum(map(len, probes))} probes"):
                    rel = relation_snapshot(ed.eval_model(), tok, records, probes, batch_size=args.eval_batch_size)
                if out:
                    llama.write_json(out / "run.json", {**(old or info), "relation_snapshot": dict(rel)})
        if rel is not None:
            info = {**info, "relation_snapshot": dict(rel)}

        def evaluate(em):
            figs = evaluate_task(task, em, tok, template, records, loc, fluency=not args.no_fluency,
                                 batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
            if rel is not None:
                figs.update(evaluate_relation_specificity(em, tok, records, rel, batch_size=args.eval_batch_size))
            return figs
        if old is not None and "unedited" in old:
            rep.add("unedited", old["unedited"])
        elif not args.no_baseline:
            with rep.timer("eval unedited"), progress_of(f"evaluating the unedited model on {len(records)} records ({task})"):
                rep.add("unedited", evaluate(ed.eval_model()))
            if out:
                llama.write_json(out / "run.json", {**info, "unedited": rep.sections["unedited"]})
            log(side_by_side({"unedited": rep.sections["unedited"]}))
        # 3. sequential edits, saved after every log row
        done0, rows0 = ed.n_edits, len(ed.log)
        with rep.timer("editing"):
            for i in range(done0, len(records), ed.unit):
                rows = ed.edit(records[i:i + ed.unit])
                if out:
                    ed.save(out)
                spent = sum(r["seconds"] for r in ed.log[rows0:])
                log(progress(ed.n_edits, len(records), spent, done0, rows[-1]))
                if len(ed.log) == rows0 + 1 and ed.n_edits < len(records):      # the cost line, once measured
                    per = spent / max(ed.n_edits - done0, 1)
                    inform(f"{len(records) - done0} edits at ~{per:.1f} s each is about {hms(per * (len(records) - done0))} "
                           f"on this machine" + ("; on a GPU use --device cuda" if args.device == "cpu" else ""))
        if out and ed.exports:
            inform(f"export: the edited model to {out / 'model'}")
            with rep.timer("export"):
                dtype = ed.export(out / "model", tokenizer_dir=args.ckpt, dtype=args.export_dtype)
            rep.notes.append(f"{out / 'model'}: the edited model, weights in {dtype}; the edited figures are "
                             f"this checkpoint's (the model in memory was rounded to {dtype} before evaluation)")
        # 4. the edited figures
        name = getattr(ed.s, "method", method.name)                  # scen / ft, nse / memit
        with rep.timer("eval edited"):
            rep.add(name, evaluate(ed.eval_model()))
        secs = [r["seconds"] for r in ed.log]
        per = [r["seconds"] / r.get("n", 1) for r in ed.log]
        rep.add(name, {
            "s/edit (mean)": metric(sum(secs) / max(ed.n_edits, 1), "wall seconds per edit", ed.n_edits),
            "s/edit first": metric(per[0], "wall seconds per edit, first log row", 1),
            "s/edit last": metric(per[-1], "wall seconds per edit, last log row", 1)})
        rep.args["settings_used"] = asdict(ed.s)
        rep.notes += ed.report_notes()
        if out:
            rep.write(out)
        log(side_by_side(rep.sections))
        return rep


def _check_out(out, resume: bool, info: dict):
    """The --out rule: a folder holding a run is refused without --resume; --resume with nothing
    to resume is refused; a resume whose settings, data or checkpoint differ is refused, naming
    the field. Returns the saved run.json (or None for a fresh run)."""
    if out is not None and out.exists():
        for tmp in out.rglob(".*.tmp"):                 # a write that a kill interrupted
            tmp.unlink()
    has_run = out is not None and (out / "run.json").exists()
    if resume and not has_run:
        raise RunError(f"--resume: {out or '(no --out)'} holds no run to resume (no run.json)")
    if has_run and not resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if not has_run:
        if out is not None and out.exists() and any(p.name != "run.lock" for p in out.iterdir()):
            raise RunError(f"{out} is not empty and holds no run: give an empty or new folder")
        return None
    old = json.loads((out / "run.json").read_text())
    for k, v in info.items():
        if k == "settings":
            for s, sv in v.items():
                if old["settings"].get(s) != sv:
                    raise RunError(f"{out}/run.json: --resume: setting {s} was {old['settings'].get(s)!r}, now {sv!r}")
        elif old.get(k) != v:
            raise RunError(f"{out}/run.json: --resume: {k} was {old.get(k)!r}, now {v!r}")
    return old


def evaluate_task(task, em, tok, template, records, loc, *, fluency=True, batch_size=16, max_new_tokens=32) -> dict:
    """The figures of one task (written once: the method CLIs and eval.py call it): counterfact
    (Efficacy / Generalization / Specificity / Fluency), ppl (perplexity), qa (Reliability /
    Generality / Locality / Portability, generation and teacher-forced)."""
    if task == "counterfact":
        return evaluate_counterfact(em, tok, records, with_fluency=fluency, batch_size=batch_size)
    if task == "ppl":
        return evaluate_perplexity(em, tok, [(r.prompt, r.target_new) for r in records],
                                   template=template, batch_size=batch_size)
    return evaluate_qa(em, tok, template, records, loc_pairs=[(r.prompt, r.target_new) for r in loc] if loc else None,
                       max_new_tokens=max_new_tokens, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# Which task the data is
# --------------------------------------------------------------------------------------------
def guess_task(records, fmt: str | None) -> str:
    """qa | counterfact | ppl from the data: CounterFact format, or records that all have a
    target_true and completion prompts (not questions) -> counterfact; hallucination -> ppl."""
    if fmt == "counterfact":
        return "counterfact"
    if fmt == "hallucination" or all(r.meta.get("kind") in ("text", "wikibio") for r in records):
        return "ppl"
    if all(r.target_true is not None and r.meta.get("style") != "qa"
           and not r.prompt.rstrip().endswith("?") for r in records):
        return "counterfact"
    return "qa"


def eval_main(argv=None):
    """`python eval.py --ckpt DIR --data FILE`: the unedited checkpoint under the editing protocols."""
    ap = Parser(prog="eval.py", description="Evaluate an (unedited) checkpoint with the editing protocols: QA "
                "(Reliability/Generality/Locality, generation EM and teacher-forced), CounterFact "
                "(Efficacy/Generalization/Specificity/Fluency) or perplexity.")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (Hugging Face layout)")
    ap.add_argument("--data", required=True, help="edit file (.json or .jsonl)")
    ap.add_argument("--format", choices=data.FORMATS, default=None, help="data format (default: detect)")
    ap.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                    help="MEND ZsRE: answers[0] (QA evaluation) or alt (counterfactual)")
    ap.add_argument("--task", choices=["auto", "qa", "counterfact", "ppl"], default="auto",
                    help="which protocol (auto: from the data)")
    ap.add_argument("--template", choices=["auto", *data.TEMPLATES], default="auto",
                    help="prompt template for QA (auto: the tokenizer's chat format); "
                         "CounterFact and perplexity always use raw")
    ap.add_argument("--loc", default=None, help="QA: file of records whose (prompt, target_new) "
                                                "are the Locality pairs (e.g. D_loc)")
    ap.add_argument("--n", type=at_least(1), default=None, help="first N records only")
    ap.add_argument("--no-fluency", action="store_true", help="CounterFact: skip Fluency")
    ap.add_argument("--batch-size", type=at_least(1), default=16, help="queries per forward pass")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=32, help="generation length for exact match")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--dtype", choices=list(llama.DTYPES), help="weights dtype (default: float32 on "
                    "cpu, bfloat16 elsewhere); on a CPU computation is float32 anyway")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = data.load_edits(args.data, args.format, zsre_target=args.zsre_target, n=args.n)
        loc = data.load_edits(args.loc) if args.loc else None
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    task = guess_task(records, args.format) if args.task == "auto" else args.task
    report = Report(f"eval.py: {task} on {Path(args.data).name}", vars(args))
    with report.timer("load"):
        try:
            model, tok = llama.load(args.ckpt, args.device, args.dtype)
        except llama.CheckpointError as e:
            raise SystemExit(f"error: {e}")
    model.eval()
    template = data.template_for(tok, args.template) if task == "qa" else Template("raw")
    report.args["template_used"] = template.kind
    with report.timer("evaluate"):
        figs = evaluate_task(task, LlamaEvalModel(model, tok, template), tok,
                             template if task == "qa" else None, records, loc, fluency=not args.no_fluency,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    report.add("unedited", figs)
    print(table(figs, f"{task}: {args.data} ({len(records)} records, template {template.kind})"))
    if args.out:
        j, _ = report.write(args.out)
        print(f"wrote {j}")
    return report


# --------------------------------------------------------------------------------------------
# A method's entry point, and the demos
# --------------------------------------------------------------------------------------------
@dataclass
class Demo:
    """A built-in demo: the demo model of `kind` (train_sft.ensure_demo), then one run per argv in
    `runs` ({ckpt}, {edits_qa}, {edits_cf}, {loc_qa}, {unrelated_qa}, {corpus} are the demo's
    files), their sections side by side (rows starting with `rows`)."""
    kind: str
    runs: list
    rows: tuple = ()
    title: str = ""


def demo(method, spec: Demo, log=say) -> Report:
    """Runs the demo; its Report holds every run's sections (unedited, then each method's)."""
    import train_sft                                  # the demo model is trained (once) by train_sft.py
    p = train_sft.ensure_demo(log=log, kind=spec.kind)
    rep = None
    for i, argv in enumerate(spec.runs):
        argv = [a.format(**{k: str(v) for k, v in p.items()}) for a in argv] + (["--no-baseline"] if i else [])
        r = run(method, argv, log=lambda *_: None)
        if rep is None:
            rep = r
        else:
            rep.sections.update(r.sections)
    log(spec.title.format(n=len(data.load_edits(p["edits_qa" if spec.kind == "qa" else "edits_cf"]))))
    log(side_by_side(rep.sections, spec.rows or None))
    return rep


def main(method, argv=None, demo_spec: Demo | None = None):
    """`python scen.py ARGS` / `python nse.py ARGS`: the run harness; no arguments: the demo."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv and demo_spec is not None:
        return demo(method, demo_spec)
    return run(method, argv)


if __name__ == "__main__":
    eval_main()
