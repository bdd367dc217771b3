"""eval.py: every metric on hand-made cases with known values, the batched teacher-forced pass
against hand computation, the pluggable model interface, reports and the CLI."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
import eval as ev  # noqa: E402
import harness  # noqa: E402
import llama  # noqa: E402
from data import EditRecord, Template  # noqa: E402


class CharTok:
    """Character tokenizer: <pad>=0, <s>=1, </s>=2, ' '=3, 'a'..'z'=4..29, '?'=30, '.'=31, '\\n'=32."""
    vocab_size, bos_id, eos_id, pad_id, add_bos, chat_format = 33, 1, 2, None, True, "none"
    chars = " abcdefghijklmnopqrstuvwxyz?.\n"

    def encode(self, text, bos=None, eos=False):
        ids = [1] if (self.add_bos if bos is None else bos) else []
        ids += [3 + self.chars.index(c) for c in text]
        return ids + ([2] if eos else [])

    def decode(self, ids, skip_special=False):
        sp = {0: "<pad>", 1: "<s>", 2: "</s>"}
        return "".join(("" if skip_special else sp[i]) if i in sp else self.chars[i - 3] for i in ids)

    def id_to_piece(self, i):
        return self.decode([i])


V = CharTok.vocab_size


def cid(c):
    return 3 + CharTok.chars.index(c)


class BigramEM:
    """A fake model: the logits after token x are table[x] (so p(y | x) is known in closed form);
    generate() returns the text of `answers[prompt ids]`."""

    def __init__(self, preferred=(), answers=None, tok=None):
        self.table = torch.zeros(V, V)
        for x, y in preferred:                      # p(y|x) = 3 / (V + 2), the others 1 / (V + 2)
            self.table[x, y] = math.log(3)
        self.answers, self.tok, self.calls = answers or {}, tok, []

    def logits(self, tokens, attention_mask, prompt_end):
        self.calls.append(("logits", tokens.clone(), prompt_end.clone()))
        return self.table[tokens]

    def generate(self, prompts, max_new_tokens, *, stop_strings=(), temperature=0.0, top_k=None,
                 generator=None):
        self.calls.append(("generate", [list(p) for p in prompts]))
        return [self.tok.encode(self.answers.get(tuple(p), ""), bos=False)[:max_new_tokens] for p in prompts]


# NLL of a preferred transition, of another token in a row with a preference, in a uniform row
LOW, HIGH, FLAT = math.log((V + 2) / 3), math.log(V + 2), math.log(V)


# ---------------------------------------------------------------------------------------------
# Metric functions
# ---------------------------------------------------------------------------------------------
def test_exact_match_and_token_accuracy():
    assert ev.exact_match(" Paris \n", "Paris") and not ev.exact_match("paris", "Paris")
    assert not ev.exact_match("Paris, France", "Paris")
    assert ev.token_accuracy([5, 6, 7, 8], [5, 0, 7, 0]) == 0.5
    with pytest.raises(ValueError):
        ev.token_accuracy([], [])
    assert ev.mean_percent([True, False, True, True]) == 75.0
    assert math.isnan(ev.mean_percent([]))
    assert ev.unchanged_rate(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(200 / 3)
    assert ev.unchanged_tokens([[1, 2], [3, 4, 5, 6]], [[1, 9], [3, 4, 5, 6]]) == 75.0
    with pytest.raises(ValueError):
        ev.unchanged_rate(["a"], [])


def test_ngram_entropy_and_fluency_by_hand():
    # words a b a b: bigrams ab x2, ba x1 -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expect = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ev.ngram_entropy("a b a b") == pytest.approx(expect)
    assert ev.words("Hello, world's end.") == ["Hello", ",", "world", "'", "s", "end", "."]
    assert ev.ngram_entropy("the the the the") == 0.0
    assert ev.ngram_entropy("one") == 0.0
    assert ev.fluency(["a b a b", "the the the the"]) == pytest.approx(100 * expect / 2)


def test_perplexity_formula():
    assert ev.perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        ev.perplexity([])


# ---------------------------------------------------------------------------------------------
# Batched primitives on a fake model with known probabilities
# ---------------------------------------------------------------------------------------------
def test_score_targets_matches_hand_nll():
    tok = CharTok()
    # "ab" + " c": tokens <s> a b ' ' c ; target = ' ', 'c'. Preferred: b->' ' only.
    em = BigramEM(preferred=[(cid("b"), cid(" "))])
    out = ev.score_targets(em, tok, Template("raw"), [("ab", "c"), ("xyzw", "cd")], batch_size=2)
    assert out[0]["ids"] == [cid(" "), cid("c")]
    assert out[0]["nll"] == pytest.approx([LOW, FLAT])
    assert out[1]["nll"] == pytest.approx([FLAT, FLAT, FLAT])
    em2 = BigramEM(preferred=[(cid("b"), cid(" ")), (cid("b"), cid("c")), (cid(" "), cid("a"))])
    out = ev.score_targets(em2, tok, Template("raw"), [("ab", "c")])
    assert out[0]["nll"] == pytest.approx([math.log((V + 4) / 3), math.log(V + 2)])
    assert out[0]["argmax"][0] == cid(" ")                   # the preferred token is the argmax
    # the teacher-forced pass saw right padding and each row's last prompt token
    _, tokens, pend = em.calls[0]
    assert tokens.shape == (2, 8) and sorted(pend.tolist()) == [2, 4]
    with_eos = ev.score_targets(em, tok, Template("raw"), [("ab", "c")], add_eos=True)
    assert with_eos[0]["ids"] == [cid(" "), cid("c"), 2]


def test_evaluate_counterfact_by_hand():
    tok = CharTok()
    # record 1: prompt "ab", new "c", true "d". b->' ' shared; ' '->c preferred -> new wins.
    # record 2: prompt "ef", new "g", true "h"; ' '->h preferred -> true wins.
    # rephrase "ab" (same prompt) -> new wins; neighbourhood of record 1: ("ij", "d"): ' '->c is
    # preferred, so d loses to new c -> specificity 0; record 2 neighbour ("kl", "h"): true wins.
    em = BigramEM(preferred=[(cid(" "), cid("c")), (cid(" "), cid("h"))])
    recs = [EditRecord("ab", "c", "d", rephrases=["ab", "xy"], locality=[("ij", "d")]),
            EditRecord("ef", "g", "h", rephrases=["ef"], locality=[("kl", "h"), ("mn", "h")])]
    figs = ev.evaluate_counterfact(em, tok, recs, with_fluency=False)
    assert figs["Efficacy"]["value"] == 50.0
    # record 1: "ab" new wins, "xy" new wins (both ' '->c preferred); record 2: "ef" true wins
    assert figs["Generalization"]["value"] == 50.0
    # record 1: 0/1; record 2: 2/2 -> mean per record = 50
    assert figs["Specificity"]["value"] == 50.0
    assert figs["Efficacy"]["n"] == 2 and "NLL" in figs["Efficacy"]["protocol"]
    with pytest.raises(ValueError, match="target_true"):
        ev.evaluate_counterfact(em, tok, [EditRecord("ab", "c")], with_fluency=False)


def test_evaluate_qa_both_protocols_and_unchanged():
    tok = CharTok()
    tm = Template("raw")
    P = lambda s: tuple(data.encode_prompt(tok, tm, s))
    before = BigramEM(answers={P("where is a"): "paris", P("where is b"): "rome"}, tok=tok,
                      preferred=[(cid(" "), cid("r"))])
    after = BigramEM(answers={P("where is x"): "oslo", P("where is y"): "oslo\nmore",
                              P("where is a"): "paris", P("where is b"): "lima"}, tok=tok,
                     preferred=[(cid(" "), cid("o"))])
    recs = [EditRecord("where is x", "oslo", rephrases=["where is y", "where is z"],
                       locality=[("where is a", "paris")]),
            EditRecord("where is w", "bern", locality=[("where is b", "rome")])]
    snap = ev.snapshot(before, tok, tm, [p for r in recs for p in r.locality])
    assert snap["texts"] == ["paris", "rome"]
    details = {}
    figs = ev.evaluate_qa(after, tok, tm, recs, before=snap, details=details)
    assert figs["Reliability (gen)"]["value"] == 50.0          # oslo right, bern wrong
    assert figs["Generality (gen)"]["value"] == 50.0           # "oslo\nmore" is cut at "\n"
    assert details["Generality"][0]["generated"] == "oslo"
    assert figs["Locality (gen)"]["value"] == 50.0             # paris still right, rome -> lima
    assert figs["Locality unchanged (gen)"]["value"] == 50.0
    # teacher-forced: target " oslo" = 5 tokens; the model's argmax after ' ' is 'o', after
    # anything else token 0 (all-zero rows): only the 'o' after the space matches (1/5);
    # " bern": 'b' after ' ' is not 'o' (0/5)
    assert figs["Reliability (tf)"]["value"] == pytest.approx(100 * (1 / 5 + 0 / 5) / 2)
    # argmax before: ' '->'r'; after: ' '->'o'; other positions argmax 0 both times
    # loc " paris" (6 tokens) and " rome" (5 tokens): position after ' ' changed, rest same
    assert figs["Locality unchanged (tf)"]["value"] == pytest.approx(100 * ((5 / 6) + (4 / 5)) / 2)
    assert "generation exact match" in figs["Reliability (gen)"]["protocol"]
    assert "teacher-forced" in figs["Reliability (tf)"]["protocol"]
    with pytest.raises(ValueError, match="other locality pairs"):
        ev.evaluate_qa(after, tok, tm, recs, loc_pairs=[("where is a", "paris")], before=snap)


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) Llama through LlamaEvalModel
# ---------------------------------------------------------------------------------------------
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = llama.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=V, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=[2])
    return llama.Llama(cfg).reset_parameters(std=0.3).eval()


def test_perplexity_equals_hand_computation_and_batching():
    tok, model = CharTok(), tiny_llama()
    pairs = [("ab", "cde"), ("hello there", "x"), ("q", "long text here")]
    em = ev.LlamaEvalModel(model, tok, Template("raw"))
    figs = ev.evaluate_perplexity(em, tok, pairs, batch_size=3)
    per = []
    for p, t in pairs:
        ids = tok.encode(p) + tok.encode(" " + t, bos=False)
        n_p = len(tok.encode(p))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        nll = [-logp[i - 1, ids[i]].item() for i in range(n_p, len(ids))]
        per.append(math.exp(sum(nll) / len(nll)))
    assert figs["PPL"]["per_sample"] == pytest.approx(per, rel=1e-5)
    assert figs["PPL"]["value"] == pytest.approx(sum(per) / 3, rel=1e-5)
    one = ev.evaluate_perplexity(em, tok, pairs, batch_size=1)
    cut = ev.evaluate_perplexity(em, tok, [("q", "long text here")], max_len=6)   # <s> q ' ' l o n
    assert len(ev.score_targets(em, tok, Template("raw"), [("q", "long text here")], max_len=6)[0]["nll"]) == 4
    assert cut["PPL"]["n"] == 1
    assert one["PPL"]["per_sample"] == pytest.approx(per, rel=1e-5)
    tw = figs["PPL (token-weighted)"]["value"]
    assert min(per) <= tw <= max(per)


def test_prepare_hook_sees_prompt_end_and_generation_matches_llama():
    tok, model = CharTok(), tiny_llama(1)
    seen = []
    em = ev.LlamaEvalModel(model, tok, Template("raw"),
                           prepare=lambda t, m, pe: seen.append((t.shape, pe.tolist())))
    ev.score_targets(em, tok, Template("raw"), [("abc", "d"), ("a", "bb")], batch_size=2)
    assert seen[-1] == ((2, 6), [3, 1])                         # <s>abc -> index 3; <s>a -> 1
    texts = ev.generate_answers(em, tok, Template("raw"), ["abc", "a"], max_new_tokens=5, stop_strings=())
    assert seen[-1] == ((2, 4), [3, 3])                         # left-padded prefill: T - 1
    ref = llama.generate(model, [tok.encode("abc"), tok.encode("a")], 5, eos_ids=[2], pad_id=2)
    assert texts == [tok.decode(r).strip() for r in ref]
    with pytest.raises(TypeError):
        ev.as_eval_model(object(), tok, Template("raw"))


# ---------------------------------------------------------------------------------------------
# Report and CLI
# ---------------------------------------------------------------------------------------------
def test_report_write(tmp_path):
    r = harness.Report("t", {"a": 1})
    with r.timer("x"):
        pass
    r.add("s", {"Efficacy": ev.metric(50.0, "proto", 2)})
    j, m = r.write(tmp_path / "out")
    d = json.loads(j.read_text())
    assert d["results"]["s"]["Efficacy"] == {"value": 50.0, "protocol": "proto", "n": 2}
    assert "x" in d["timings_s"] and d["args"] == {"a": 1}
    assert "| Efficacy | 50.00 | 2 | proto |" in m.read_text()
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]


def test_cli_on_tiny_checkpoint(tmp_path, capsys):
    from test_data import make_sp_tokenizer
    tok = make_sp_tokenizer(tmp_path / "ck")
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=tok.vocab_size, max_position_embeddings=128)
    llama.Llama(cfg).reset_parameters(std=0.2).save_pretrained(tmp_path / "ck")
    qa = tmp_path / "qa.jsonl"
    data.save_jsonl([EditRecord("Where was Ada born?", "Paris", rephrases=["Where was Ada born?"],
                                locality=[("Who does Bob work for?", "Acme Labs")])], qa)
    rep = harness.eval_main(["--ckpt", str(tmp_path / "ck"), "--data", str(qa), "--out", str(tmp_path / "o"),
                   "--max-new-tokens", "4"])
    assert set(rep.sections["unedited"]) >= {"Reliability (gen)", "Reliability (tf)", "Locality (gen)"}
    assert rep.args["template_used"] == "llama2"
    assert (tmp_path / "o" / "results.json").exists()
    cf = tmp_path / "cf.jsonl"
    data.save_jsonl([EditRecord("Ada was born in", "Paris", "Rome", "Ada", ["Ada is from"],
                                [("Bob was born in", "Rome")])], cf)
    rep = harness.eval_main(["--ckpt", str(tmp_path / "ck"), "--data", str(cf), "--no-fluency"])
    assert set(rep.sections["unedited"]) == {"Efficacy", "Generalization", "Specificity"}
    hall = tmp_path / "hall.json"
    hall.write_text(json.dumps([{"text": "Ada was born in Paris.", "labels": "Bob works for Acme Labs.",
                                 "concept": "ada"}, {"text": "hello world. (band) .NET"}]))
    rep = harness.eval_main(["--ckpt", str(tmp_path / "ck"), "--data", str(hall)])
    ppl = rep.sections["unedited"]["PPL"]
    assert len(ppl["per_sample"]) == 2 and ppl["value"] == pytest.approx(sum(ppl["per_sample"]) / 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "target_new": ""}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: target_new: empty target"):
        harness.eval_main(["--ckpt", str(tmp_path / "ck"), "--data", str(bad)])


def test_relation_specificity_is_100_unedited_and_drops_when_the_subject_key_is_overwritten():
    from conftest import tiny_model
    tok = CharTok()
    model = tiny_model(3, vocab_size=V, num_hidden_layers=2)
    em = ev.as_eval_model(model, tok, Template("raw"))
    edits = [EditRecord("kim lo lives in", "oslo", "rome", "kim lo"), EditRecord("ann pi sings", "jazz", "rock", "ann pi")]
    probes = [["kim lo speaks", "kim lo works for", "kim lo is a", "kim lo plays the"],
              ["ann pi was born in", "ann pi owns", "ann pi likes", "ann pi is from"]]
    snap = ev.relation_snapshot(em, tok, edits, probes, max_new_tokens=4)
    assert len(snap["pairs"]) >= 4 and set(snap["owner"]) == {0, 1}
    assert all(a and "." not in a and "," not in a for _, a in snap["pairs"])      # answers cut at punctuation
    same = ev.evaluate_relation_specificity(em, tok, edits, snap)
    assert same["Relation specificity (unchanged, tf)"]["value"] == 100.0
    assert same["Relation specificity (own > new)"]["n"] == 2
    # a rank-one write on the down projection, keyed on the subject's last token: the subject's other facts move
    with torch.no_grad():
        trace = model.forward_trace(torch.tensor([tok.encode("kim lo")]))
        k = trace.ffn_in[0][0, -1]
        g = torch.Generator().manual_seed(0)
        v = torch.randn(model.config.hidden_size, generator=g) * 50
        model.layers[0].mlp.down_proj.weight += torch.outer(v, k) / k.dot(k)
    hit = ev.evaluate_relation_specificity(em, tok, edits, snap)
    assert hit["Relation specificity (unchanged, tf)"]["value"] < 100.0
