"""Tokenizer tests: a SentencePiece model trained here, a byte-level BPE tokenizer.json written
here by hand (expected ids worked out by hand), bad input, and optional parity checks against
the reference tokenizers on ../shared (skipped when shared/ or the reference library is absent).
Nothing is downloaded."""
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama
from llama import BPETokenizer, SentencePieceTokenizer, Tokenizer, format_chat, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA2_SP = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
WIKITEXT = SHARED / "data" / "wikitext" / "wikitext-2-raw-test.txt"

def sentences(n, seed=0):
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old king", "two birds", "Paris", "the river"]
    verb = ["sees", "likes", "follows", "finds", "was near", "sang to", "will meet"]
    obj = ["the house", "a red ball", "the garden", "three apples", "the city of Rome", "it"]
    return [f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}{rng.choice('.!?')}"
            for _ in range(n)]

# ----------------------------------------------------------------------------- SentencePiece

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(400)), model_prefix=str(d / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, split_digits=True,  # as Llama's
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True)
    return d

def test_sp_matches_sentencepiece(sp_dir):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (300, 1, 2, None, True)
    for text in sentences(50, seed=1) + ["Zürich ☃ 42", "  two  spaces", "line\nbreak"]:
        ids = sp.encode(text)
        assert tok.encode(text) == [1] + ids                 # BOS by default
        assert tok.encode(text, bos=False, eos=True) == ids + [2]
        assert tok.decode(tok.encode(text, bos=False)) == text   # byte fallback makes it lossless
        assert tok.decode(tok.encode(text)) == "<s>" + text
    assert any(sp.is_byte(i) for i in tok.encode("☃"))

def test_sp_special_tokens_in_text(sp_dir):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    ids = tok.encode("<s>the cat</s><unk>", bos=False)
    assert ids[0] == 1 and ids[-2:] == [2, 0] and ids[1:-2] == tok.encode("the cat", bos=False)
    assert tok.decode(ids, skip_special=True) == "the cat"
    assert tok.decode(ids) == "<s>the cat</s><unk>"
    assert tok.id_to_piece(1) == "<s>"

