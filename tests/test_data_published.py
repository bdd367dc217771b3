"""data.load_edits on published editing benchmark files as they are (KnowEdit, EasyEdit, MEND
ZsRE .json/.jsonl, ROME CounterFact, WISE), the notes of dropped optional items, lenient
reading, and one decided outcome per kind of bad input. Every file is written here."""
import json
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import DataError, EditRecord  # noqa: E402


def write_array(tmp_path, name, recs) -> Path:
    """A JSON array, one record per line after "[": record k (0-based) is on line k + 2."""
    p = tmp_path / name
    p.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n]\n",
                 encoding="utf-8")
    return p


def write_lines(tmp_path, name, recs) -> Path:
    """JSON lines: record k (0-based) is on line k + 1."""
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return p


def write_raw(tmp_path, name, content) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def error_of(path, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        data.load_edits(path, *args, **kw)
    msg = str(e.value)
    assert "\n" not in msg                              # one line
    assert msg.startswith(str(path))                    # names the file
    return msg


def load_noted(path, *args, **kw):
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # with notes given, nothing is warned
        recs = data.load_edits(path, *args, notes=notes, **kw)
    return recs, notes


# ---------------------------------------------------------------------------------------------
# Published shapes
# ---------------------------------------------------------------------------------------------
KNOWEDIT_ZSRE = {
    "subject": "Watts Humphrey", "target_new": "University of Michigan",
    "prompt": "What university did Watts Humphrey attend?", "ground_truth": ["Illinois Institute of Technology"],
    "rephrase_prompt": "What university did Watts Humphrey take part in?",
    "cond": "Illinois Institute of Technology >> University of Michigan || What university did Watts Humphrey attend?",
    "locality": {"Relation_Specificity": [
        {"prompt": "The name of the sports team which Watts Humphrey is a member of is", "ground_truth": ["Detroit Lions"]},
        {"prompt": "The occupation of Watts Humphrey is", "ground_truth": [""]}]},
    "portability": {
        "Reasoning": [{"prompt": "What is the university's sports team called?", "ground_truth": [["Michigan Wolverines", "Wolverines"]]}],
        "Logical_Generalization": [],
        "Subject_Aliasing": [{"prompt": "What university did Watts S. Humphrey attend?", "ground_truth": ["University of Michigan"]}]}}


def test_knowedit_zsre_nested_lists_and_an_empty_locality_answer_dropped(tmp_path):
    p = write_array(tmp_path, "ZsRE-test-all.json", [KNOWEDIT_ZSRE])
    (r,), notes = load_noted(p, require_subject=True)
    assert (r.prompt, r.target_new, r.target_true, r.subject) == (
        "What university did Watts Humphrey attend?", "University of Michigan", "Illinois Institute of Technology",
        "Watts Humphrey")
    assert r.rephrases == ["What university did Watts Humphrey take part in?"]
    assert r.locality == [("The name of the sports team which Watts Humphrey is a member of is", "Detroit Lions")]
    assert r.portability == [("What is the university's sports team called?", "Michigan Wolverines"),
                             ("What university did Watts S. Humphrey attend?", "University of Michigan")]
    assert r.meta["locality_kinds"] == {"Relation_Specificity": 1}
    assert r.meta["portability_kinds"] == {"Reasoning": 1, "Logical_Generalization": 0, "Subject_Aliasing": 1}
    assert notes == [{"file": str(p), "record": 2, "field": "locality.Relation_Specificity[1]", "why": "empty answer"}]


def test_knowedit_counterfact_rephrase_key_and_string_ground_truths(tmp_path):
    rec = {"subject": "Kuala Langat", "prompt": "Kuala Langat, located in", "target_new": "India",
           "ground_truth": "Malaysia", "rephrase": "Kuala Langat's surroundings include",
           "rephrase_prompt": "Kuala Langat's surroundings include",          # the same: kept once
           "locality": {"Relation_Specificity": [{"prompt": "The twin city of Kuala Langat is", "ground_truth": "Klang"}],
                        "Forgetfulness": [{"prompt": "Kuala Langat, located in India, has the time zone",
                                           "ground_truth": "UTC+08:00"}]},
           "portability": {"Subject_Aliasing": [{"prompt": "Kuala Langat District, located in", "ground_truth": "India"}],
                           "Reasoning": [{"prompt": "The capital of the country of Kuala Langat is",
                                          "ground_truth": ["New Delhi", "Delhi"]}]}}
    (r,), notes = load_noted(write_array(tmp_path, "counterfact-test.json", [rec]))
    assert notes == []
    assert (r.target_new, r.target_true) == ("India", "Malaysia")
    assert r.rephrases == ["Kuala Langat's surroundings include"]
    assert r.locality == [("The twin city of Kuala Langat is", "Klang"),
                          ("Kuala Langat, located in India, has the time zone", "UTC+08:00")]
    assert r.portability == [("Kuala Langat District, located in", "India"),
                             ("The capital of the country of Kuala Langat is", "New Delhi")]


def test_knowedit_recent_one_prompt_four_answers_prompt_lists_and_mismatch(tmp_path):
    rec = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
           "rephrase": "Leo Arons died in the city of",
           "locality": {"Relation_Specificity": [
               {"prompt": "The name of the country of citizenship of Leo Arons is",
                "ground_truth": [["Germany"], ["German Empire"], ["Kingdom of Prussia"], ["Prussia"]]},   # 1 prompt, 4 answers
               {"prompt": ["The gender of Leo Arons is"], "ground_truth": ["male", "man", "masculine", "he"]},
               {"prompt": ["The father of Leo Arons is", "The mother of Leo Arons is"],
                "ground_truth": [["Albert Arons"], ["Johanna Arons"]]},
               {"prompt": ["The spouse of Leo Arons is", "The child of Leo Arons is", "The sibling of Leo Arons is"],
                "ground_truth": ["Johanna", "Hans"]}]},                                      # 3 prompts, 2 answers
           "portability": {"Logical_Generalization": [
               {"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"], ["false"]]}]}}
    p = write_array(tmp_path, "recent_test.json", [rec])
    (r,), notes = load_noted(p)
    assert r.target_true is None and r.rephrases == ["Leo Arons died in the city of"]
    assert r.locality == [("The name of the country of citizenship of Leo Arons is", "Germany"),
                          ("The gender of Leo Arons is", "male"),
                          ("The father of Leo Arons is", "Albert Arons"), ("The mother of Leo Arons is", "Johanna Arons")]
    assert r.portability == [("Is Leo Arons still alive?", "no")]
    assert notes == [{"file": str(p), "record": 2, "field": "locality.Relation_Specificity[3]",
                      "why": "3 prompts but 2 answers"}]


