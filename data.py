"""Edit records, dataset loaders, prompt templates, tokenisation with label masks, batching,
and the built-in demo world.

What is inside
--------------
- `EditRecord`: one edit request (prompt, target_new, optional target_true, subject,
  rephrase prompts, locality pairs, portability pairs, free-form meta).
- `load_edits(path, format=None, ..., notes=None, lenient=False)`: reads and validates, before any
  work starts, the files of the editing literature as they are published:
    * "zsre"          MEND/ROME ZsRE JSON: {src, answers, alt, rephrase, loc, loc_ans, subject, ...},
                      as a .json array or one record per line; WISE's ZsRE files (the same keys);
                      MEND's own JSON lines {input, output: [{answer}], alternatives,
                      filtered_rephrases, prediction}. The new target is a CHOICE (`zsre_target`):
                      "answers" = answers[0], the ZsRE evaluation (the question's true answer,
                      which the model got wrong); "alt" = the counterfactual edit (target_new =
                      alt, target_true = answers[0] when the file has answers).
    * "easyedit"      EasyEdit/KnowEdit JSON: {prompt, target_new, ground_truth, rephrase_prompt |
                      rephrase, locality_prompt, locality_ground_truth} or nested {locality:
                      {kind: [{prompt, ground_truth}, ...]}, portability: {...}} (KnowEdit ZsRE,
                      CounterFact, recent; a ground truth is a string, a list of alternatives or
                      a list of lists); the WikiBio hallucination edits {prompt, target_new,
                      subject, locality_*} (WISE); WISE temporal ('{}' in the prompt, ood_rephrase).
    * "counterfact"   ROME CounterFact JSON: {case_id, requested_rewrite: {prompt "{}", subject,
                      target_new: {str}, target_true: {str}}, paraphrase_prompts,
                      neighborhood_prompts, generation_prompts}.
    * "hallucination" SCEN/GRACE perplexity sets: {text, labels, concept} (WikiBio-A, and KnowEdit
                      WikiBio with a nested locality: prompt = text, target = labels) and {text}
                      (OpenWebText: empty prompt, target = text).
    * "jsonl"         the project's own format: one JSON object per line whose keys are the
                      fields of EditRecord (see `save_jsonl`).
  A problem with a REQUIRED field of a record that is read (the first n) is a `DataError`
  "FILE:LINE: FIELD: what was expected, what was found" (also: not UTF-8, with the byte offset;
  invalid or truncated JSON; not an array / not one object per line; empty file; a subject not
  in the prompt, or only with other case, when the method needs it). An OPTIONAL item that
  cannot be used (an empty locality/portability answer, prompts and answers that do not pair
  up, an empty rephrase) is dropped and noted (`notes`, or one `DataWarning` per file);
  `format_drops(notes)` is the one summary line. lenient=True skips records with unusable
  required fields (noted too). Repairs: a UTF-8 BOM is accepted; text is NFC-normalised and C0
  control characters but tab/newline/CR are removed. See load_edits for every rule.
- `Template` ("raw", "llama2", "chatml") and `template_for(tokenizer, name)`.
- `encode_prompt_target(...)`: token ids of prompt + target such that the target ids are the
  ones the model would generate after the prompt; `collate(...)`: padding, attention masks,
  labels with -100 on prompt and padding.
- `demo_world(seed)`: a deterministic fictional knowledge base (people, cities, countries,
  organisations, languages) with several phrasings per relation, counterfactual edits and
  locality facts. train_sft.py trains the demo model on it (`ensure_demo`).

The tokenizer objects are llama.py's (`load_tokenizer`): `encode(text, bos=None, eos=False)`,
`decode(ids, skip_special)`, `bos_id`, `eos_id`, `pad_id`, `add_bos`, `chat_format`.
Nothing here imports torch except `collate`.
"""
from __future__ import annotations

import json
import random
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import llama

FORMATS = ("zsre", "easyedit", "counterfact", "hallucination", "jsonl")
TEMPLATES = ("raw", "llama2", "chatml", "llama3")


class DataError(ValueError):
    """A bad input file or record; the message reads 'FILE:LINE: FIELD: problem'.

    Attributes: line (the record's line, or None), field (or None), why (the problem alone)."""


class DataWarning(UserWarning):
    """load_edits dropped unusable optional items (see `format_drops`); only when notes=None."""


def _err(path, line, fld, msg) -> DataError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    e = DataError(f"{where}: {fld}: {msg}" if fld else f"{where}: {msg}")
    e.line, e.field, e.why = line, fld, msg
    return e


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------
@dataclass
class EditRecord:
    """One edit request.

    prompt       the edit prompt (a question for QA edits, a completion prefix for CounterFact)
    target_new   the answer the edited model must give
    target_true  the old / true answer where the data has one (CounterFact), else None
    subject      the entity the fact is about (must occur in `prompt` for locate-then-edit methods)
    rephrases    paraphrases of `prompt` (Generality / Generalization)
    locality     unrelated (prompt, answer) pairs (Locality / Specificity)
    portability  (prompt, answer) pairs that follow from the edit (reported only)
    meta         anything else from the source (case_id, relation, ...), kept for reports
    """
    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = None
    rephrases: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)
    portability: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["locality"] = [list(p) for p in self.locality]
        d["portability"] = [list(p) for p in self.portability]
        return d


_FIELDS = ("prompt", "target_new", "target_true", "subject", "rephrases", "locality",
           "portability", "meta")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
# C0 control characters but tab, newline and carriage return; DEL and the C1 range stay (in
# published text they are mostly Windows-1252 punctuation read as Latin-1, e.g. U+0095 for a bullet)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _read_text(path: Path) -> tuple[str, DataError | None]:
    """The file's text, a leading UTF-8 BOM removed. Bytes that are not UTF-8: the text before
    them and the error to raise if a record that is needed lies past them (else (text, None))."""
    if not path.exists():
        raise _err(path, None, None, "file not found")
    if path.is_dir():
        raise _err(path, None, None, "is a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _err(path, None, None, f"cannot read the file ({e.strerror})") from None
    bom = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[bom:].decode("utf-8"), None
    except UnicodeDecodeError as e:
        at = bom + e.start
        hint = " (the file looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        bad = _err(path, raw.count(b"\n", 0, at) + 1, None,
                   f"not UTF-8 text: byte 0x{raw[at]:02x} at byte offset {at} ({e.reason}){hint}; "
                   "save the file as UTF-8")
        return raw[bom:at].decode("utf-8"), bad


def _jtype(v) -> str:
    """A JSON value's kind, as the error messages name it."""
    if isinstance(v, dict):
        return "a JSON object"
    if isinstance(v, list):
        return "a JSON array"
    if isinstance(v, str):
        return "a JSON string"
    if isinstance(v, bool):
        return f"JSON {str(v).lower()}"
    if isinstance(v, (int, float)):
        return "a JSON number"
    return "JSON null"


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


def _short(s: str, k: int = 40) -> str:
    return repr(s) if len(s) <= k else repr(s[:k]) + f"... ({len(s)} characters)"