def test_sp_load_with_config(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None, "add_bos_token": False,
        "chat_template": "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_format) == (1, 2, None, False, "llama2")
    assert tok.encode("a dog")[0] != 1 and tok.encode("a dog", bos=True)[0] == 1
    assert format_chat(tok, " Hi ") == "[INST] Hi [/INST]"
    assert format_chat(tok, "Hi", system="Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"

# ----------------------------------------------------------------------------- byte-level BPE

def byte_chars():
    """GPT-2's byte -> char map, written out again here so the test does not trust the code."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}

# merges in rank order; each new token gets the next id from 256 on (bytes are ids 0..255)
MERGES = ["h e", "l l", "e l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġ t", "Ġt he"]
HE, LL, EL, HELL, HELLO, G_W, OR, G_WOR, G_T, G_THE = range(256, 266)
YELL, EOT, IM_START, IM_END = 266, 267, 268, 269   # added tokens come after the model vocab
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

def write_bpe(folder, merge_form="strings", pre="bytelevel", ignore_merges=False, prefix_space=False, **changes):
    vocab = {c: b for b, c in byte_chars().items()}
    for i, m in enumerate(MERGES):
        vocab[m.replace(" ", "")] = 256 + i
    vocab["yell"] = YELL        # in the vocab but not reachable by the merges
    added = [{"id": i, "content": c, "special": True, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False}
             for i, c in [(EOT, "<|endoftext|>"), (IM_START, "<|im_start|>"), (IM_END, "<|im_end|>")]]
    byte_level = {"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": True, "use_regex": pre == "bytelevel"}
    d = {"version": "1.0", "added_tokens": added, "normalizer": None,
         "pre_tokenizer": byte_level if pre == "bytelevel" else {"type": "Sequence", "pretokenizers": [
             {"type": "Split", "pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated", "invert": False}, byte_level]},
         "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
         "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                   "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                   "vocab": vocab, "merges": MERGES if merge_form == "strings" else [m.split(" ") for m in MERGES]}}
    d.update(changes)
    (folder / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    return folder / "tokenizer.json"

@pytest.mark.parametrize("merge_form", ["strings", "lists"])
@pytest.mark.parametrize("pre", ["bytelevel", "split"])
def test_bpe_hand_made(tmp_path, merge_form, pre):
    tok = BPETokenizer(write_bpe(tmp_path, merge_form, pre))
    assert tok.vocab_size == 270 and not tok.add_bos and tok.bos_id is None
    # "hello" merges h+e, l+l, he+ll, hell+o; " world": Ġ+w and o+r, then Ġw+or; " the": h+e, Ġ+t, Ġt+he
    assert tok.encode("hello world the") == [HELLO, G_WOR, ord("l"), ord("d"), G_THE]
    assert tok.encode("yell") == [ord("y"), ord("e"), LL]     # "l l" (rank 1) beats "e l" (rank 2)
    assert tok.encode("  x\ny") == [32, 32, ord("x"), 10, ord("y")]  # "  x" -> " " + " x"; ids = byte values
    assert tok.encode("é") == [0xC3, 0xA9]                   # UTF-8 bytes
    assert tok.id_to_piece(G_W) == "Ġw" and tok.id_to_piece(32) == "Ġ" and tok.id_to_piece(10) == "Ċ"
    text = "<|im_start|>user\nhello<|im_end|>\n"
    ids = tok.encode(text)
    assert ids == [IM_START, ord("u"), ord("s"), ord("e"), ord("r"), 10, HELLO, IM_END, 10]
    assert tok.decode(ids) == text and tok.decode(ids, skip_special=True) == "user\nhello\n"
    for s in ["hello world the", "Grüße, 世界! 😀  x\n\n\ty", text + "<|endoftext|>"]:
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="EOS"):
        tok.encode("hi", eos=True)                           # no EOS token known yet

def test_bpe_ignore_merges(tmp_path):
    assert BPETokenizer(write_bpe(tmp_path, ignore_merges=True)).encode("yell") == [YELL]
    assert BPETokenizer(write_bpe(tmp_path, ignore_merges=False)).encode("yell") == [ord("y"), ord("e"), LL]

def test_bpe_add_prefix_space(tmp_path):
    """GPT-2 style ByteLevel(add_prefix_space=true): each stretch of text between added tokens
    gets a leading space, so "hello" -> "Ġhello" and "the" -> "Ġthe"."""
    tok = BPETokenizer(write_bpe(tmp_path, prefix_space=True))
    assert tok.encode("hello") == [32, HELLO]
    assert tok.encode("<|im_start|>the<|im_end|>") == [IM_START, G_THE, IM_END]

def test_bpe_hand_made_matches_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    for pre, prefix_space in [("bytelevel", False), ("split", False), ("bytelevel", True)]:
        path = write_bpe(tmp_path, pre=pre, prefix_space=prefix_space)
        ref, tok = tokenizers.Tokenizer.from_file(str(path)), BPETokenizer(path)
        for s in ["hello world the yell", "<|im_start|>user\nhello<|im_end|>\n", " Grüße,  世界!\n\n x"]:
            assert tok.encode(s) == ref.encode(s).ids

def test_bpe_load_with_config(tmp_path):
    write_bpe(tmp_path)
    template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a test bot.<|im_end|>\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_format) == (IM_START, IM_END, EOT, False, "chatml")
    assert tok.encode("hello", eos=True) == [HELLO, IM_END]
    prompt = format_chat(tok, "hello")
    assert prompt == ("<|im_start|>system\nYou are a test bot.<|im_end|>\n"
                      "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert format_chat(tok, "hello", system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    # a ChatML template without a literal system prompt: no default system turn
    generic = "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": generic}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "chatml" and tok.default_system is None
    assert format_chat(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # config.json ids are the fallback when tokenizer_config.json says nothing
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": EOT, "eos_token_id": [IM_END, EOT]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.chat_format) == (EOT, IM_END, "none")
    assert format_chat(tok, "hello") == "hello"
    jinja2 = pytest.importorskip("jinja2")   # the template itself renders to the same prompt
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert prompt == rendered

def test_llama3_style_tokenizer_matches_tokenizers_library(tmp_path):
    """Train a tiny Llama-3-style tokenizer (Split regex + ByteLevel without regex, ignore_merges,
    BOS added by a TemplateProcessing post-processor) with the reference library."""
    tk = pytest.importorskip("tokenizers")
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    ref = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated"),
                                                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.train_from_iterator(sentences(400), tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|eot_id|>"], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bos = ref.token_to_id("<|begin_of_text|>")
    ref.post_processor = tk.processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.bos_id == bos
    for s in sentences(100, seed=2) + ["I'M here, 123456 don'T\r\n\n  x<|eot_id|>", "Ünïcödé ½ 😀"]:
        assert tok.encode(s) == ref.encode(s).ids
        assert tok.decode(tok.encode(s), skip_special=True) == ref.decode(ref.encode(s).ids)

# ----------------------------------------------------------------------------- bad input

def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(llama.CheckpointError, match=str(tmp_path)):
        load_tokenizer(tmp_path)

@pytest.mark.parametrize("change, field", [
    ({"model": {"type": "WordPiece", "vocab": {}}}, "model.type"),
    ({"normalizer": {"type": "Lowercase"}}, "normalizer"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel"}]}}, "pre_tokenizer"),
    ({"decoder": {"type": "Metaspace"}}, "decoder"),
])
def test_unsupported_tokenizer_json(tmp_path, change, field):
    path = write_bpe(tmp_path, **change)
    with pytest.raises(ValueError, match=field) as e:
        load_tokenizer(tmp_path)
    assert str(path) in str(e.value)

def test_bad_special_token_in_config(tmp_path):
    write_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(tmp_path)

# ----------------------------------------------------------------------------- optional: ../shared

@pytest.mark.skipif(not LLAMA2_SP.exists(), reason="../shared absent")
def test_llama2_tokenizer():
    tok = SentencePieceTokenizer(LLAMA2_SP)
    assert tok.encode("The capital of France is") == [1, 450, 7483, 310, 3444, 338]
    assert tok.decode([1, 450, 7483, 310, 3444, 338], skip_special=True) == "The capital of France is"

@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists() or not WIKITEXT.exists(), reason="../shared absent")
def test_smollm2_matches_tokenizers_library():
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    tok = load_tokenizer(SMOLLM2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_format) == (1, 2, 2, False, "chatml")
    lines = [s.rstrip("\r\n") for s in WIKITEXT.read_text(encoding="utf-8").splitlines()]
    lines = [s for s in lines if s.strip()][:500]
    chat = format_chat(tok, "What is the capital of France?")
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    for s in lines + [chat, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "\n".join(lines[:50])]:
        ids = tok.encode(s)
        assert ids == ref.encode(s).ids, s
        assert tok.decode(ids) == s


def test_ids_past_the_vocabulary_decode_to_nothing(tmp_path):
    """A model whose embedding is padded past its tokenizer can sample such ids (tokenizers: '')."""
    from conftest import tiny_checkpoint
    tok = llama.load_tokenizer(tiny_checkpoint(tmp_path))
    ab = tok.encode("ab")
    assert tok.decode([ab[0], 119, ab[1]]) == tok.decode(ab) == "ab"