def test_knowedit_wikibio_with_nested_locality(tmp_path):
    rec = {"text": "This is a Wikipedia passage about john russell reynolds. Sir John Russell Reynolds was a British neurologist.",
           "labels": "Reynolds was born in Romsey, Hampshire.", "concept": "john russell reynolds",
           "locality": {"Relation_Specificity": [{"prompt": "The occupation of John Russell Reynolds is",
                                                  "ground_truth": "neurologist"},
                                                 {"prompt": "  ", "ground_truth": "x"}]}}
    p = write_array(tmp_path, "wikibio-test-all.json", [rec])
    (r,), notes = load_noted(p)
    assert (r.target_new, r.subject, r.meta["kind"]) == ("Reynolds was born in Romsey, Hampshire.",
                                                         "john russell reynolds", "wikibio")
    assert r.locality == [("The occupation of John Russell Reynolds is", "neurologist")]
    assert notes == [{"file": str(p), "record": 2, "field": "locality.Relation_Specificity[1]", "why": "empty prompt"}]


def test_easyedit_flat_lists_of_locality_prompts(tmp_path):
    rec = {"prompt": "Who is the president of the US?", "target_new": ["Joe Biden", "Biden"],
           "ground_truth": "Donald Trump", "subject": "president of the US",
           "rephrase_prompt": ["Who leads the US?", ""],
           "locality_prompt": ["Who wrote Hamlet?", "Who painted the Mona Lisa?"],
           "locality_ground_truth": ["Shakespeare", "   "]}
    p = write_array(tmp_path, "easyedit.json", [rec])
    (r,), notes = load_noted(p, "easyedit")
    assert r.target_new == "Joe Biden" and r.rephrases == ["Who leads the US?"]
    assert r.locality == [("Who wrote Hamlet?", "Shakespeare")]
    assert notes == [{"file": str(p), "record": 2, "field": "rephrase_prompt[1]", "why": "empty prompt"},
                     {"file": str(p), "record": 2, "field": "locality[1]", "why": "empty answer"}]


MEND = [{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
         "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
         "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
         "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"},
        {"subject": "WEFS", "src": "When was WEFS established?", "pred": "1998", "rephrase": "When has WEFS been established?",
         "alt": "1997", "answers": ["1987"], "loc": "nq question: who voiced gaston", "loc_ans": "", "cond": "c"}]


@pytest.mark.parametrize("name,fmt", [("zsre_mend_eval.json", None), ("zsre_mend_eval.json", "zsre"),
                                      ("zsre_mend_eval.jsonl", None), ("zsre_mend_eval.jsonl", "zsre")])
