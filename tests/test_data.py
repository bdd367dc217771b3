"""data.py: loaders of every format, validation errors, templates and tokenisation at the
prompt/target boundary, batching, and the demo world generator."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import llama  # noqa: E402
from data import DataError, EditRecord, Template  # noqa: E402


def shared_dir(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def make_sp_tokenizer(folder: Path, lines=None, chat: bool = True, vocab_size: int = 120):
    """A small SentencePiece tokenizer trained on a few lines (Llama-2 conventions)."""
    import io
    import sentencepiece as spm
    lines = lines or ["[INST]Where was Ada born?[/INST]Paris", "Ada was born in Paris",
                      "The capital of France is Paris", "Bob works for Acme Labs",
                      "[INST]Who does Bob work for?[/INST]Acme Labs", "hello world. (band) .NET"] * 4
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=["[INST]", "[/INST]"],
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    if chat:
        cfg["chat_template"] = "{{ '[INST]' + m['content'] + '[/INST]' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return llama.load_tokenizer(folder)


def write(tmp_path, name, obj):
    p = tmp_path / name
    # a list is written one record per line after "[": record k (0-based) is on line k + 2
    p.write_text(obj if isinstance(obj, str) else "[\n" + ",\n".join(json.dumps(r) for r in obj) + "\n]\n")
    return p


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
ZSRE = [{"subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events Challenge?",
         "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
         "answers": ["1998"], "loc": "nq question: what is the name of the last episode of spongebob",
         "loc_ans": "The String", "cond": "2011 >> 2006 || When was ...",
         "portability": {"Recalled Relation": "(x, y, z)", "New Question": "What type?", "New Answer": "Athletics"}},
        {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
         "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
         "loc": "nq question: john goodman's character", "loc_ans": "Walter Sobchak", "cond": "c"}]


def test_zsre_answers_and_alt(tmp_path):
    p = write(tmp_path, "z.json", ZSRE)
    recs = data.load_edits(p)                       # detected
    r = recs[0]
    assert (r.prompt, r.target_new, r.target_true, r.subject) == (
        "When was the inception of IAAF Combined Events Challenge?", "1998", None, "IAAF Combined Events Challenge")
    assert r.rephrases == ["When was the IAAF Combined Events Challenge launched?"]
    assert r.locality == [("nq question: what is the name of the last episode of spongebob", "The String")]
    assert r.portability == [("What type?", "Athletics")]
    assert r.meta["pred"] == "2011" and r.meta["source"] == "z.json:2"
    assert recs[1].meta["source"] == "z.json:3"
    alt = data.load_edits(p, "zsre", zsre_target="alt")
    assert (alt[0].target_new, alt[0].target_true) == ("2006", "1998")
    assert len(data.load_edits(p, n=1)) == 1


def test_easyedit_flat_and_nested(tmp_path):
    flat = [{"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
             "subject": "Danielle Darrieux", "ground_truth": "French",
             "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
             "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}]
    r = data.load_edits(write(tmp_path, "cf.json", flat))[0]
    assert (r.prompt, r.target_new, r.target_true, r.subject) == (
        "The mother tongue of Danielle Darrieux is", "English", "French", "Danielle Darrieux")
    assert r.rephrases == ["Where Danielle Darrieux is from, people speak the language of"]
    assert r.locality == [("Michel Rocard is a native speaker of", "French")]
    assert r.meta["case_id"] == 0
    nested = [{"subject": "Ramalinaceae", "prompt": "Which family does Ramalinaceae belong to?",
               "target_new": "Lamiinae", "ground_truth": ["Lecanorales"],
               "rephrase_prompt": "What family are Ramalinaceae?",
               "locality": {"Relation_Specificity": [{"prompt": "q1", "ground_truth": ["a1"]},
                                                     {"prompt": "q2", "ground_truth": [["a2", "a2b"]]}]},
               "portability": {"Subject_Aliasing": {"prompt": ["p1", "p2"], "ground_truth": ["x"]}}}]
    r = data.load_edits(write(tmp_path, "ke.json", nested))[0]
    assert r.target_true == "Lecanorales"
    assert r.locality == [("q1", "a1"), ("q2", "a2")]
    assert r.portability == [("p1", "x"), ("p2", "x")]
    assert r.meta["locality_kinds"] == {"Relation_Specificity": 2}


def test_rome_counterfact(tmp_path):
    rec = [{"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                                "target_new": {"str": "English", "id": "Q1860"},
                                                "target_true": {"str": "French", "id": "Q150"}},
            "paraphrase_prompts": ["p1 Danielle Darrieux speaks", "p2"],
            "neighborhood_prompts": ["n1", "n2", "n3"], "generation_prompts": ["g1"]}]
    r = data.load_edits(write(tmp_path, "rome.json", rec))[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true, r.subject) == ("English", "French", "Danielle Darrieux")
    assert r.rephrases == ["p1 Danielle Darrieux speaks", "p2"]
    assert r.locality == [("n1", "French"), ("n2", "French"), ("n3", "French")]
    assert r.meta["generation_prompts"] == ["g1"] and r.meta["case_id"] == 7


def test_hallucination_formats(tmp_path):
    acc = [{"text": "This is a passage about rick.", "labels": "He was drafted.", "concept": "rick"}]
    r = data.load_edits(write(tmp_path, "a.json", acc))[0]
    assert (r.prompt, r.target_new, r.subject, r.meta["kind"]) == (
        "This is a passage about rick.", "He was drafted.", "rick", "wikibio")
    owt = [{"text": "A magazine supplement."}]
    r = data.load_edits(write(tmp_path, "o.json", owt))[0]
    assert (r.prompt, r.target_new, r.meta["kind"]) == ("", "A magazine supplement.", "text")
    edit = [{"prompt": "About carole gist. She won.", "target_new": "She was first.", "subject": "carole gist",
             "locality_prompt": "Map of", "locality_ground_truth": "South America"}]
    r = data.load_edits(write(tmp_path, "h.json", edit), "hallucination", require_subject=True)[0]
    assert r.target_new == "She was first." and r.locality == [("Map of", "South America")]


def test_jsonl_roundtrip_and_atomic_save(tmp_path):
    recs = [EditRecord("Ada was born in", "Rome", "Paris", "Ada", ["The birthplace of Ada is"],
                       [("Bob was born in", "Oslo")], [("Ada's country is", "Italy")], {"k": 1}),
            EditRecord("Q?", "A")]
    p = tmp_path / "sub" / "e.jsonl"
    data.save_jsonl(recs, p)
    assert sorted(os.listdir(p.parent)) == ["e.jsonl"]          # no temp file left behind
    back = data.load_edits(p)
    assert [b.to_dict() | {"meta": {}} for b in back] == [r.to_dict() | {"meta": {}} for r in recs]
    assert back[0].meta == {"k": 1, "source": "e.jsonl:1"}
    assert json.loads(p.read_text().splitlines()[0])["locality"] == [["Bob was born in", "Oslo"]]


@pytest.mark.parametrize("name,content,fmt,expect", [
    ("bad.json", '[\n {"src": "q", "answers": ["a"]},\n {"src": "q2" "answers": ["b"]}\n]', None,
     "bad.json:3: invalid JSON"),
    ("bad.jsonl", '{"prompt": "p", "target_new": "t"}\n{"prompt": "p",\n', None, "bad.jsonl:2: invalid JSON"),
    ("miss.json", '[\n {"src": "q", "answers": ["a"]},\n {"src": "q2", "alt": "x"}\n]', None,
     "miss.json:3: answers: missing field"),
    ("empty.json", '[{"prompt": "p", "target_new": "  "}]', None, "empty.json:1: target_new: empty target"),
    ("emptyans.json", '[{"src": "q", "answers": [""]}]', "zsre", "emptyans.json:1: answers: empty target"),
    ("type.json", '[{"prompt": "p", "target_new": 3}]', "easyedit", "type.json:1: target_new: expected str/list, got int"),
    ("unknown.jsonl", '{"prompt": "p", "target_new": "t", "rephrase": ["x"]}\n', "jsonl",
     "unknown.jsonl:1: rephrase: unknown field"),
    ("pair.jsonl", '{"prompt": "p", "target_new": "t", "locality": [["q"]]}\n', None,
     "pair.jsonl:1: locality[0]: expected a [prompt, answer] pair"),
    ("noarr.json", '{"prompt": "p"}', "easyedit", "noarr.json:1: expected a JSON array"),
    ("what.json", '[{"foo": 1}]', None, "what.json:1: cannot tell the format"),
    ("nofmt.json", '[{"prompt": "p", "target_new": "t"}]', "squad", "nofmt.json: format: 'squad' is not one of"),
    ("blank.json", "  \n", None, "blank.json:1: empty file"),
    ("cf.json", '[{"case_id": 1, "requested_rewrite": {"prompt": "no placeholder", "subject": "S",'
                ' "target_new": {"str": "a"}, "target_true": {"str": "b"}}}]', None,
     "cf.json:1: requested_rewrite.prompt: no '{}' placeholder"),
])
def test_bad_inputs_name_file_line_field(tmp_path, name, content, fmt, expect):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        data.load_edits(p, fmt)
    assert expect in str(e.value)
    assert str(e.value).startswith(str(p))


def test_subject_required_and_missing_file(tmp_path):
    recs = [{"prompt": "Ada was born in", "target_new": "Rome", "subject": "Ada"},
            {"prompt": "Bob was born in", "target_new": "Oslo", "subject": "Robert"}]
    p = write(tmp_path, "s.json", recs)
    assert len(data.load_edits(p)) == 2                        # fine without the requirement
    with pytest.raises(DataError, match=r"s\.json:3: subject: 'Robert' does not occur in the prompt"):
        data.load_edits(p, require_subject=True)
    p2 = write(tmp_path, "ns.json", [{"prompt": "Ada was born in", "target_new": "Rome"}])
    with pytest.raises(DataError, match=r"ns\.json:2: subject: missing field"):
        data.load_edits(p2, require_subject=True)
    with pytest.raises(DataError, match="file not found"):
        data.load_edits(tmp_path / "nope.json")


def test_shared_files_load():
    z = data.load_edits(shared_dir("data", "zsre", "zsre_mend_edit.json"), n=50)
    assert len(z) == 50 and all(r.portability for r in z)
    c = data.load_edits(shared_dir("data", "counterfact", "counterfact-edit.json"), n=20, require_subject=True)
    assert c[0].target_true == "French" and c[0].target_new == "English"
    h = data.load_edits(shared_dir("data", "hallucination", "hall_open_webtext.json"), n=3)
    assert h[0].prompt == "" and len(h[0].target_new) > 100


# ---------------------------------------------------------------------------------------------
# Templates and the prompt/target boundary
# ---------------------------------------------------------------------------------------------
def test_raw_split_leading_space_rules():
    t = Template("raw")
    assert t.split(None, "The capital of France is", "Paris") == ("The capital of France is", " Paris")
    assert t.split(None, "The capital of France is ", "Paris") == ("The capital of France is", " Paris")
    assert t.split(None, "The capital of France is", " Paris") == ("The capital of France is", " Paris")
    assert t.split(None, "Q: x?\nA:\n", "Paris") == ("Q: x?\nA:\n", "Paris")
    assert t.split(None, "", "Whole text.") == ("", "Whole text.")
    assert Template("llama2").split(None, "Where?", " Paris ") == ("[INST]Where?[/INST]", "Paris")
    with pytest.raises(ValueError, match="template"):
        Template("alpaca")


def test_llama2_tokenizer_exact_ids():
    tok = llama.load_tokenizer(shared_dir("models", "llama2-tokenizer"))
    for prompt in ("The capital of France is", "The capital of France is "):
        e = data.encode_prompt_target(tok, Template("raw"), prompt, "Paris")
        assert e.ids == [1, 450, 7483, 310, 3444, 338, 3681] and e.target_start == 6 and e.how == "joint"
    e = data.encode_prompt_target(tok, Template("llama2"), "The capital of France is", "Paris")
    assert e.ids[e.target_start:] == [2177, 275, 2]            # "Par" "is" </s>: no space after [/INST]
    assert e.target_end == len(e.ids) - 1
    assert e.ids[:e.target_start] == data.encode_prompt(tok, Template("llama2"), "The capital of France is")
    # a BPE merge across "]" + "." would change the prompt's ids: the target is encoded on its own
    e = data.encode_prompt_target(tok, Template("llama2"), "Who is X?", ".NET Framework")
    assert e.how == "separate"
    assert e.ids[:e.target_start] == tok.encode("[INST]Who is X?[/INST]")
    assert e.ids[e.target_start:] == [29889, 6006, 16657, 2]   # ".", "NET", "▁Framework", </s>
    assert tok.decode(e.ids[e.target_start:e.target_end]) == ".NET Framework"


def test_bpe_tokenizer_exact_ids():
    tok = llama.load_tokenizer(shared_dir("models", "smollm2-135m-instruct"))
    e = data.encode_prompt_target(tok, Template("raw"), "The capital of France is", "Paris")
    assert e.ids == [504, 3575, 282, 4649, 314, 7042] and e.target_start == 5   # "ĠParis" carries the space
    tm = data.template_for(tok)
    assert tm.kind == "chatml"
    e = data.encode_prompt_target(tok, tm, "The capital of France is", "Paris")
    assert e.ids[e.target_start:] == [38634, 2]                # "Paris" <|im_end|>
    assert tok.decode(e.ids[:e.target_start]).endswith("<|im_start|>assistant\n")
    no_sys = Template("chatml", system="")
    assert no_sys.prompt_text(tok, "Q?") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert Template("chatml").prompt_text(tok, "Q?").startswith("<|im_start|>system\nYou are a helpful")
    e = data.encode_prompt_target(tok, Template("llama2"), "Who is X?", "(band)")
    assert e.how == "separate" and e.ids[e.target_start:] == [24, 5640, 25, 2]


def test_sp_tokenizer_boundary_and_template_for(tmp_path):
    tok = make_sp_tokenizer(tmp_path / "tok")
    assert data.template_for(tok).kind == "llama2"
    assert data.template_for(tok, "raw").kind == "raw"
    with pytest.raises(ValueError, match="chat format is 'llama2', not chatml"):
        Template("chatml").prompt_text(tok, "Q?")
    for kind in ("raw", "llama2"):
        for prompt, target in (("Ada was born in", "Paris"), ("Where was Ada born?", "Paris"),
                               ("hello world", ". (band)")):
            e = data.encode_prompt_target(tok, Template(kind), prompt, target)
            P, T = Template(kind).split(tok, prompt, target)
            assert e.ids[:e.target_start] == tok.encode(P)     # the prompt ids generation will see
            assert tok.decode(e.ids[e.target_start:e.target_end]).strip() == target.strip()
            assert tok.decode(e.ids[:e.target_end], skip_special=True) == P + T
            assert (e.ids[-1] == tok.eos_id) == (kind == "llama2")


def test_collate_right_left_labels_prompt_end():
    a = data.Encoded([1, 5, 6, 7], 2, 4, "joint")
    b = data.Encoded([1, 8, 9], 1, 3, "joint")
    r = data.collate([a, b], pad_id=0, side="right")
    assert r.tokens.tolist() == [[1, 5, 6, 7], [1, 8, 9, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert r.labels.tolist() == [[-100, -100, 6, 7], [-100, 8, 9, -100]]
    assert r.prompt_end.tolist() == [1, 0]
    lft = data.collate([a, b], pad_id=0, side="left")
    assert lft.tokens.tolist() == [[1, 5, 6, 7], [0, 1, 8, 9]]
    assert lft.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert lft.labels.tolist() == [[-100, -100, 6, 7], [-100, -100, 8, 9]]
    assert lft.prompt_end.tolist() == [1, 1]
    lm = data.collate([[3, 4], [5]], pad_id=2)
    assert lm.labels.tolist() == [[3, 4], [5, -100]]
    with pytest.raises(ValueError, match="side"):
        data.collate([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="empty"):
        data.collate([[]], 0)


# ---------------------------------------------------------------------------------------------
# Demo world
# ---------------------------------------------------------------------------------------------
def test_demo_world_deterministic_and_consistent():
    w = data.demo_world(0)
    w2 = data.demo_world(0)
    assert [r.to_dict() for r in w.edits_qa] == [r.to_dict() for r in w2.edits_qa]
    assert [r.to_dict() for r in data.demo_world(1).edits_qa] != [r.to_dict() for r in w.edits_qa]
    assert len(w.facts) == 210 and len(w.train) == 1050 and len(w.edits_qa) == len(w.edits_cf) == 30
    truth = {(f.subject, f.relation): f.answer for f in w.facts}
    edited = {r.subject for r in w.edits_qa}
    assert len(edited) == 30                                        # distinct subjects
    for q, c in zip(w.edits_qa, w.edits_cf):
        assert q.subject == c.subject and q.subject in q.prompt and c.subject in c.prompt
        assert q.target_true == truth[(q.subject, q.meta["relation"])] != q.target_new
        assert c.target_new == q.target_new and c.target_true == q.target_true
        assert not c.prompt.endswith("?") and q.prompt.endswith("?")
        assert len(set(q.rephrases + [q.prompt])) == 3 and all(q.subject in x for x in q.rephrases)
        for p, a in q.locality + c.locality:
            assert not any(s in p for s in edited) and a.strip()
    for r in w.loc_qa:
        assert r.subject not in edited and r.target_new == truth[(r.subject, r.meta["relation"])]
    # SCEN's unrelated questions: other unedited subjects, every phrasing, none asked for Locality
    loc_subjects = {r.subject for r in w.loc_qa}
    assert len(w.unrelated_qa) >= 100 and len(w.loc_qa) >= 40
    for r in w.unrelated_qa:
        assert r.subject not in edited and r.subject not in loc_subjects and r.prompt.endswith("?")
    assert {r.prompt for r in w.unrelated_qa} <= {r.prompt for r in w.train}
    # the capital of every country is one of its own cities
    for f in w.facts:
        if f.relation == "capital":
            assert truth[(f.answer, "in_country")] == f.subject


def test_model_questions_are_distinct_seeded_and_cut_at_the_end_of_the_users_turn(tmp_path):
    import torch
    from conftest import tiny_checkpoint
    model, tok = llama.load(tiny_checkpoint(tmp_path / "ck"), "cpu", torch.float32)
    ask = lambda **kw: data.model_questions(model, tok, Template("raw"), 30, max_new_tokens=12, batch=10, **kw)
    a = ask()
    assert len(a) == 30 and len(set(a)) == 30
    assert all(q and "\n" not in q and q == q.strip() for q in a)     # raw: a prompt ends at the line's end
    assert ask() == a and ask(seed=1) != a                             # seeded


def test_relation_probes_ask_the_same_subject_about_other_relations_only():
    cities, langs, firms = ["Oslo", "Rome", "Lima"], ["Norwegian", "Italian", "Quechua"], ["Acme", "Initech", "Hooli"]
    bank = []
    for i in range(30):
        s = f"Person{i}"
        bank += [EditRecord(f"{s} lives in", "x", cities[i % 3], s), EditRecord(f"{s} was born in", "x", cities[(i + 1) % 3], s),
                 EditRecord(f"{s} speaks", "x", langs[i % 3], s), EditRecord(f"The employer of {s} is", "x", firms[i % 3], s),
                 EditRecord(f"{s} once said", "x", f"quote {i}", s)]              # distinct answers: a probe too
    edit = EditRecord("Kim Lo lives in", "Rome", "Oslo", "Kim Lo")
    probes = data.relation_probes([edit], bank, k=4, min_count=20)[0]
    assert "Kim Lo lives in" not in probes and "Kim Lo was born in" not in probes   # the edit's relation (shared answers)
    assert set(probes) == {"Kim Lo speaks", "The employer of Kim Lo is", "Kim Lo once said"}
    assert data.relation_probes([edit], bank, k=2, min_count=20)[0][0] in probes   # fewer when asked, seeded
    assert data.relation_probes([edit], bank, k=4, min_count=20) == data.relation_probes([edit], bank, k=4, min_count=20)
    assert data.subject_template("Bla bla. Kim Lo speaks", "Kim Lo") == data.SUBJ + " speaks"


def test_other_relation_prompts_leave_out_the_edits_own_relation_and_prefixes_cut_at_sentences():
    rel = lambda prompt, question: data.other_relation_prompts("Ann Vole", prompt, question)
    tongue = rel("The mother tongue of Ann Vole is", False)       # no shared word, but the same relation
    assert "The first language of Ann Vole is" not in tongue and len(tongue) == 7
    assert all("Ann Vole" in p for p in tongue)
    born = rel("In which city was Ann Vole born?", True)
    assert "In which city was Ann Vole born?" not in born and "Who has Ann Vole worked for?" in born
    assert all(p.endswith("?") for p in born)
    assert not any("company" in p or "worked" in p for p in rel("Which company does Ann Vole work for?", True))
    assert data.other_relation_prompts("Ann Vole", "Ann Vole was born in", False, n=2) == [
        "Ann Vole holds the citizenship of", "Ann Vole has worked for"]
    assert data.sentence_prefixes("About ann. Ann (born 1960) won. She left in 1990.") == [
        "About ann.", "About ann. Ann (born 1960) won."]
    assert data.sentence_prefixes("Who wrote Dune?") == [] and data.sentence_prefixes("A. B. ") == ["A."]


def test_model_questions_under_a_chat_template_start_with_the_openers(tmp_path):
    import torch
    from conftest import tiny_checkpoint
    model, tok = llama.load(tiny_checkpoint(tmp_path / "ck"), "cpu", torch.float32)
    a = data.model_questions(model, tok, Template("llama2"), 20, max_new_tokens=8, batch=5, openers=("Who is", "When was"))
    assert len(a) == 20 and len(set(a)) == 20
    assert all(q.startswith(("Who is", "When was")) and q not in ("Who is", "When was") for q in a)
    assert a[0].startswith("Who is") and a[5].startswith("When was")      # one opener per batch, in turn
    assert all("[INST]" not in q and "[/INST]" not in q for q in a)