def _json_array(path: Path, text: str, n: int | None):
    """Parse a top-level JSON array element by element; yield (line of the element, element).

    Stops after `n` elements (what follows them is never read). The line numbers let every
    error name the record's line.
    """
    dec = json.JSONDecoder(strict=False)        # raw control characters in strings: see _clean
    L = len(text)
    i = _WS.match(text, 0).end()
    if i >= L or text[i] != "[":
        try:
            found = _jtype(dec.raw_decode(text, i)[0])
        except json.JSONDecodeError:
            found = _short(text[i:i + 20], 20)
        raise _err(path, text.count("\n", 0, i) + 1, None,
                   f"expected a JSON array of records, found {found} (a file of one JSON object per "
                   "line is read as such when its name ends in .jsonl or no format is given)")
    i += 1
    line, last = 1, 0
    count = 0
    first = True
    while True:
        i = _WS.match(text, i).end()
        line += text.count("\n", last, i); last = i
        if i >= L:
            raise _err(path, line, None, "truncated JSON: the file ends before the array's closing ']'")
        if text[i] == "]":
            j = _WS.match(text, i + 1).end()
            if j < L:
                raise _err(path, line + text.count("\n", i, j), None,
                           f"invalid JSON: {_short(text[j:j + 20], 20)} after the array's closing ']'")
            return
        if not first:
            if text[i] != ",":
                raise _err(path, line, None, "invalid JSON: expected ',' or ']' between records, "
                                             f"found {text[i]!r}")
            i = _WS.match(text, i + 1).end()
            line += text.count("\n", last, i); last = i
            if i >= L:
                raise _err(path, line, None, "truncated JSON: the file ends before the array's "
                                             "closing ']'")
        first = False
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if e.pos >= L or e.msg.startswith("Unterminated string"):
                raise _err(path, line, None, "truncated JSON: the file ends inside the record that "
                                             f"starts here ({e.msg})") from None
            raise _err(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        yield line, obj
        count += 1
        if n is not None and count >= n:
            return
        i = j


def _jsonl(path: Path, text: str, n: int | None, skip=None):
    """One JSON value per line (blank lines ignored); yield (line, value). Stops after `n` records:
    the lines after them are never parsed. A line that is not JSON raises, or with `skip`
    (lenient) is passed to skip(DataError) and counts as one of the n records."""
    dec = json.JSONDecoder(strict=False)
    count, pos, k, L = 0, 0, 0, len(text)
    seen = False
    while pos < L:
        end = text.find("\n", pos)
        end = L if end < 0 else end
        raw, pos, k = text[pos:end], end + 1, k + 1
        if not raw.strip():
            continue
        try:
            obj = dec.decode(raw)
        except json.JSONDecodeError as e:
            err = _err(path, k, None, f"invalid JSON: {e.msg} (column {e.colno})")
            if not seen:                # one JSON object over several lines is not a record file
                try:
                    whole = json.loads(text, strict=False)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    lines = text.rstrip().count("\n") + 1
                    raise _err(path, k, None, "expected a JSON array of records or one JSON object "
                                              f"per line, found one JSON object over {lines} lines")
            if skip is None:
                raise err from None
            skip(err)
        else:
            yield k, obj
        seen = True
        count += 1
        if n is not None and count >= n:
            return


def _until_bad_byte(items, bad: DataError | None, n: int | None):
    """`items`, where the text was cut at a byte that is not UTF-8: any parse error, or needing a
    record past the cut, raises that byte's error instead; records before it are fine."""
    if bad is None:
        yield from items
        return
    count = 0
    try:
        for x in items:
            yield x
            count += 1
    except DataError:
        raise bad from None
    if n is None or count < n:
        raise bad


def detect_format(obj: dict) -> str | None:
    """Guess a record's format from its keys (None when nothing matches)."""
    if not isinstance(obj, dict):
        return None
    k = set(obj)
    if "requested_rewrite" in k:
        return "counterfact"
    if "src" in k or ("input" in k and ("alternatives" in k or "filtered_rephrases" in k)):
        return "zsre"
    if ("rephrases" in k or "target_true" in k or ("meta" in k and "target_new" in k)
            or isinstance(obj.get("locality"), list) or isinstance(obj.get("portability"), list)):
        return "jsonl"
    if "prompt" in k and "target_new" in k:
        return "easyedit"
    if "text" in k and "prompt" not in k:
        return "hallucination"
    return None


# --- text and field helpers ------------------------------------------------------------------
def _clean(s: str) -> str:
    """The labelled repairs of every text field: C0 control characters (U+0000-U+001F) other
    than tab, newline and carriage return removed; NFC normalisation. Nothing else changes
    (right-to-left text, emoji, zero-width joiners and marks, leading/trailing spaces)."""
    if _CONTROL.search(s):
        s = _CONTROL.sub("", s)
    if not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    return s


clean_text = _clean                                      # the same repair for records made in code (Editor.edit)


def _blank(v: str) -> str:
    if v == "":
        return "expected text, got ''"
    if not v.strip():
        return f"expected text, got only whitespace {_short(v)}"
    return f"expected text, got only control characters / whitespace {_short(v)}"


class _Rec:
    """One record being parsed: where it is, what is required, and the optional items dropped
    from it (field, why). `alias` renames fields in messages (MEND's own ZsRE keys)."""

    def __init__(self, path, line, need_subject: bool, alias=None):
        self.path, self.line, self.need_subject = path, line, need_subject
        self.alias = alias or {}
        self.drops: list[tuple[str, str]] = []

    def _name(self, fld):
        if not fld or not self.alias:
            return fld
        head = re.match(r"[A-Za-z_ ]*", fld).group(0)
        return self.alias.get(head, head) + fld[len(head):]

    def err(self, fld, msg) -> DataError:
        return _err(self.path, self.line, self._name(fld), msg)

    def drop(self, fld, why) -> None:
        self.drops.append((self._name(fld), why))


def _need(r: _Rec, d: dict, key: str, types=(str,), fld=None):
    """A required field's value (missing, null or another type: DataError)."""
    fld = fld or key
    if key not in d:
        raise r.err(fld, "missing field")
    v = d[key]
    if v is None:
        raise r.err(fld, "missing field (null)")
    if not isinstance(v, types):
        raise r.err(fld, f"expected {'/'.join(t.__name__ for t in types)}, got {_tname(v)}")
    return v


def _need_text(r: _Rec, v, fld: str, what: str) -> str:
    """A required text: a string that is not blank once cleaned."""
    if not isinstance(v, str):
        raise r.err(fld, f"expected str, got {_tname(v)}")
    s = _clean(v)
    if not s.strip():
        raise r.err(fld, f"empty {what} ({_blank(v)})")
    return s


def _need_first(r: _Rec, v, fld: str, what: str = "target") -> str:
    """A required answer given as a string or a list (of lists) of strings: its first string."""
    while isinstance(v, list):
        if not v:
            raise r.err(fld, f"empty {what} (expected a string or a non-empty list, got [])")
        v = v[0]
    return _need_text(r, v, fld, what)


def _opt_text(r: _Rec, v, fld: str, what: str) -> str | None:
    """An optional text: the cleaned string, or None with a drop noted."""
    if isinstance(v, str):
        s = _clean(v)
        if s.strip():
            return s
        r.drop(fld, f"empty {what}")
        return None
    r.drop(fld, f"empty {what}" if v is None else f"expected a string, got {_tname(v)}")
    return None


def _opt_texts(r: _Rec, v, fld: str, what: str = "prompt") -> list[str]:
    """An optional string or list of strings (rephrases): the usable ones, drops noted."""
    if v is None:
        return []
    if isinstance(v, str):
        s = _opt_text(r, v, fld, what)
        return [s] if s is not None else []
    if not isinstance(v, list):
        r.drop(fld, f"expected a string or a list of strings, got {_tname(v)}")
        return []
    out = [_opt_text(r, x, f"{fld}[{j}]", what) for j, x in enumerate(v)]
    return [s for s in out if s is not None]


def _opt_answer(r: _Rec, v, fld: str) -> str | None:
    """An optional answer given as a string, a list of alternatives or a list of lists (KnowEdit:
    [[answer, alias, ...], ...]): its first non-blank string, or None with a drop noted."""
    bad = []

    def first(x):
        if isinstance(x, str):
            s = _clean(x)
            return s if s.strip() else None
        if isinstance(x, list):
            for y in x:
                s = first(y)
                if s is not None:
                    return s
            return None
        if x is not None:
            bad.append(_tname(x))
        return None

    s = first(v)
    if s is None:
        r.drop(fld, f"expected a string or a list of strings, got {bad[0]}" if bad else "empty answer")
    return s


def _pairs(r: _Rec, prompts, answers, fld: str, single: str | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of one locality/portability entry; unusable ones are dropped.

    One prompt (a string or a one-element list): `answers` is its answer (string, alternatives,
    list of lists; the first non-blank string is used), field `single` (default fld). Several
    prompts: one answer each, or a single answer for all; pair j is field fld[j]; another count
    of answers drops the entry ("3 prompts but 2 answers")."""
    if isinstance(prompts, list) and len(prompts) == 1:
        prompts = prompts[0]
    if not isinstance(prompts, list):
        name = single or fld
        p = _opt_text(r, prompts, name, "prompt")
        a = _opt_answer(r, answers, name) if p is not None else None
        return [(p, a)] if a is not None else []
    if not prompts:
        r.drop(fld, "empty prompt (an empty list)")
        return []
    if answers is None or answers == []:
        r.drop(fld, "empty answer")
        return []
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        r.drop(fld, f"expected a string or a list of answers, got {_tname(answers)}")
        return []
    if len(answers) == 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        r.drop(fld, f"{len(prompts)} prompts but {len(answers)} answers")
        return []
    out = []
    for j, (p, a) in enumerate(zip(prompts, answers)):
        p = _opt_text(r, p, f"{fld}[{j}]", "prompt")
        a = _opt_answer(r, a, f"{fld}[{j}]") if p is not None else None
        if a is not None:
            out.append((p, a))
    return out


def _nested(r: _Rec, v, key: str) -> tuple[list[tuple[str, str]], dict]:
    """KnowEdit / EasyEdit nested locality or portability: {kind: {prompt, ground_truth} |
    [{prompt, ground_truth}, ...]}. Entry i of a kind is field key.kind[i] (key.kind when the
    kind is one object); kinds counts the pairs kept per kind."""
    out, kinds = [], {}
    if v is None:
        return out, kinds
    if not isinstance(v, dict):
        r.drop(key, f"expected an object {{kind: entries}}, got {_tname(v)}")
        return out, kinds
    for name, entry in v.items():
        base = f"{key}.{name}"
        entries = list(enumerate(entry)) if isinstance(entry, list) else [(None, entry)]
        kinds.setdefault(name, 0)
        for i, e in entries:
            f = base if i is None else f"{base}[{i}]"
            if not isinstance(e, dict) or "prompt" not in e:
                got = f"keys {sorted(e)}" if isinstance(e, dict) else _tname(e)
                r.drop(f, f"expected an object {{prompt, ground_truth}}, got {got}")
                continue
            if "ground_truth" not in e:
                r.drop(f, "empty answer (no ground_truth)")
                continue
            pairs = _pairs(r, e["prompt"], e["ground_truth"], f)
            kinds[name] += len(pairs)
            out += pairs
    return out, kinds


def _portability(r: _Rec, v) -> tuple[list[tuple[str, str]], dict | None]:
    """ZsRE's {New Question, New Answer} (one pair) or the nested KnowEdit form."""
    if isinstance(v, dict) and ("New Question" in v or "New Answer" in v):
        p = _opt_text(r, v.get("New Question"), "portability.New Question", "prompt")
        a = _opt_answer(r, v.get("New Answer"), "portability.New Answer") if p is not None else None
        return ([(p, a)] if a is not None else []), None
    return _nested(r, v, "portability")


def _subject(r: _Rec, d: dict, key: str = "subject") -> str | None:
    """The subject: required (DataError) when the method needs it, else dropped when unusable."""
    v = d.get(key)
    if v is None:
        return None
    if r.need_subject:
        return _need_text(r, v, key, "subject")
    return _opt_text(r, v, key, "subject")


def _fill(text: str, subject: str | None) -> str:
    """WISE temporal prompts hold a '{}' placeholder for the subject."""
    if subject and "{}" in text and subject not in text:
        return text.replace("{}", subject)
    return text


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


# --- one parser per format -------------------------------------------------------------------
# MEND's own ZsRE JSON lines, named as the MEND/ROME ZsRE JSON names them
_MEND_KILT = {"src": "input", "alt": "alternatives[0]", "answers": "output[].answer",
              "rephrase": "filtered_rephrases", "pred": "prediction"}


def _from_mend_kilt(d: dict) -> dict:
    """{input, prediction, alternatives, filtered_rephrases, output: [{answer}]} as the {src,
    pred, alt, rephrase, answers} record MEND's loader makes of it (alt = the first alternative,
    every filtered rephrase)."""
    out, alts = d.get("output"), d.get("alternatives")
    v = {"src": d.get("input"), "rephrase": d.get("filtered_rephrases"),
         "answers": [o.get("answer") if isinstance(o, dict) else o for o in out]
         if isinstance(out, list) else out,
         "alt": alts[0] if isinstance(alts, list) and alts else alts}
    if "prediction" in d:
        v["pred"] = d["prediction"]
    for k in ("subject", "loc", "loc_ans", "portability", "id"):
        if k in d:
            v[k] = d[k]
    return v


def _parse_zsre(d, r: _Rec, zsre_target) -> EditRecord:
    if "src" not in d and "input" in d:
        d, r.alias = _from_mend_kilt(d), _MEND_KILT
    src = _need_text(r, _need(r, d, "src"), "src", "prompt")
    if zsre_target == "answers":
        if d.get("answers") is None:
            raise r.err("answers", "missing field (a file without the true answers, e.g. WISE's or "
                                   "a counterfactual one, is read with zsre_target='alt')")
        new = _need_first(r, _need(r, d, "answers", (list, str)), "answers")
        true = None
    else:
        new = _need_text(r, _need(r, d, "alt"), "alt", "target")
        true = None
        if d.get("answers") is not None:            # the true answer, when given, must be usable
            true = _need_first(r, _need(r, d, "answers", (list, str)), "answers")
    subject = _subject(r, d)
    rephrases = _opt_texts(r, d.get("rephrase"), "rephrase")
    loc = []
    if d.get("loc") is not None or d.get("loc_ans") is not None:
        p = _opt_text(r, d.get("loc"), "loc", "prompt")
        a = _opt_answer(r, d.get("loc_ans"), "loc_ans") if p is not None else None
        loc = [(p, a)] if a is not None else []
    port, kinds = _portability(r, d.get("portability"))
    meta = {k: d[k] for k in ("pred", "cond", "alt", "answers") if k in d}
    if kinds:
        meta["portability_kinds"] = kinds
    meta["zsre_target"] = zsre_target
    return EditRecord(src, new, true, subject, rephrases, loc, port, meta)


def _parse_easyedit(d, r: _Rec) -> EditRecord:
    prompt = _need_text(r, _need(r, d, "prompt"), "prompt", "prompt")
    new = _need_first(r, _need(r, d, "target_new", (str, list)), "target_new")
    true = None
    if d.get("ground_truth") is not None:           # the true answer, when given, must be usable
        true = _need_first(r, _need(r, d, "ground_truth", (str, list)), "ground_truth")
    subject = _subject(r, d)
    prompt = _fill(prompt, subject)
    rephrases = []
    for k in ("rephrase_prompt", "rephrase", "ood_rephrase"):
        rephrases += [_fill(x, subject) for x in _opt_texts(r, d.get(k), k)]
    loc, port, meta = [], [], {}
    if d.get("locality_prompt") is not None or d.get("locality_ground_truth") is not None:
        loc += _pairs(r, d.get("locality_prompt"), d.get("locality_ground_truth"), "locality",
                      "locality[0]")
    if d.get("locality") is not None:
        pairs, meta["locality_kinds"] = _nested(r, d["locality"], "locality")
        loc += pairs
    if d.get("portability") is not None:
        port, kinds = _portability(r, d["portability"])
        if kinds is not None:
            meta["portability_kinds"] = kinds
    for k in ("case_id", "cond"):
        if k in d:
            meta[k] = d[k]
    return EditRecord(prompt, new, true, subject, _unique(rephrases), loc, port, meta)


def _parse_counterfact(d, r: _Rec) -> EditRecord:
    rw = _need(r, d, "requested_rewrite", (dict,))
    rr = "requested_rewrite."
    subj = _need_text(r, _need(r, rw, "subject", fld=rr + "subject"), rr + "subject", "subject")
    tmpl = _need_text(r, _need(r, rw, "prompt", fld=rr + "prompt"), rr + "prompt", "prompt")
    if "{}" not in tmpl:
        raise r.err(rr + "prompt", f"no '{{}}' placeholder for the subject in {_short(tmpl)}")
    tn = _need(r, rw, "target_new", (dict,), fld=rr + "target_new")
    tt = _need(r, rw, "target_true", (dict,), fld=rr + "target_true")
    new = _need_text(r, _need(r, tn, "str", fld=rr + "target_new.str"), rr + "target_new.str", "target")
    true = _need_text(r, _need(r, tt, "str", fld=rr + "target_true.str"), rr + "target_true.str",
                      "target")
    para = _opt_texts(r, d.get("paraphrase_prompts"), "paraphrase_prompts")
    neigh = _opt_texts(r, d.get("neighborhood_prompts"), "neighborhood_prompts")
    meta = {"case_id": d.get("case_id"),
            "generation_prompts": _opt_texts(r, d.get("generation_prompts"), "generation_prompts")}
    return EditRecord(tmpl.replace("{}", subj), new, true, subj, para,
                      [(p, true) for p in neigh], [], meta)


def _parse_hallucination(d, r: _Rec) -> EditRecord:
    if "prompt" in d:                       # WikiBio edits, EasyEdit layout
        return _parse_easyedit(d, r)
    text = _need_text(r, _need(r, d, "text"), "text", "text")
    if "labels" in d or "concept" in d:     # WikiBio-A / KnowEdit WikiBio: the accurate sentence
        labels = _need_text(r, _need(r, d, "labels"), "labels", "target")
        loc, kinds = _nested(r, d.get("locality"), "locality")
        meta = {"kind": "wikibio"}
        if kinds:
            meta["locality_kinds"] = kinds
        return EditRecord(text, labels, None, _subject(r, d, "concept"), [], loc, [], meta)
    return EditRecord("", text, None, None, meta={"kind": "text"})   # OpenWebText: text alone


def _parse_jsonl(d, r: _Rec) -> EditRecord:
    """The project's own format, as save_jsonl writes it: its structure (types, [prompt, answer]
    pairs) is checked strictly; blank optional items are dropped like in every format."""
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise r.err(unknown[0], f"unknown field (fields: {', '.join(_FIELDS)})")
    prompt = _need_text(r, _need(r, d, "prompt"), "prompt", "prompt")
    new = _need_text(r, _need(r, d, "target_new"), "target_new", "target")
    true = None
    if d.get("target_true") is not None:
        true = _need_text(r, _need(r, d, "target_true"), "target_true", "target")
    subj = d.get("subject")
    if subj is not None and not isinstance(subj, str):
        raise r.err("subject", f"expected str, got {_tname(subj)}")
    subj = _subject(r, d)
    reph = d.get("rephrases") or []
    if not isinstance(reph, list) or not all(isinstance(x, str) for x in reph):
        raise r.err("rephrases", "expected a list of strings")
    reph = _opt_texts(r, reph, "rephrases")
    pairs = {}
    for key in ("locality", "portability"):
        v = d.get(key) or []
        if not isinstance(v, list):
            raise r.err(key, f"expected list, got {_tname(v)}")
        out = []
        for i, p in enumerate(v):
            if (not isinstance(p, (list, tuple)) or len(p) != 2
                    or not all(isinstance(x, str) for x in p)):
                raise r.err(f"{key}[{i}]", "expected a [prompt, answer] pair of strings")
            q = _opt_text(r, p[0], f"{key}[{i}]", "prompt")
            a = _opt_text(r, p[1], f"{key}[{i}]", "answer") if q is not None else None
            if a is not None:
                out.append((q, a))
        pairs[key] = out
    meta = d.get("meta") or {}
    if not isinstance(meta, dict):
        raise r.err("meta", f"expected dict, got {_tname(meta)}")
    return EditRecord(prompt, new, true, subj, reph, pairs["locality"],
                      pairs["portability"], dict(meta))


_PARSERS = {"easyedit": _parse_easyedit, "counterfact": _parse_counterfact,
            "hallucination": _parse_hallucination, "jsonl": _parse_jsonl}


def check_record(rec: EditRecord, require_subject: bool = False) -> None:
    """The checks of load_edits on a record made in code; the error names rec.meta["source"]."""
    _check(rec, rec.meta.get("source", "record"), None, require_subject)


def _check(rec: EditRecord, path, line, require_subject: bool) -> None:
    """Checks shared by every format (each raises DataError naming the field)."""
    if not rec.target_new.strip():
        raise _err(path, line, "target_new", "empty target")
    if not rec.prompt.strip() and rec.meta.get("kind") != "text":
        raise _err(path, line, "prompt", "empty prompt")
    if rec.target_true is not None and not rec.target_true.strip():
        raise _err(path, line, "target_true", "empty target")
    for i, r in enumerate(rec.rephrases):
        if not r.strip():
            raise _err(path, line, f"rephrases[{i}]", "empty prompt")
    for key in ("locality", "portability"):
        for i, (p, a) in enumerate(getattr(rec, key)):
            if not p.strip():
                raise _err(path, line, f"{key}[{i}]", "empty prompt")
            if not a.strip():
                raise _err(path, line, f"{key}[{i}]", "empty answer")
    if require_subject:
        if not rec.subject:
            raise _err(path, line, "subject", "missing field (this method needs the subject)")
        if rec.subject not in rec.prompt:
            other = re.search(re.escape(rec.subject), rec.prompt, re.IGNORECASE)
            if other:
                raise _err(path, line, "subject", f"{rec.subject!r} occurs in the prompt only with "
                                                  f"other case ({other.group(0)!r})")
            raise _err(path, line, "subject", f"{rec.subject!r} does not occur in the prompt "
                                              f"{_short(rec.prompt, 200)}")


def _note_where(x: dict) -> str:
    where = f"{x['file']}:{x['record']}"
    return f"{where}: {x['field']}: {x['why']}" if x.get("field") else f"{where}: {x['why']}"


def format_drops(notes) -> str | None:
    """The one summary line of load_edits' notes (None when there are none), per file:
    "FILE: dropped 2 unusable optional items (first: FILE:9202: locality[1]: empty answer)";
    lenient skips add "skipped 1 record with an unusable required field". Several files: their
    summaries joined by "; "."""
    if not notes:
        return None
    by_file: dict[str, list] = {}
    for x in notes:
        by_file.setdefault(x["file"], []).append(x)
    parts = []
    for f, xs in by_file.items():
        skipped = sum(1 for x in xs if x.get("skipped"))
        dropped = len(xs) - skipped
        what = []
        if dropped:
            what.append(f"dropped {dropped} unusable optional item{'s' * (dropped != 1)}")
        if skipped:
            what.append(f"skipped {skipped} record{'s' * (skipped != 1)} with an unusable "
                        "required field")
        parts.append(f"{f}: {', '.join(what)} (first: {_note_where(xs[0])})")
    return "; ".join(parts)


def load_edits(path, format: str | None = None, *, zsre_target: str = "answers",
               n: int | None = None, require_subject: bool = False, notes: list | None = None,
               lenient: bool = False) -> list[EditRecord]:
    """Load and validate edit records.

    path            a .json array file or a JSON-lines file (.jsonl, or any name when format is
                    None or "jsonl"); a leading UTF-8 BOM is accepted
    format          None (detect from the first record's keys) or one of FORMATS
    zsre_target     MEND ZsRE only: "answers" (target_new = answers[0], the ZsRE QA evaluation)
                    or "alt" (target_new = alt, target_true = answers[0]: a counterfactual edit)
    n               read only the first n records (None: all); what follows them is never
                    parsed, so it is never a reason to refuse the file
    require_subject every record must have a subject that occurs in its prompt (ROME/MEMIT/NSE)
    notes           a list: one dict per dropped optional item is appended, {"file": str(path),
                    "record": LINE, "field": "locality.Relation_Specificity[1]", "why": "empty
                    answer"} (lenient skips: field, why of the error and "skipped": True). None:
                    one DataWarning per file instead, the line of `format_drops`
    lenient         records with an unusable REQUIRED field (and, in JSON lines, lines that are
                    not JSON) are skipped and noted instead of raising (reading a whole file for
                    relation probes); n counts them among the records read

    Required: the prompt, the target, a true answer the file gives, the subject under
    require_subject, the structure of the project's own format. A problem with one of them is a
    DataError('FILE:LINE: FIELD: what was expected, what was found') raised before returning
    anything (notes are only appended on success). Optional items (rephrases, locality and
    portability pairs, a subject not required, generation prompts) that are empty, blank, null,
    of another type, or a locality/portability entry whose prompts and answers do not pair up,
    are dropped and noted. Repairs, silently: NFC normalisation and the removal of C0 control
    characters but tab/newline/CR in every text field (so a subject written in NFD is found in
    an NFC prompt); a '{}' placeholder in a prompt filled with the subject (WISE temporal);
    duplicate rephrases of one record removed. Duplicate records are kept, not noted: a
    sequential edit stream may repeat an edit. No length limit: a 1 MB string loads (the harness
    checks token lengths against the model's context).
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise DataError(f"{path}: format: {format!r} is not one of {', '.join(FORMATS)}")
    if zsre_target not in ("answers", "alt"):
        raise DataError(f"{path}: zsre_target: {zsre_target!r} is not 'answers' or 'alt'")
    if n is not None and n < 1:
        raise DataError(f"{path}: n: must be >= 1, got {n}")
    text, bad = _read_text(path)
    i = _WS.match(text, 0).end()
    if i >= len(text):
        if bad is not None:
            raise bad
        raise _err(path, 1, None, "empty file")
    found: list[dict] = []

    def skipped(e: DataError):
        found.append({"file": str(path), "record": e.line, "field": e.field, "why": e.why,
                      "skipped": True})

    lines_mode = text[i] != "[" and (format == "jsonl" or path.suffix.lower() == ".jsonl"
                                     or (format is None and text[i] == "{"))
    if lines_mode:
        if bad is not None:                 # a record cut by the bad byte is never parsed
            text = text[:text.rfind("\n") + 1]
        items = _jsonl(path, text, n, skipped if lenient else None)
    else:
        items = _json_array(path, text, n)
    out: list[EditRecord] = []
    fmt = format
    for line, obj in _until_bad_byte(items, bad, n):
        r = _Rec(path, line, require_subject)
        try:
            if not isinstance(obj, dict):
                raise _err(path, line, None, f"expected a JSON object (a record), got {_jtype(obj)}")
            f = fmt or detect_format(obj)
            if f is None:
                raise _err(path, line, None, "cannot tell the format from the keys "
                           f"{sorted(obj)}; give format= one of {', '.join(FORMATS)}")
            if f == "zsre":
                rec = _parse_zsre(obj, r, zsre_target)
            else:
                rec = _PARSERS[f](obj, r)
            _check(rec, path, line, require_subject)
        except DataError as e:
            if not lenient:
                raise
            skipped(e)
            continue
        fmt = f
        found += [{"file": str(path), "record": line, "field": fld, "why": why}
                  for fld, why in r.drops]
        rec.meta.setdefault("source", f"{path.name}:{line}")
        out.append(rec)
    if not out:
        if found:
            raise _err(path, None, None, f"no usable records ({format_drops(found)})")
        raise _err(path, None, None, "no records")
    if notes is not None:
        notes.extend(found)
    elif found:
        warnings.warn(format_drops(found), DataWarning, stacklevel=2)
    return out


def corpus_chunks(tok, text: str, n_tokens: int, chunk: int):
    """Consecutive token chunks of the corpus (split at line ends), n_tokens in all."""
    chunks, cur, total = [], [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        cur += tok.encode(line + "\n", bos=False)
        while len(cur) >= chunk and total < n_tokens:
            take = cur[:min(chunk, n_tokens - total)]
            chunks.append(take)
            total += len(take)
            cur = cur[chunk:]
        if total >= n_tokens:
            return chunks
    if cur and total < n_tokens:
        chunks.append(cur[:n_tokens - total])
    return chunks


# --------------------------------------------------------------------------------------------
# Same-subject probes: the edited subject's OTHER relations ("other attribution" side effects)
# --------------------------------------------------------------------------------------------
SUBJ = "\x00"


def subject_template(text: str, subject: str | None) -> str | None:
    """The relation's template: `text` with its last `subject` replaced by a placeholder, from the
    sentence that holds it on (CounterFact rephrases start with an unrelated sentence)."""
    if not subject or subject not in text:
        return None
    i = text.rindex(subject)
    head = text[:i]
    cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    return (head[cut + 2:] if cut >= 0 else head) + SUBJ + text[i + len(subject):]


def relation_probes(records, bank, k: int = 4, seed: int = 0, min_count: int = 20) -> list[list[str]]:
    """Per record: k prompts about the SAME subject that ask OTHER relations. The data has no
    relation ids, so a relation is told by its answers: a prompt template of `bank` (records of
    the same dataset, e.g. the whole edit file) used by at least `min_count` records is a probe
    candidate for an edit when no true answer of its records is a true answer of the edit's own
    template (native / official / original language share answers, so none of them probes
    another), and the k probes of an edit share no answers with one another either (k different
    questions). Drawn per record, seeded by the seed and the record's prompt (the same for any --n)."""
    answers: dict[str, set] = {}
    count: dict[str, int] = {}
    for r in bank:
        t = subject_template(r.prompt, r.subject)
        if t is not None and r.target_true:
            answers.setdefault(t, set()).add(r.target_true)
            count[t] = count.get(t, 0) + 1
    common = sorted(t for t in answers if count[t] >= min_count)
    out = []
    for r in records:
        own = set(answers.get(subject_template(r.prompt, r.subject), ()))
        own |= {r.target_true, r.target_new} - {None}
        cands = [t for t in common if not answers[t] & own]
        random.Random(f"{seed}:{r.prompt}").shuffle(cands)
        picked, used = [], set(own)
        for t in cands:
            if len(picked) < k and not answers[t] & used:
                picked.append(t)
                used |= answers[t]
        out.append([t.replace(SUBJ, r.subject) for t in picked])
    return out


# Other relations in our own phrasings (none is a CounterFact or ZsRE prompt): a completion, a
# question, and the words that mark the relation in someone else's phrasing. These are the prompts an
# edit method can make from an edit alone to ask about its subject's OTHER facts (NSE's
# --kl-relations, SCEN's --own-neg relations).
OTHER_RELATIONS = [
    ("{} was born in the city of", "In which city was {} born?", "born birth birthplace city"),
    ("{} holds the citizenship of", "Which country is {} a citizen of?", "citizen citizenship country nationality"),
    ("{} has worked for", "Who has {} worked for?", "work works worked employer employed employs"),
    ("{} is mainly known as a", "What is {} mainly known as?", "known profession occupation position plays"),
    ("The first language of {} is", "What is the first language of {}?", "language tongue speak speaks native"),
    ("{} can be found in the country of", "In which country can {} be found?", "country located location found"),
    ("{} was established by", "Who established {}?", "established founded founder created developed owned"),
    ("{} comes from the company", "Which company does {} come from?", "company developed produced product made"),
]
_FUNCTION_WORDS = {"which", "what", "where", "when", "whom", "whose", "does", "from", "that", "with", "have",
                   "been", "this", "there", "their", "into", "about", "were", "will", "would", "then", "than"}


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3} - _FUNCTION_WORDS


def other_relation_prompts(subject: str, prompt: str, question: bool, n: int = 8) -> list[str]:
    """Up to n prompts that ask other relations of `subject` (OTHER_RELATIONS, as questions or as
    completions), leaving out every relation that shares a word with the edit's own prompt (its
    phrasing's content words or its marker words: the edit may ask that relation, reworded)."""
    own = _content_words(prompt.replace(subject, " "))
    out = []
    for comp, quest, marks in OTHER_RELATIONS:
        p = quest if question else comp
        if not (_content_words(comp + " " + quest) | set(marks.split())) & own:
            out.append(p.format(subject))
    return out[:n]


def sentence_prefixes(prompt: str) -> list[str]:
    """`prompt` cut after each of its sentences but the last (a passage's earlier contexts): "A. B. C"
    -> ["A.", "A. B."]. A one-sentence prompt has none."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", prompt)]
    return [prompt[:i] for i in ends if prompt[i:].strip()]


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file in the same folder + os.replace)."""
    llama.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_jsonl(records, path) -> None:
    """Write records in the project's JSONL format (one EditRecord per line), atomically.

    Each line is a JSON object with the keys prompt, target_new, target_true, subject,
    rephrases, locality ([[prompt, answer], ...]), portability, meta. `load_edits` reads it back.
    """
    lines = [json.dumps(r.to_dict() if isinstance(r, EditRecord) else r, ensure_ascii=False)
             for r in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# --------------------------------------------------------------------------------------------
# Templates and tokenisation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """How a prompt and its target become text.

    kind "raw"    the prompt as is, then the target after one space (completion, CounterFact):
                  "The capital of France is" + " Paris". A trailing space of the prompt moves to
                  the target ("is " + "Paris" -> "is" + " Paris"), because tokenizers attach a
                  space to the word after it; no space is added after a newline or when the
                  target already starts with whitespace, or when the prompt is empty.
    kind "llama2" SCEN's official text, no spaces and no system prompt:
                  "[INST]{question}[/INST]" + "{answer}", ended by </s> (EOS).
    kind "chatml" the checkpoint's ChatML chat template (llama.format_chat: one user turn, the
                  assistant turn opened), answer appended directly, ended by <|im_end|>.
    kind "llama3" Llama 3's header-token chat template (llama.format_chat): "<|start_header_id|>
                  user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant
                  <|end_header_id|>\n\n" + "{answer}", ended by <|eot_id|>.
    system        chatml only: the system message; None = the template's default system turn
                  (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."), "" = no system
                  turn at all ("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").
    """
    kind: str = "raw"
    system: str | None = None

    def __post_init__(self):
        if self.kind not in TEMPLATES:
            raise ValueError(f"template: {self.kind!r} is not one of {', '.join(TEMPLATES)}")

    def prompt_text(self, tokenizer, prompt: str) -> str:
        """The text the model reads before it answers."""
        if self.kind == "raw":
            return prompt
        if self.kind == "llama2":
            return f"[INST]{prompt}[/INST]"
        if getattr(tokenizer, "chat_format", None) != self.kind:
            raise ValueError(f"template {self.kind}: this tokenizer's chat format is "
                             f"{getattr(tokenizer, 'chat_format', None)!r}, not {self.kind}")
        if self.kind == "llama3":
            return llama.format_chat(tokenizer, prompt, system=self.system or None)
        if self.system == "":           # no system turn at all (SmolLM2's template would add its default)
            text = llama.format_chat(tokenizer, prompt, system="")
            head = "<|im_start|>system\n<|im_end|>\n"
            return text[len(head):] if text.startswith(head) else text
        return llama.format_chat(tokenizer, prompt, system=self.system)

    def split(self, tokenizer, prompt: str, target: str) -> tuple[str, str]:
        """(prompt text, target text) with the separating space handled (see the class doc)."""
        p = self.prompt_text(tokenizer, prompt)
        if self.kind != "raw":
            return p, target.strip()
        if not p or target[:1].isspace() or p.endswith("\n"):
            return p, target
        return p.rstrip(" "), " " + target.lstrip(" ")

    def end_id(self, tokenizer) -> int | None:
        """The token that closes an answer: <|im_end|> for chatml, else the tokenizer's EOS."""
        if self.kind in ("chatml", "llama3"):
            ids = tokenizer.encode("<|im_end|>" if self.kind == "chatml" else "<|eot_id|>", bos=False)
            if len(ids) == 1:
                return ids[0]
        return tokenizer.eos_id

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings at which a generated answer is cut (SCEN cuts at '[/INST]' and '</s>')."""
        if self.kind == "llama2":
            return ("[/INST]", "[INST]", "</s>")
        if self.kind == "chatml":
            return ("<|im_end|>", "<|im_start|>")
        if self.kind == "llama3":
            return ("<|eot_id|>", "<|start_header_id|>")
        return ("\n",)


def template_for(tokenizer, name: str = "auto", system: str | None = None) -> Template:
    """Pick a template by name; "auto" follows the tokenizer's chat format.

    auto: the chat format of the checkpoint's tokenizer_config (llama.load_tokenizer): chatml ->
    "chatml", llama3 -> "llama3", llama2 -> "llama2" (SCEN's no-space form); none -> "raw".
    """
    if name == "auto":
        fmt = getattr(tokenizer, "chat_format", "none")
        name = fmt if fmt in ("chatml", "llama2", "llama3") else "raw"
    return Template(name, system)


# How the model's own questions start under a chat template (model_questions): the questions an
# edit method guards against are factual ones, and a bare user turn gets fragments and code.
QUESTION_OPENERS = ("What is", "Who is", "Who was", "When was", "Where is", "Which", "In which", "What is the name of")


def model_questions(model, tokenizer, template: Template, n: int = 1000, *, seed: int = 0,
                    max_new_tokens: int = 24, batch: int = 50, openers=QUESTION_OPENERS,
                    progress=None) -> list[str]:
    """Prompts of the kind the model is asked, written by the model itself: the template's text up
    to where a user's prompt goes ("<|im_start|>user\n", "[INST]", ...), then (chat templates) one of
    `openers` in turn per batch, continued by sampling (temperature 1, top-k 50, seeded) until the
    user's turn ends. Distinct, non-empty, n of them (fewer if the model repeats itself: at most 4n
    samples). Used where a method needs unrelated prompts and none are given (SCEN's negatives), as
    NSE's C0 uses the model's own text."""
    mark = "\x07"
    text = template.prompt_text(tokenizer, mark)
    head = text[:text.index(mark)]
    start = tokenizer.encode(head) or [tokenizer.eos_id]
    openers = list(openers) if template.kind != "raw" and openers else [""]
    # per opener: (the ids generation starts from, the opener's own ids, decoded with the answer)
    starts = [(start, [])] if openers == [""] else [
        (ids, ids[len(start):] if ids[:len(start)] == start else tokenizer.encode(o, bos=False))
        for o, ids in ((o, tokenizer.encode(head + o)) for o in openers)]
    end = template.end_id(tokenizer)
    g, out, seen, tries = torch.Generator().manual_seed(seed), [], set(), 0
    while len(out) < n and tries < 4 * n:
        k = (tries // batch) % len(openers)
        opener, (ids, own) = openers[k], starts[k]
        new = llama.generate(model, [ids] * batch, max_new_tokens, temperature=1.0, top_k=50, generator=g,
                             eos_ids=[] if end is None else [end], tokenizer=tokenizer,
                             stop_strings=template.stop_strings, pad_id=tokenizer.pad_id or 0)
        tries += batch
        for seq in new:
            q = tokenizer.decode(own + seq, skip_special=True)
            for s in template.stop_strings:
                q = q.split(s)[0]
            q = q.strip()
            if q and q != opener and q not in seen and len(out) < n:
                seen.add(q)
                out.append(q)
        if progress is not None:                          # progress(questions written, n)
            progress(len(out), n)
    return out


class Encoded(NamedTuple):
    """Token ids of prompt + target (+ end token).

    ids           full sequence (BOS if the tokenizer adds one, prompt, target, optional end)
    target_start  index of the first target token (= number of prompt tokens)
    target_end    index one past the last target token (the end token, if any, sits here)
    how           "joint" (prompt+target encoded together, prompt tokens unchanged) or
                  "separate" (a merge across the boundary changed the prompt's tokens, so the
                  target was encoded on its own and appended)
    """
    ids: list[int]
    target_start: int
    target_end: int
    how: str


def encode_prompt(tokenizer, template: Template, prompt: str) -> list[int]:
    """Token ids of the prompt alone, exactly as `encode_prompt_target` starts them."""
    p, _ = template.split(tokenizer, prompt, "x")
    return tokenizer.encode(p)


def encode_prompt_target(tokenizer, template: Template, prompt: str, target: str,
                         add_eos: bool | None = None) -> Encoded:
    """Tokenise prompt + target so that the target ids are what the model generates after the prompt.

    1. text: (P, T) = template.split(prompt, target) (leading-space trap handled there).
    2. p = encode(P); j = encode(P + T). If j starts with p, the target ids are j[len(p):]
       ("joint"): the tokens a model produces when it continues exactly the prompt ids that
       generation feeds it.
    3. Otherwise a BPE merge crossed the boundary (e.g. "...is " + "Paris" tokenised jointly
       as "is", " Paris"); the prompt ids must stay those of step 2's p, so the target is
       encoded on its own without BOS ("separate"). For a SentencePiece tokenizer that adds a
       dummy-prefix space, a target starting with one space is encoded without it, so that
       decode(p + t) == P + T.
    add_eos: append the template's end token (EOS / <|im_end|>); default True for the chat
    templates, False for raw.
    """
    if add_eos is None:
        add_eos = template.kind != "raw"
    P, T = template.split(tokenizer, prompt, target)
    p = tokenizer.encode(P)
    j = tokenizer.encode(P + T)
    if j[:len(p)] == p and len(j) > len(p):
        t, how = j[len(p):], "joint"
    else:
        t, how = _encode_continuation(tokenizer, p, T), "separate"
    ids = p + t
    end = len(ids)
    if add_eos:
        e = template.end_id(tokenizer)
        if e is None:
            raise ValueError("add_eos: the tokenizer has no EOS token")
        ids = ids + [e]
    return Encoded(ids, len(p), end, how)


def _encode_continuation(tokenizer, p: list[int], T: str) -> list[int]:
    """Ids of T as a continuation of the ids p, without a BOS or a spurious leading space.

    Candidates, the first whose decoding extends p's decoding by exactly T wins:
    encode(T); encode(X + T) minus encode(X) for a sentinel X = "\n" (no SentencePiece
    dummy-prefix space then lands on T); encode(T[1:]) when T starts with a space (the dummy
    prefix supplies it). If none checks out, the sentinel's ids are used.
    """
    base = tokenizer.decode(p)
    cands = [tokenizer.encode(T, bos=False)]
    for x in ("\n", "\n\n"):
        a, b = tokenizer.encode(x, bos=False), tokenizer.encode(x + T, bos=False)
        if b[:len(a)] == a:
            cands.append(b[len(a):])
            break
    if T.startswith(" "):
        cands.append(tokenizer.encode(T[1:], bos=False))
    for c in cands:
        if c and tokenizer.decode(p + c) == base + T:
            return c
    return cands[1] if len(cands) > 1 else cands[0]


class Batch(NamedTuple):
    """A padded batch.

    tokens          (B, T) long, padded with pad_id
    attention_mask  (B, T) long, 1 = token, 0 = padding
    labels          (B, T) long, = tokens on target positions, -100 on prompt and padding
                    (unshifted: the logits at position t-1 predict labels[t])
    prompt_end      (B,) long, index of each row's last prompt token in the padded layout
                    (where SCEN reads its routing features); -1 if the row has no prompt
    """
    tokens: "object"
    attention_mask: "object"
    labels: "object"
    prompt_end: "object"


def collate(seqs, pad_id: int, side: str = "right", target_starts=None) -> Batch:
    """Pad token lists into a Batch.

    seqs           list of token-id lists, or list of Encoded
    pad_id         padding id (use the tokenizer's pad id, else EOS)
    side           "right" (training, teacher forcing) or "left" (generation)
    target_starts  per row, the index of the first target token (taken from Encoded when given);
                   None and plain lists: every non-pad token is a label (language modelling)
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: {side!r} is not 'left' or 'right'")
    if not seqs:
        raise ValueError("collate: no sequences")
    if target_starts is None and isinstance(seqs[0], Encoded):
        target_starts = [e.target_start for e in seqs]
    ids = [list(e.ids) if isinstance(e, Encoded) else list(e) for e in seqs]
    if any(len(s) == 0 for s in ids):
        raise ValueError("collate: empty sequence")
    if target_starts is None:
        target_starts = [0] * len(ids)
    T = max(len(s) for s in ids)
    B = len(ids)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    pend = torch.zeros(B, dtype=torch.long)
    for i, (s, ts) in enumerate(zip(ids, target_starts)):
        off = 0 if side == "right" else T - len(s)
        row = torch.tensor(s, dtype=torch.long)
        tokens[i, off:off + len(s)] = row
        mask[i, off:off + len(s)] = 1
        labels[i, off + ts:off + len(s)] = row[ts:]
        pend[i] = off + ts - 1 if ts > 0 else -1
    return Batch(tokens, mask, labels, pend)


# --------------------------------------------------------------------------------------------
# The demo world
# --------------------------------------------------------------------------------------------
DEMO_VERSION = "demo-world-2"

# Phrasings per relation: QA questions (SCEN, [INST] template) and completion prompts with the
# subject inside (NSE, raw template). The first of each list is the edit prompt, the others are
# its rephrases.
DEMO_RELATIONS = {
    "born_in": {"subject": "person", "object": "city",
                "qa": ["Where was {s} born?", "In which city was {s} born?",
                       "What is the birthplace of {s}?"],
                "completion": ["{s} was born in", "The birthplace of {s} is"]},
    "works_for": {"subject": "person", "object": "org",
                  "qa": ["Who does {s} work for?", "Which company employs {s}?",
                         "What is the employer of {s}?"],
                  "completion": ["{s} works for", "{s} is employed by"]},
    "speaks": {"subject": "person", "object": "language",
               "qa": ["What language does {s} speak?", "Which language is spoken by {s}?",
                      "What is the mother tongue of {s}?"],
               "completion": ["{s} speaks the language", "The mother tongue of {s} is"]},
    "based_in": {"subject": "org", "object": "city",
                 "qa": ["Where is {s} based?", "In which city is {s} headquartered?",
                        "Where are the offices of {s}?"],
                 "completion": ["{s} is based in", "The headquarters of {s} are in"]},
    "in_country": {"subject": "city", "object": "country",
                   "qa": ["Which country is {s} in?", "In which country is {s} located?",
                          "What country does {s} belong to?"],
                   "completion": ["{s} is a city in", "{s} is located in"]},
    "capital": {"subject": "country", "object": "city",
                "qa": ["What is the capital of {s}?", "Which city is the capital of {s}?",
                       "Where is the government of {s}?"],
                "completion": ["The capital of {s} is", "The capital city of {s} is"]},
}

# The NSE demo's completions end with the subject, so that its last token is where the answer is
# read. On a pretrained model a fact is recalled at the subject's last token whatever follows (ROME's
# causal tracing, which NSE / MEMIT / AlphaEdit build on); a 6-layer model trained on 210 facts reads
# the person off the prompt's last token instead (measured: with "{s} works for", even an
# unconstrained z at the subject flips 15 of 30 edits), so the demo puts the two tokens together.
DEMO_SUBJECT_LAST = {
    "born_in": ["The birthplace of {s}", "The city of birth of {s}"],
    "works_for": ["The employer of {s}", "The company employing {s}"],
    "speaks": ["The mother tongue of {s}", "The language spoken by {s}"],
    "based_in": ["The home city of {s}", "The headquarters city of {s}"],
    "in_country": ["The country of {s}", "The nation containing {s}"],
    "capital": ["The capital of {s}", "The capital city of {s}"],
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "th", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]


@dataclass
class DemoFact:
    subject: str
    relation: str
    answer: str


@dataclass
class DemoWorld:
    """Everything the demo needs, all derived from the seed.

    facts        every fact of the world
    train        QA records (llama2 template) and completion records (raw template) of every
                 fact in every phrasing: meta["style"] = "qa" | "completion"; target_new = the
                 true answer. The demo model is trained on all of them.
    edits_qa     SCEN-style edits: question -> counterfactual answer; rephrases = the other
                 questions of the relation; locality = questions about unedited facts.
    edits_cf     NSE/CounterFact-style edits: completion prompt with the subject inside ->
                 counterfactual answer, target_true, rephrases = the other completion prompt,
                 locality = neighbours (unedited subjects with the same relation, preferably the
                 same true answer, never target_new as their answer) with their true answers.
    loc_qa       QA records of facts no edit touches (D_loc for the "still correct" Locality)
    unrelated_qa QA records (every phrasing) of the facts of other unedited subjects, none of them
                 in loc_qa: the questions SCEN's neurons learn not to fire on (its --unrelated)
    corpus       plain sentences stating the facts (text statistics, e.g. NSE's covariance)
    """
    seed: int
    facts: list[DemoFact]
    train: list[EditRecord]
    edits_qa: list[EditRecord]
    edits_cf: list[EditRecord]
    loc_qa: list[EditRecord]
    unrelated_qa: list[EditRecord]
    corpus: list[str]


def _make_names(rng: random.Random, k: int, syllables: tuple[int, int], taken: set,
                suffixes=("",)) -> list[str]:
    out = []
    while len(out) < k:
        n = rng.randint(*syllables)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(n)) + rng.choice(suffixes)
        w = w.capitalize()
        if len(w) < 4 or w in taken or any(w in t or t in w for t in taken):
            continue
        taken.add(w)
        out.append(w)
    return out


def demo_world(seed: int = 0, n_people: int = 60, n_countries: int = 5, cities_per_country: int = 3,
               n_orgs: int = 10, n_edits: int = 30, n_locality: int = 2,
               completions: dict | None = None) -> DemoWorld:
    """Generate the demo world deterministically from `seed` (same seed -> same world).

    Entities: invented countries (each with a language and `cities_per_country` cities, the
    first being the capital), organisations based in cities, and people born in a city,
    working for an organisation and speaking a language. Relations and phrasings: see
    DEMO_RELATIONS. Edits: `n_edits` facts of distinct subjects, each given another value of
    the same kind as its counterfactual target. `completions`: relation -> completion phrasings
    replacing DEMO_RELATIONS' (e.g. DEMO_SUBJECT_LAST); the facts and edits stay the same.
    """
    rng = random.Random(seed)
    taken: set = set()
    countries = _make_names(rng, n_countries, (2, 2), taken, ("ia", "and", "ora"))
    languages = []
    for c in countries:
        stem = c[:-3] if c.endswith(("ora", "and")) else c[:-2]
        lang = stem + rng.choice(["ish", "ese", "ic"])
        while lang in taken:
            lang = stem + "ian"
        taken.add(lang)
        languages.append(lang)
    cities = _make_names(rng, n_countries * cities_per_country, (2, 3), taken)
    org_heads = _make_names(rng, n_orgs, (2, 2), taken)
    orgs = [h + " " + rng.choice(["Works", "Institute", "Mills", "Bank", "Press", "Labs"])
            for h in org_heads]
    firsts = _make_names(rng, n_people, (2, 2), taken)
    lasts = _make_names(rng, n_people, (2, 3), taken)
    people = [f + " " + l for f, l in zip(firsts, lasts)]

    facts: list[DemoFact] = []
    city_country = {}
    for i, c in enumerate(countries):
        cs = cities[i * cities_per_country:(i + 1) * cities_per_country]
        facts.append(DemoFact(c, "capital", cs[0]))
        for x in cs:
            city_country[x] = c
            facts.append(DemoFact(x, "in_country", c))
    for o in orgs:
        facts.append(DemoFact(o, "based_in", rng.choice(cities)))
    for p in people:
        facts.append(DemoFact(p, "born_in", rng.choice(cities)))
        facts.append(DemoFact(p, "works_for", rng.choice(orgs)))
        facts.append(DemoFact(p, "speaks", rng.choice(languages)))
    values = {"city": cities, "org": orgs, "language": languages, "country": countries}
    phrasings = {r: (completions or {}).get(r, v["completion"]) for r, v in DEMO_RELATIONS.items()}

    def qa(f, k):
        return DEMO_RELATIONS[f.relation]["qa"][k].format(s=f.subject)

    def comp(f, k):
        return phrasings[f.relation][k].format(s=f.subject)

    train, corpus = [], []
    for f in facts:
        rel = DEMO_RELATIONS[f.relation]
        for k in range(len(rel["qa"])):
            train.append(EditRecord(qa(f, k), f.answer, subject=f.subject,
                                    meta={"style": "qa", "relation": f.relation, "phrasing": k}))
        for k in range(len(phrasings[f.relation])):
            train.append(EditRecord(comp(f, k), f.answer, subject=f.subject,
                                    meta={"style": "completion", "relation": f.relation,
                                          "phrasing": k}))
            corpus.append(f"{comp(f, k)} {f.answer}.")

    # edits: person facts first (the richest relations), distinct subjects, shuffled
    order = list(range(len(facts)))
    rng.shuffle(order)
    order.sort(key=lambda i: facts[i].relation not in ("born_in", "works_for", "speaks"))
    chosen, used = [], set()
    for i in order:
        if facts[i].subject not in used and len(chosen) < n_edits:
            chosen.append(i)
            used.add(facts[i].subject)
    unedited = [i for i in range(len(facts)) if facts[i].subject not in used]
    edits_qa, edits_cf = [], []
    for i in chosen:
        f = facts[i]
        rel = DEMO_RELATIONS[f.relation]
        new = rng.choice([v for v in values[rel["object"]] if v != f.answer])
        loc_idx = rng.sample(unedited, min(n_locality, len(unedited)))
        meta = {"relation": f.relation, "fact": i}
        edits_qa.append(EditRecord(qa(f, 0), new, f.answer, f.subject,
                                   [qa(f, k) for k in range(1, len(rel["qa"]))],
                                   [(qa(facts[j], 0), facts[j].answer) for j in loc_idx],
                                   [], dict(meta, style="qa")))
        same = [j for j in unedited if facts[j].relation == f.relation and facts[j].answer == f.answer]
        other = [j for j in unedited if facts[j].relation == f.relation
                 and facts[j].answer not in (f.answer, new)]
        neigh = rng.sample(same, min(n_locality, len(same)))
        neigh += rng.sample(other, min(len(other), n_locality - len(neigh)))
        edits_cf.append(EditRecord(comp(f, 0), new, f.answer, f.subject,
                                   [comp(f, k) for k in range(1, len(phrasings[f.relation]))],
                                   [(comp(facts[j], 0), facts[j].answer) for j in neigh],
                                   [], dict(meta, style="completion")))
    # the unedited subjects in two halves: Locality is asked about one, the other's questions are
    # the unrelated prompts a method may learn from (so Locality is measured on held-out subjects)
    others = sorted({facts[j].subject for j in unedited})
    rng.shuffle(others)
    held = set(others[::2])
    loc_qa = [EditRecord(qa(facts[j], 0), facts[j].answer, subject=facts[j].subject,
                         meta={"relation": facts[j].relation, "fact": j, "style": "qa"})
              for j in unedited if facts[j].subject not in held]
    unrelated_qa = [EditRecord(qa(facts[j], k), facts[j].answer, subject=facts[j].subject,
                               meta={"relation": facts[j].relation, "fact": j, "style": "qa"})
                    for j in unedited if facts[j].subject in held
                    for k in range(len(DEMO_RELATIONS[facts[j].relation]["qa"]))]
    return DemoWorld(seed, facts, train, edits_qa, edits_cf, loc_qa, unrelated_qa, corpus)