def test_mend_zsre_as_json_and_as_jsonl(tmp_path, name, fmt):
    lines = name.endswith(".jsonl")
    p = (write_lines if lines else write_array)(tmp_path, name, MEND)
    recs, notes = load_noted(p, fmt, zsre_target="alt")
    assert [(r.prompt, r.target_new, r.target_true) for r in recs] == [
        ("What is the product made by UniFirst?", "unmanned aircraft", "uniform"),
        ("When was WEFS established?", "1997", "1987")]
    assert recs[0].locality == [("nq question: john goodman's character in the big lebowski", "Walter Sobchak")]
    assert recs[1].locality == []
    line = 2 if lines else 3
    assert notes == [{"file": str(p), "record": line, "field": "loc_ans", "why": "empty answer"}]
    assert recs[1].meta["source"] == f"{name}:{line}"


def test_mend_own_jsonl_input_output_alternatives(tmp_path):
    rec = {"id": "a1", "input": "Which continent is Mount Kenya on?", "prediction": "Africa",
           "alternatives": ["Asia", "Europe"], "filtered_rephrases": ["On which continent is Mount Kenya?", " "],
           "output": [{"answer": "Africa", "provenance": [{"wikipedia_id": "1"}]}]}
    p = write_lines(tmp_path, "structured_zeroshot-dev-new_annotated_final.jsonl", [rec])
    (r,), notes = load_noted(p)
    assert (r.prompt, r.target_new, r.target_true) == ("Which continent is Mount Kenya on?", "Africa", None)
    assert r.rephrases == ["On which continent is Mount Kenya?"]
    assert notes == [{"file": str(p), "record": 1, "field": "filtered_rephrases[1]", "why": "empty prompt"}]
    (a,), _ = load_noted(p, zsre_target="alt")
    assert (a.target_new, a.target_true) == ("Asia", "Africa")
    bad = write_lines(tmp_path, "mend_bad.jsonl", [dict(rec, input="")])
    assert error_of(bad) == f"{bad}:1: input: empty prompt (expected text, got '')"


def test_rome_counterfact_unusable_neighbours_and_paraphrases_dropped(tmp_path):
    rec = {"case_id": 7, "pararel_idx": 2796,
           "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
                                 "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
           "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", ""],
           "neighborhood_prompts": ["Michel Rocard is a native speaker of", 17],
           "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"], "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    p = write_array(tmp_path, "counterfact.json", [rec])
    (r,), notes = load_noted(p, require_subject=True)
    assert r.prompt == "The mother tongue of Danielle Darrieux is" and (r.target_new, r.target_true) == ("English", "French")
    assert r.rephrases == ["Shayna does this. Danielle Darrieux speaks"]
    assert r.locality == [("Michel Rocard is a native speaker of", "French")]
    assert notes == [{"file": str(p), "record": 2, "field": "paraphrase_prompts[1]", "why": "empty prompt"},
                     {"file": str(p), "record": 2, "field": "neighborhood_prompts[1]", "why": "expected a string, got int"}]


def test_wise_zsre_needs_alt_when_it_has_no_answers(tmp_path):
    rec = {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "rephrase": "What family are Ramalinaceae?",
           "alt": "Lamiinae", "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill",
           "portability": {"New Question": "Which family does Ramalinaceae now belong to?", "New Answer": "Lamiinae"}}
    p = write_array(tmp_path, "zsre_mend_eval_one_hop.json", [rec])
    assert error_of(p) == (f"{p}:2: answers: missing field (a file without the true answers, e.g. WISE's or a "
                           "counterfactual one, is read with zsre_target='alt')")
    (r,), notes = load_noted(p, zsre_target="alt")
    assert (r.target_new, r.target_true, notes) == ("Lamiinae", None, [])
    assert r.portability == [("Which family does Ramalinaceae now belong to?", "Lamiinae")]


def test_wise_hallucination_empty_locality_answer_is_dropped_not_refused(tmp_path):
    recs = [{"prompt": "This is a Wikipedia passage about carole gist. Carole Gist is a titleholder.",
             "target_new": "She was also the first contestant from Michigan.", "subject": "carole gist",
             "locality_prompt": "Description Map of South America.", "locality_ground_truth": "l print or plan?"},
            {"prompt": "This is a Wikipedia passage about bob miller.", "target_new": "He played for the Bills.",
             "subject": "bob miller", "locality_prompt": "Academic Coach, Graduate School", "locality_ground_truth": ""}]
    p = write_array(tmp_path, "hallucination-edit.json", recs)
    with pytest.warns(data.DataWarning) as w:
        got = data.load_edits(p, "hallucination")
    assert len(got) == 2 and got[1].locality == [] and got[0].locality == [("Description Map of South America.",
                                                                            "l print or plan?")]
    assert [str(x.message) for x in w] == [
        f"{p}: dropped 1 unusable optional item (first: {p}:3: locality[0]: empty answer)"]


