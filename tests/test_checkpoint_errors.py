"""Bad checkpoints: each is one CheckpointError line naming the file and the field or tensor (with
what was expected and what was found), raised before any tensor data is read. Plus: exact values
through a dtype conversion, tensors converted one at a time, and Trace's layer indexing."""
import json
import struct
import weakref

import pytest
import torch

import llama
from conftest import tiny_checkpoint, tiny_model

DELETE = object()


def saved(tmp_path, name="ck", **kw):
    """A tiny random checkpoint written by the project's own save function."""
    d = tmp_path / name
    tiny_model(**kw).save_pretrained(d)
    return d


class NoData:
    """A safe_open handle whose tensor data cannot be read: the error must come before that."""
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def get_tensor(self, name):
        raise AssertionError(f"tensor data ({name}) was read before the error")


@pytest.fixture
def no_data(monkeypatch):
    real = llama.open_safetensors
    monkeypatch.setattr(llama, "open_safetensors", lambda path: NoData(real(path)))


def refused(ckpt, *needles):
    with pytest.raises(llama.CheckpointError) as e:
        llama.Llama.from_pretrained(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def edit_config(ckpt, **changes):
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))
    return path


def rewrite(ckpt, mutate, seed=0):
    """model.safetensors rewritten (project writer) from the tiny model's tensors after mutate()."""
    tensors = {n: p.detach().clone() for n, p in tiny_model(seed).named_parameters()}
    mutate(tensors)
    llama.write_safetensors(ckpt / "model.safetensors", tensors, metadata={"format": "pt"})
    return ckpt / "model.safetensors"


# -- config.json ----------------------------------------------------------------------------------

def test_config_missing(tmp_path, monkeypatch):
    ck = saved(tmp_path)
    (ck / "config.json").unlink()
    monkeypatch.setattr(llama, "open_safetensors", lambda p: pytest.fail("weights opened"))
    refused(ck, ck / "config.json", "config.json not found")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_config_not_json(tmp_path, monkeypatch, text):
    ck = saved(tmp_path)
    (ck / "config.json").write_bytes(text.encode("latin-1"))
    monkeypatch.setattr(llama, "open_safetensors", lambda p: pytest.fail("weights opened"))
    refused(ck, ck / "config.json", "invalid JSON")


def test_config_not_an_object(tmp_path):
    ck = saved(tmp_path)
    (ck / "config.json").write_text("[1, 2]")
    refused(ck, ck / "config.json", "expected a JSON object, found list")


@pytest.mark.parametrize("field", llama.LlamaConfig.REQUIRED)
def test_config_missing_required_field(tmp_path, monkeypatch, field):
    ck = saved(tmp_path)
    path = edit_config(ck, **{field: DELETE})
    monkeypatch.setattr(llama, "open_safetensors", lambda p: pytest.fail("weights opened"))
    refused(ck, path, f"missing required field {field}")


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": 0}, "field hidden_size must be a positive integer, got 0"),
    ({"hidden_size": "32"}, "field hidden_size must be a positive integer, got '32'"),
    ({"num_hidden_layers": True}, "field num_hidden_layers must be a positive integer, got True"),
    ({"intermediate_size": 48.0}, "field intermediate_size must be a positive integer, got 48.0"),
    ({"vocab_size": -97}, "field vocab_size must be a positive integer, got -97"),
    ({"num_key_value_heads": 0}, "field num_key_value_heads must be a positive integer, got 0"),
    ({"head_dim": "8"}, "field head_dim must be a positive integer, got '8'"),
    ({"rms_norm_eps": "1e-5"}, "field rms_norm_eps must be a positive number, got '1e-5'"),
    ({"rope_theta": -1.0}, "field rope_theta must be a positive number, got -1.0"),
    ({"tie_word_embeddings": "false"}, "field tie_word_embeddings must be true or false, got 'false'"),
    ({"eos_token_id": "2"}, "field eos_token_id must be an integer, a list of integers or null, got '2'"),
    ({"num_attention_heads": 5, "num_key_value_heads": None, "head_dim": None},
     "field num_attention_heads 5 does not divide hidden_size 32"),
    ({"num_key_value_heads": 3}, "field num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"head_dim": 7}, "head_dim 7 must be even"),
    ({"rope_scaling": "llama3"}, "field rope_scaling must be an object or null, got 'llama3'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "field rope_scaling.low_freq_factor must be"),
])
def test_config_bad_field(tmp_path, monkeypatch, changes, needle):
    ck = saved(tmp_path)
    path = edit_config(ck, **changes)
    monkeypatch.setattr(llama, "open_safetensors", lambda p: pytest.fail("weights opened"))
    refused(ck, path, needle)


def test_config_with_head_dim_need_not_divide_hidden_size(tmp_path):
    # an explicit head_dim (Gemma-style q_proj width) makes hidden_size % heads irrelevant
    cfg = llama.LlamaConfig.from_dict({**tiny_model().config.to_dict(), "hidden_size": 30, "head_dim": 8})
    assert cfg.head_dim == 8


# -- tensors --------------------------------------------------------------------------------------