def test_wise_temporal_placeholder_prompts_and_ood_rephrase(tmp_path):
    rec = {"prompt": "{} is", "subject": "Kyiv", "target_new": "the capital of Ukraine",
           "ood_rephrase": "Tell me about {}.", "locality_prompt": "Paris is", "locality_ground_truth": "in France"}
    (r,), notes = load_noted(write_array(tmp_path, "temporal-edit.json", [rec]), require_subject=True)
    assert (r.prompt, r.rephrases, r.locality, notes) == ("Kyiv is", ["Tell me about Kyiv."], [("Paris is", "in France")], [])


# ---------------------------------------------------------------------------------------------
# notes, warnings, format_drops
# ---------------------------------------------------------------------------------------------
def test_without_notes_one_warning_per_file_with_count_and_first_item(tmp_path):
    rec = dict(KNOWEDIT_ZSRE, rephrase_prompt="")
    p = write_array(tmp_path, "k.json", [KNOWEDIT_ZSRE, rec])
    with pytest.warns(data.DataWarning) as w:
        data.load_edits(p)
    assert [str(x.message) for x in w] == [
        f"{p}: dropped 3 unusable optional items (first: {p}:2: locality.Relation_Specificity[1]: empty answer)"]
    notes = []
    data.load_edits(p, notes=notes)
    assert [(x["record"], x["field"], x["why"]) for x in notes] == [
        (2, "locality.Relation_Specificity[1]", "empty answer"), (3, "rephrase_prompt", "empty prompt"),
        (3, "locality.Relation_Specificity[1]", "empty answer")]
    assert data.format_drops(notes) == str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_edits(write_array(tmp_path, "clean.json", [MEND[0]]))     # nothing dropped: no warning


def test_format_drops_none_one_and_several_files():
    assert data.format_drops(None) is None and data.format_drops([]) is None
    notes = [{"file": "a.json", "record": 9202, "field": "locality[1]", "why": "empty answer"},
             {"file": "a.json", "record": 9300, "field": "rephrase", "why": "empty prompt"},
             {"file": "b.jsonl", "record": 4, "field": "prompt", "why": "missing field", "skipped": True}]
    assert data.format_drops(notes[:1]) == "a.json: dropped 1 unusable optional item (first: a.json:9202: locality[1]: empty answer)"
    assert data.format_drops(notes) == (
        "a.json: dropped 2 unusable optional items (first: a.json:9202: locality[1]: empty answer); "
        "b.jsonl: skipped 1 record with an unusable required field (first: b.jsonl:4: prompt: missing field)")


def test_notes_are_not_appended_when_the_file_is_refused(tmp_path):
    p = write_array(tmp_path, "half.json", [KNOWEDIT_ZSRE, dict(KNOWEDIT_ZSRE, target_new=" ")])
    notes = []
    assert error_of(p, notes=notes) == f"{p}:3: target_new: empty target (expected text, got only whitespace ' ')"
    assert notes == []


# ---------------------------------------------------------------------------------------------
# n and lenient
# ---------------------------------------------------------------------------------------------
def test_records_beyond_n_are_never_read(tmp_path):
    good = {"prompt": "p", "target_new": "t"}
    arr = write_raw(tmp_path, "arr.json", '[\n{"prompt": "p", "target_new": "t"},\n{"prompt": 5},\n{"prompt": "q", "target')
    assert len(data.load_edits(arr, n=1)) == 1
    assert error_of(arr, n=2) == f"{arr}:3: prompt: expected str, got int"
    assert error_of(arr) == f"{arr}:3: prompt: expected str, got int"
    lines = write_raw(tmp_path, "l.jsonl", json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    assert len(data.load_edits(lines, n=2)) == 2
    assert error_of(lines) == f"{lines}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)"


def test_lenient_skips_unusable_required_fields_and_notes_them(tmp_path):
    recs = [{"prompt": "Ada was born in", "target_new": "Rome", "subject": "Ada"},
            {"prompt": "Bob was born in", "target_new": ""},
            {"prompt": "Cy was born in", "target_new": "Oslo", "subject": "cy"},
            {"target_new": "Lima"},
            {"prompt": "Di was born in", "target_new": "Kyiv", "subject": "Di", "rephrase_prompt": " "}]
    p = write_array(tmp_path, "bank.json", recs)
    assert error_of(p, require_subject=True) == f"{p}:3: target_new: empty target (expected text, got '')"
    got, notes = load_noted(p, require_subject=True, lenient=True)
    assert [r.prompt for r in got] == ["Ada was born in", "Di was born in"]
    f = str(p)
    assert notes == [
        {"file": f, "record": 3, "field": "target_new", "why": "empty target (expected text, got '')", "skipped": True},
        {"file": f, "record": 4, "field": "subject", "why": "'cy' occurs in the prompt only with other case ('Cy')",
         "skipped": True},
        {"file": f, "record": 5, "field": "prompt", "why": "missing field", "skipped": True},
        {"file": f, "record": 6, "field": "rephrase_prompt", "why": "empty prompt"}]
    assert data.format_drops(notes) == (f"{f}: dropped 1 unusable optional item, skipped 3 records with an unusable "
                                        f"required field (first: {f}:3: target_new: empty target (expected text, got ''))")
    assert [r.prompt for r in data.load_edits(p, require_subject=True, lenient=True, n=3, notes=[])] == ["Ada was born in"]


def test_lenient_skips_bad_json_lines_but_not_a_broken_array(tmp_path):
    p = write_raw(tmp_path, "bank.jsonl", '{"prompt": "p", "target_new": "t"}\n{"prompt": "q",\n42\n'
                                          '{"prompt": "r", "target_new": "u"}\n')
    got, notes = load_noted(p, lenient=True)
    assert [r.prompt for r in got] == ["p", "r"]
    assert notes == [{"file": str(p), "record": 2, "field": None, "skipped": True,
                      "why": "invalid JSON: Expecting property name enclosed in double quotes (column 16)"},
                     {"file": str(p), "record": 3, "field": None, "skipped": True,
                      "why": "expected a JSON object (a record), got a JSON number"}]
    arr = write_raw(tmp_path, "bank.json", '[\n{"prompt": "p", "target_new": "t"},\n{"prompt": "q",,\n]')
    assert error_of(arr, lenient=True).startswith(f"{arr}:3: invalid JSON: ")
    allbad = write_array(tmp_path, "allbad.json", [{"prompt": "p", "target_new": ""}])
    assert error_of(allbad, lenient=True) == (
        f"{allbad}: no usable records ({allbad}: skipped 1 record with an unusable required field "
        f"(first: {allbad}:2: target_new: empty target (expected text, got '')))")


# ---------------------------------------------------------------------------------------------
# Bad input battery: one decided outcome each
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,expect", [
    ("empty.json", b"", "{p}:1: empty file"),
    ("bomonly.json", b"\xef\xbb\xbf", "{p}:1: empty file"),
    ("latin1.json", b'[\n{"prompt": "Where is the caf\xe9?", "target_new": "Paris"}\n]',
     "{p}:2: not UTF-8 text: byte 0xe9 at byte offset 30 (invalid continuation byte); save the file as UTF-8"),
    ("latin1.jsonl", b'{"prompt": "p", "target_new": "t"}\n{"prompt": "\xff", "target_new": "t"}\n',
     "{p}:2: not UTF-8 text: byte 0xff at byte offset 47 (invalid start byte); save the file as UTF-8"),
    ("utf16.json", '[{"prompt": "p", "target_new": "t"}]'.encode("utf-16"),
     "{p}:1: not UTF-8 text: byte 0xff at byte offset 0 (invalid start byte) (the file looks like UTF-16); "
     "save the file as UTF-8"),
    ("object.json", '{\n  "prompt": "p",\n  "target_new": "t"\n}\n',
     "{p}:1: expected a JSON array of records or one JSON object per line, found one JSON object over 4 lines"),
    ("number.json", "42\n", "{p}:1: expected a JSON array of records, found a JSON number (a file of one JSON object "
                            "per line is read as such when its name ends in .jsonl or no format is given)"),
    ("string.json", '"hello"', "{p}:1: expected a JSON array of records, found a JSON string (a file of one JSON "
                               "object per line is read as such when its name ends in .jsonl or no format is given)"),
    ("items.json", "[\n1,\n2\n]", "{p}:2: expected a JSON object (a record), got a JSON number"),
    ("trunc.json", '[\n{"prompt": "p", "target_new": "t"},\n{"prompt": "q", "target_new": "Pa',
     "{p}:3: truncated JSON: the file ends inside the record that starts here (Unterminated string starting at)"),
    ("trunc2.json", '[\n{"prompt": "p", "target_new": "t"},\n', "{p}:3: truncated JSON: the file ends before the "
                                                                 "array's closing ']'"),
    ("tail.json", '[\n{"prompt": "p", "target_new": "t"}\n]\n]', "{p}:4: invalid JSON: ']' after the array's closing ']'"),
    ("badline.jsonl", '{"prompt": "p", "target_new": "t"}\n\n{"prompt": "q" "target_new": "u"}\n',
     "{p}:3: invalid JSON: Expecting ',' delimiter (column 16)"),
])
def test_bad_files(tmp_path, name, content, expect):
    p = write_raw(tmp_path, name, content)
    assert error_of(p) == expect.format(p=p)