def test_missing_tensor(tmp_path, no_data):
    ck = saved(tmp_path)
    path = rewrite(ck, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    refused(ck, path, "tensor model.layers.1.mlp.up_proj.weight is missing", "config.json needs shape [48, 32]")


def test_extra_tensor(tmp_path, no_data):
    ck = saved(tmp_path)
    path = rewrite(ck, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    refused(ck, path, "unknown tensor model.layers.0.self_attn.rotary_emb.inv_freq")


def test_wrong_shape(tmp_path, no_data):
    ck = saved(tmp_path)
    path = rewrite(ck, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    refused(ck, path, "tensor model.layers.0.self_attn.k_proj.weight has shape [32, 32]", "config.json needs [16, 32]")


def test_tied_head_copy_of_the_wrong_shape(tmp_path, no_data):
    ck = saved(tmp_path, tie_word_embeddings=True)
    path = rewrite(ck, lambda t: t.update({"lm_head.weight": torch.zeros(96, 32)}))
    refused(ck, path, "tensor lm_head.weight has shape [96, 32]", "needs [97, 32]")


def test_non_float_tensor(tmp_path, no_data):
    ck = saved(tmp_path)
    path = rewrite(ck, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    refused(ck, path, "tensor model.norm.weight has dtype I32", "expected one of F32")


def test_truncated_data(tmp_path, no_data):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    last = list(llama.read_safetensors_header(path)[0])[-1]   # the tensor stored last
    path.write_bytes(path.read_bytes()[:-100])
    refused(ck, path, "truncated", f"tensor {last} needs bytes", f"the file has {path.stat().st_size} bytes")


def test_truncated_inside_the_header(tmp_path, no_data):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    path.write_bytes(path.read_bytes()[:50])
    refused(ck, path, f"corrupt safetensors header: header length {n} bytes, only 42 follow", "truncated")


def test_header_length_beyond_the_file(tmp_path, no_data):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    refused(ck, path, "header length 1099511627776 bytes, only 2 follow")


def test_trailing_bytes_after_the_data(tmp_path, no_data):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    refused(ck, path, f"the header accounts for {size} bytes, the file has {size + 16}")


def test_data_offsets_disagree_with_the_shape(tmp_path, no_data):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [16]                     # 64 bytes for [16] F32, 128 stored
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    refused(ck, path, "tensor model.norm.weight (F32 [16]) needs 64 bytes, its data_offsets span 128")


@pytest.mark.parametrize("content, needle", [
    (b"", "not a safetensors file (0 bytes, shorter than the 8-byte header length)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 5\n", "not a safetensors file: it is a Git LFS pointer"),
    (b"PK\x03\x04" + bytes(60), "not a safetensors file: it is a zip archive (torch.save)"),
    (b"\x80\x02}q\x00." + bytes(60), "not a safetensors file: it is a pickle"),
    (struct.pack("<Q", 4) + b"[1] ", "corrupt safetensors header: expected a JSON object, found list"),
    (struct.pack("<Q", 4) + b"nope", "corrupt safetensors header: not JSON"),
])
def test_not_a_safetensors_file(tmp_path, no_data, content, needle):
    ck = saved(tmp_path)
    path = ck / "model.safetensors"
    path.write_bytes(content)
    refused(ck, path, needle)


# -- sharded checkpoints --------------------------------------------------------------------------

def sharded(tmp_path):
    ck = tmp_path / "ck"
    tiny_model().save_pretrained(ck, max_shard_bytes=20_000)
    index = ck / "model.safetensors.index.json"
    return ck, index, json.loads(index.read_text())["weight_map"]


def test_sharded_missing_tensor_names_its_shard(tmp_path, no_data):
    from safetensors.torch import load_file
    ck, _, wm = sharded(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = ck / wm[name]
    tensors = load_file(shard)
    del tensors[name]
    llama.write_safetensors(shard, tensors, metadata={"format": "pt"})
    refused(ck, shard, f"tensor {name} is missing")


def test_sharded_index_points_to_the_wrong_shard(tmp_path, no_data):
    ck, index, wm = sharded(tmp_path)
    name = "model.norm.weight"
    other = next(s for s in sorted(set(wm.values())) if s != wm[name])
    real = wm[name]
    wm[name] = other
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    refused(ck, ck / real, f"tensor {name} is in this shard", f"lists it for {other}")


def test_sharded_tensor_stored_twice(tmp_path, no_data):
    from safetensors.torch import load_file
    ck, index, wm = sharded(tmp_path)
    shards = sorted(set(wm.values()))
    name = next(n for n, s in wm.items() if s == shards[0])
    extra = load_file(ck / shards[1]) | {name: load_file(ck / shards[0])[name]}
    llama.write_safetensors(ck / shards[1], extra, metadata={"format": "pt"})
    refused(ck, ck / shards[1], f"tensor {name} is stored twice (also in {shards[0]})")


def test_sharded_index_lists_a_tensor_no_shard_holds(tmp_path, no_data):
    ck, index, wm = sharded(tmp_path)
    wm["model.layers.7.mlp.up_proj.weight"] = sorted(set(wm.values()))[0]
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    refused(ck, index, "tensor model.layers.7.mlp.up_proj.weight is listed for", "which does not hold it")


def test_sharded_index_not_json(tmp_path, no_data):
    ck, index, _ = sharded(tmp_path)
    index.write_text("{")
    refused(ck, index, "invalid index")


# -- the tokenizer against the embedding ----------------------------------------------------------

def test_tokenizer_with_more_ids_than_embedding_rows(tmp_path, monkeypatch):
    ck = tiny_checkpoint(tmp_path / "ck", vocab_size=60)         # the tokenizer has 68 ids
    monkeypatch.setattr(llama, "load_model", lambda *a, **k: pytest.fail("weights loaded before the error"))
    for call in (llama.load, llama.load_tokenizer):
        with pytest.raises(llama.CheckpointError) as e:
            call(ck)
        msg = str(e.value)
        assert "\n" not in msg
        for needle in (ck / "tokenizer.json", "tokenizer has 68 ids", "embedding has 60 rows", "vocab_size"):
            assert str(needle) in msg, msg


@pytest.mark.parametrize("vocab", [68, 120])
def test_tokenizer_with_fewer_or_equal_ids_loads(tmp_path, vocab):
    model, tok = llama.load(tiny_checkpoint(tmp_path / "ck", vocab_size=vocab))
    assert tok.vocab_size == 68 <= model.config.vocab_size == vocab


# -- good checkpoints -----------------------------------------------------------------------------

def test_bf16_checkpoint_loads_into_float32_exactly(tmp_path):
    from safetensors.torch import load_file
    model = tiny_model(seed=11)
    model.save_pretrained(tmp_path, dtype="bfloat16")
    stored = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    back = llama.load_checkpoint(tmp_path, dtype=torch.float32)
    params = dict(back.named_parameters())
    assert set(params) == set(stored)
    for name, p in params.items():
        assert p.dtype == torch.float32
        assert torch.equal(p, stored[name].float()), name
        assert torch.equal(p, dict(model.named_parameters())[name].detach().bfloat16().float()), name
    same = llama.load_checkpoint(tmp_path, dtype="bfloat16")       # and bit for bit when kept in bf16
    assert all(torch.equal(p.view(torch.int16), stored[n].view(torch.int16)) for n, p in same.named_parameters())


def test_tensors_are_converted_one_at_a_time(tmp_path, monkeypatch):
    """Each stored tensor is freed once converted: never two bf16 originals alive at a time."""
    tiny_model(seed=12).save_pretrained(tmp_path, dtype="bfloat16", max_shard_bytes=20_000)
    real, alive, reads = llama.open_safetensors, [], []

    class Watch(NoData):
        def get_tensor(self, name):
            assert all(r() is None for r in alive), f"a stored tensor was still alive when {name} was read"
            t = self.f.get_tensor(name)
            alive.append(weakref.ref(t))
            reads.append(name)
            return t
    monkeypatch.setattr(llama, "open_safetensors", lambda path: Watch(real(path)))
    back = llama.load_checkpoint(tmp_path, dtype=torch.float32)
    assert sorted(reads) == sorted(n for n, _ in back.named_parameters())


# -- Trace ----------------------------------------------------------------------------------------

def test_trace_indexing_is_the_same_under_forward_trace_and_run_layers():
    model = tiny_model(seed=13, num_hidden_layers=3)
    x = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        h0 = model.embed(x)
        outs, h = [], h0                                           # block l's output, one block at a time
        for l in range(3):
            h = model.run_layers(h, l, l + 1)
            outs.append(h)
        full = model.forward_trace(x)
        part = llama.Trace()
        model.run_layers(h0, 0, 3, trace=part)
        late = llama.Trace()
        model.run_layers(outs[0], 1, 3, trace=late)               # blocks 1 and 2 only
    for l in range(3):
        for tr in (full, part):
            assert torch.allclose(tr.block_output(l), outs[l], atol=1e-6)
            assert torch.equal(tr.block_input(l), h0 if l == 0 else tr.block_output(l - 1))
        assert torch.equal(full.down_proj_input(l), part.down_proj_input(l))
    for l in (1, 2):
        assert torch.allclose(late.block_output(l), outs[l], atol=1e-6)
        assert torch.allclose(late.down_proj_input(l), full.down_proj_input(l), atol=1e-6)
    assert torch.equal(late.block_input(2), late.block_output(1))
    assert torch.equal(late.block_input(1), outs[0]) and torch.equal(late.block_output(0), outs[0])
    with pytest.raises(IndexError, match="block -1 was not run"):
        late.block_input(0)
    with pytest.raises(IndexError, match="block 3 was not run"):
        full.block_output(3)
    # the raw lists keep the offsets that callers (memit.py, scen.py, test_nse.py) index by
    assert len(full.hidden) == 4 and len(part.hidden) == 3 and full.blocks == part.blocks == [0, 1, 2]
    assert torch.equal(full.hidden[0], h0)
    for l in range(3):
        assert torch.equal(full.hidden[l + 1], part.hidden[l])
    assert late.blocks == [1, 2] and torch.equal(late.hidden[0], late.block_output(1))