def test_bad_bytes_beyond_n_are_never_read(tmp_path):
    lines = write_raw(tmp_path, "l.jsonl", b'{"prompt": "p", "target_new": "t"}\n{"prompt": "\xff"}\n')
    assert [r.prompt for r in data.load_edits(lines, n=1)] == ["p"]
    arr = write_raw(tmp_path, "a.json", b'[\n{"prompt": "p", "target_new": "t"},\n{"prompt": "\xff"}\n]')
    assert [r.prompt for r in data.load_edits(arr, n=1)] == ["p"]
    assert error_of(arr, n=2) == f"{arr}:3: not UTF-8 text: byte 0xff at byte offset 50 (invalid start byte); save the file as UTF-8"


def test_utf8_bom_is_accepted(tmp_path):
    for name in ("bom.json", "bom.jsonl"):
        body = ('[{"prompt": "p", "target_new": "t"}]' if name.endswith(".json") else '{"prompt": "p", "target_new": "t"}\n')
        p = write_raw(tmp_path, name, b"\xef\xbb\xbf" + body.encode())
        (r,), notes = load_noted(p)
        assert (r.prompt, r.target_new, notes) == ("p", "t", [])


def test_duplicate_records_are_kept_as_repeated_edits(tmp_path):
    rec = {"prompt": "Ada was born in", "target_new": "Rome"}
    recs, notes = load_noted(write_array(tmp_path, "dup.json", [rec, rec, rec]))
    assert [(r.prompt, r.target_new) for r in recs] == [("Ada was born in", "Rome")] * 3 and notes == []
    assert [r.meta["source"] for r in recs] == ["dup.json:2", "dup.json:3", "dup.json:4"]


CF = {"case_id": 1, "requested_rewrite": {"prompt": "{} speaks", "subject": "Ada", "target_new": {"str": "Latin"},
                                          "target_true": {"str": "Greek"}}}
GOOD = {  # format -> (a good record, zsre_target)
    "zsre": ({"src": "Where was Ada born?", "answers": ["Paris"], "alt": "Rome", "subject": "Ada"}, "answers"),
    "zsre-alt": ({"src": "Where was Ada born?", "answers": ["Paris"], "alt": "Rome", "subject": "Ada"}, "alt"),
    "easyedit": ({"prompt": "Ada was born in", "target_new": "Rome", "ground_truth": "Paris", "subject": "Ada"}, "answers"),
    "counterfact": (CF, "answers"),
    "hallucination": ({"text": "About Ada. Ada was a poet.", "labels": "She was born in Rome.", "concept": "ada"}, "answers"),
    "jsonl": ({"prompt": "Ada was born in", "target_new": "Rome", "target_true": "Paris", "subject": "Ada"}, "answers"),
}


def _with(rec, dotted, value):
    rec = json.loads(json.dumps(rec))
    *head, last = dotted.split(".")
    d = rec
    for k in head:
        d = d[k]
    if value is _MISSING:
        del d[last]
    else:
        d[last] = value
    return rec


_MISSING = object()
REQUIRED = [("zsre", "src", "src"), ("zsre", "answers", "answers"), ("zsre-alt", "alt", "alt"),
            ("easyedit", "prompt", "prompt"), ("easyedit", "target_new", "target_new"),
            ("counterfact", "requested_rewrite", "requested_rewrite"),
            ("counterfact", "requested_rewrite.subject", "requested_rewrite.subject"),
            ("counterfact", "requested_rewrite.prompt", "requested_rewrite.prompt"),
            ("counterfact", "requested_rewrite.target_new", "requested_rewrite.target_new"),
            ("counterfact", "requested_rewrite.target_true.str", "requested_rewrite.target_true.str"),
            ("hallucination", "text", "text"), ("hallucination", "labels", "labels"),
            ("jsonl", "prompt", "prompt"), ("jsonl", "target_new", "target_new")]


def _file(tmp_path, kind, rec):
    fmt = kind.split("-")[0]
    p = write_array(tmp_path, f"{kind}.json", [GOOD[kind][0], rec])
    return p, fmt, GOOD[kind][1]


@pytest.mark.parametrize("kind,key,field", REQUIRED)
def test_a_missing_required_field(tmp_path, kind, key, field):
    p, fmt, zt = _file(tmp_path, kind, _with(GOOD[kind][0], key, _MISSING))
    msg = error_of(p, fmt, zsre_target=zt)
    assert msg.startswith(f"{p}:3: {field}: missing field"), msg
    assert len(data.load_edits(p, fmt, zsre_target=zt, n=1)) == 1        # the good record alone loads


@pytest.mark.parametrize("kind,key,field", [x for x in REQUIRED if x[1] != "requested_rewrite"])
@pytest.mark.parametrize("value,found", [(3, "int"), (True, "bool"), ({"a": 1}, "dict")])
def test_a_required_field_of_the_wrong_type(tmp_path, kind, key, field, value, found):
    p, fmt, zt = _file(tmp_path, kind, _with(GOOD[kind][0], key, value))
    msg = error_of(p, fmt, zsre_target=zt)
    if key in ("answers", "target_new") and kind in ("zsre", "easyedit"):
        expected = f"expected list/str, got {found}" if key == "answers" else f"expected str/list, got {found}"
    elif key.endswith("target_new") and kind == "counterfact":
        expected = f"expected dict, got {found}" if found != "dict" else "missing field"
    else:
        expected = f"expected str, got {found}"
    if kind == "counterfact" and key == "requested_rewrite.target_new" and found == "dict":
        field = "requested_rewrite.target_new.str"          # {"a": 1} is a dict without "str"
    assert msg == f"{p}:3: {field}: {expected}", msg


@pytest.mark.parametrize("kind,key,field", [x for x in REQUIRED if x[1] not in (
    "requested_rewrite", "requested_rewrite.target_new")])
@pytest.mark.parametrize("value,found", [("", "got ''"), (" \t\n ", r"got only whitespace ' \t\n '"),
                                         ("\x00\x07", r"got only control characters / whitespace '\x00\x07'")])
def test_a_required_field_empty_or_blank(tmp_path, kind, key, field, value, found):
    if key == "answers":
        value = [value]
    p, fmt, zt = _file(tmp_path, kind, _with(GOOD[kind][0], key, value))
    msg = error_of(p, fmt, zsre_target=zt)
    what = {"prompt": "prompt", "src": "prompt", "text": "text", "requested_rewrite.prompt": "prompt",
            "requested_rewrite.subject": "subject"}.get(key, "target")
    assert msg == f"{p}:3: {field}: empty {what} (expected text, {found})", msg


def test_empty_target_lists_and_true_answers_the_file_gives_must_be_usable(tmp_path):
    p = write_array(tmp_path, "e.json", [{"prompt": "p", "target_new": []}])
    assert error_of(p) == f"{p}:2: target_new: empty target (expected a string or a non-empty list, got [])"
    p = write_array(tmp_path, "g.json", [{"prompt": "p", "target_new": "t", "ground_truth": [""]}])
    assert error_of(p) == f"{p}:2: ground_truth: empty target (expected text, got '')"
    p = write_array(tmp_path, "z.json", [{"src": "q?", "alt": "x", "answers": []}])
    assert error_of(p, zsre_target="alt") == f"{p}:2: answers: empty target (expected a string or a non-empty list, got [])"


def test_optional_items_of_the_wrong_type_are_dropped_in_published_formats_and_refused_in_our_own(tmp_path):
    rec = {"prompt": "Ada was born in", "target_new": "Rome", "subject": 7, "rephrase_prompt": 5,
           "locality": {"Relation_Specificity": [{"prompt": "q", "ground_truth": [12]}, "just text"],
                        "Forgetfulness": {"prompt": 3, "ground_truth": "a"}},
           "portability": ["not", "an object"]}
    p = write_array(tmp_path, "o.json", [rec])
    (r,), notes = load_noted(p, "easyedit")
    assert (r.subject, r.rephrases, r.locality, r.portability) == (None, [], [], [])
    assert [(x["field"], x["why"]) for x in notes] == [
        ("subject", "expected a string, got int"),
        ("rephrase_prompt", "expected a string or a list of strings, got int"),
        ("locality.Relation_Specificity[0]", "expected a string or a list of strings, got int"),
        ("locality.Relation_Specificity[1]", "expected an object {prompt, ground_truth}, got str"),
        ("locality.Forgetfulness", "expected a string, got int"),
        ("portability", "expected an object {kind: entries}, got list")]
    assert error_of(p, "easyedit", require_subject=True) == f"{p}:2: subject: expected str, got int"
    own = write_lines(tmp_path, "own.jsonl", [{"prompt": "p", "target_new": "t", "rephrases": ["x", 3]}])
    assert error_of(own) == f"{own}:1: rephrases: expected a list of strings"
    blank = write_lines(tmp_path, "blank.jsonl", [{"prompt": "p", "target_new": "t", "rephrases": ["x", " "],
                                                   "locality": [["q", ""], ["r", "s"]]}])
    (r,), notes = load_noted(blank)
    assert (r.rephrases, r.locality) == (["x"], [("r", "s")])
    assert [(x["field"], x["why"]) for x in notes] == [("rephrases[1]", "empty prompt"), ("locality[0]", "empty answer")]


def test_a_1mb_string_loads_fast_and_whole(tmp_path):
    big = "word " * 200_000 + "end"
    recs = [{"prompt": big, "target_new": big, "subject": "end", "rephrase_prompt": big,
             "locality_prompt": big, "locality_ground_truth": big}]
    p = write_array(tmp_path, "big.json", recs)
    t = time.perf_counter()
    (r,), notes = load_noted(p, require_subject=True)
    assert time.perf_counter() - t < 2.0
    assert r.prompt == big and r.target_new == big and r.locality == [(big, big)] and notes == []
    p2 = write_array(tmp_path, "big2.json", [dict(recs[0], subject="absent")])
    t = time.perf_counter()
    msg = error_of(p2, require_subject=True)
    assert time.perf_counter() - t < 2.0 and len(msg) < 500
    assert msg.startswith(f"{p2}:2: subject: 'absent' does not occur in the prompt 'word word")


def test_text_is_nfc_and_a_subject_in_nfd_matches_a_prompt_in_nfc(tmp_path):
    nfc, nfd = "Café Müller", unicodedata.normalize("NFD", "Café Müller")
    assert nfc != nfd
    rec = {"prompt": f"{nfc} is located in", "target_new": unicodedata.normalize("NFD", "Zürich"), "subject": nfd,
           "rephrase_prompt": f"The city of {nfd} is", "locality_prompt": nfd, "locality_ground_truth": nfd}
    (r,), notes = load_noted(write_array(tmp_path, "nfd.json", [rec]), require_subject=True)
    assert (r.subject, r.target_new, r.rephrases) == (nfc, "Zürich", [f"The city of {nfc} is"])
    assert r.locality == [(nfc, nfc)] and notes == []


def test_a_subject_only_in_other_case_is_an_error_that_says_so(tmp_path):
    p = write_array(tmp_path, "case.json", [{"prompt": "The capital of France is Paris, which", "target_new": "x",
                                              "subject": "paris"}])
    assert error_of(p, require_subject=True) == (
        f"{p}:2: subject: 'paris' occurs in the prompt only with other case ('Paris')")
    assert data.load_edits(p)[0].subject == "paris"                    # not required: loads as it is


def test_control_characters_are_removed_but_tab_newline_cr(tmp_path):
    rec = {"prompt": "Ada\x00 was\x1b born\tin\r\n", "target_new": "Ro\x07me", "subject": "Ada\x0c",
           "rephrase_prompt": "\x01\x02", "locality_prompt": "Q\x85?", "locality_ground_truth": "A\x7f"}
    p = write_array(tmp_path, "ctl.json", [rec])
    (r,), notes = load_noted(p, require_subject=True)
    assert (r.prompt, r.target_new, r.subject) == ("Ada was born\tin\r\n", "Rome", "Ada")
    assert r.locality == [("Q\x85?", "A\x7f")]                          # DEL and C1 stay
    assert r.rephrases == [] and notes == [{"file": str(p), "record": 2, "field": "rephrase_prompt", "why": "empty prompt"}]
    raw = write_raw(tmp_path, "rawctl.json", '[{"prompt": "a\tb\x01c", "target_new": "t"}]')   # raw, unescaped
    assert data.load_edits(raw)[0].prompt == "a\tbc"


RTL_EMOJI = ["מה הבירה של ישראל?", "ما هي عاصمة مصر؟", "\u200fשלום\u200f \u202bעולם\u202c", "👩\u200d🔬 scientist 🇫🇷 👍🏽",
             "نص 🙂 mixed with English"]


def test_right_to_left_text_and_emoji_load_unchanged(tmp_path):
    recs = [{"prompt": s, "target_new": s, "subject": s, "rephrase_prompt": s, "locality_prompt": s,
             "locality_ground_truth": s} for s in RTL_EMOJI]
    for writer, name in ((write_array, "u.json"), (write_lines, "u.jsonl")):
        got, notes = load_noted(writer(tmp_path, name, recs), require_subject=True)
        assert notes == []
        assert [(r.prompt, r.target_new, r.subject, r.rephrases, r.locality) for r in got] == [
            (s, s, s, [s], [(s, s)]) for s in RTL_EMOJI]


def test_save_jsonl_roundtrip_with_line_separators_inside_strings(tmp_path):
    recs = [EditRecord("a\u2028b\u2029c\x85d\x1ce", "t\u2028u", subject="a"), EditRecord("second", "x")]
    p = tmp_path / "sep.jsonl"
    data.save_jsonl(recs, p)
    back = data.load_edits(p)
    assert [(r.prompt, r.target_new) for r in back] == [("a\u2028b\u2029c\x85de", "t\u2028u"), ("second", "x")]
    assert [r.meta["source"] for r in back] == ["sep.jsonl:1", "sep.jsonl:2"]


def test_a_folder_or_a_missing_file(tmp_path):
    assert error_of(tmp_path) == f"{tmp_path}: is a folder, not a file"
    assert error_of(tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: file not found"
