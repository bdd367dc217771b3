"""llama.py: model maths, strict checkpoints, generation, bad input, and parity with the reference."""
import importlib.util
import json
import struct

import pytest
import torch

import llama
from conftest import assert_same_greedy, shared_path, tiny_config, tiny_model

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def greedy_no_cache(model, ids, n):
    """Reference decoding: recompute the whole sequence for every new token."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


# -- model maths --------------------------------------------------------------------------------

def test_rmsnorm_matches_formula():
    norm = llama.RMSNorm(4, eps=1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]])           # mean of squares = 25/4 -> rms 2.5
    expected = torch.tensor([[3 / 2.5, -8 / 2.5, 0.0, 0.0]])
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_rope_rotates_half_pairs_and_preserves_norm():
    cfg = tiny_config(head_dim=4, num_attention_heads=8)   # head_dim 4 -> frequencies 1, 1/100
    cos, sin = llama.rope_cos_sin(cfg, torch.tensor([[1]]), torch.float32)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)   # (B, heads, T, hd)
    y = llama.apply_rope(x, cos, sin).flatten()
    # pair (x0, x2) rotated by angle 1 * theta_0 = 1 rad: (cos 1, 0, sin 1, 0)
    assert torch.allclose(y, torch.tensor([torch.cos(torch.tensor(1.0)), 0, torch.sin(torch.tensor(1.0)), 0]), atol=1e-6)
    z = torch.randn(1, 1, 1, 4)
    assert torch.allclose(llama.apply_rope(z, cos, sin).norm(), z.norm(), atol=1e-5)


def test_forward_is_causal_and_trace_exposes_down_proj_input():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 9))
    trace = model.forward_trace(x)
    logits = model(x)
    assert logits.shape == (2, 9, 97)
    assert torch.equal(trace.logits, logits)
    assert len(trace.hidden) == 3 and len(trace.ffn_in) == 2 and trace.ffn_in[0].shape == (2, 9, 48)
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 97                       # change the future: the past must not move
    assert torch.allclose(model(y)[:, :5], logits[:, :5], atol=1e-6)
    # the traced down_proj input is what the down projection really consumed
    blk = model.layers[1]
    h_mid = trace.hidden[1]  # block 1's input; recompute its attention half by hand
    cos, sin = llama.rope_cos_sin(model.config, torch.arange(9).expand(2, 9), torch.float32)
    mask, _ = model._mask_and_positions(2, 9, x.device, None, None, None)
    h_att = h_mid + blk.self_attn(blk.input_layernorm(h_mid), cos, sin, mask)
    assert torch.allclose(trace.ffn_in[1], blk.mlp.intermediate(blk.post_attention_layernorm(h_att)), atol=1e-6)


def test_down_proj_is_swappable_and_gradients_flow():
    model = tiny_model()
    x = torch.randint(0, 97, (1, 6))
    before = model(x)

    class Zero(torch.nn.Module):
        def forward(self, u):
            return torch.zeros(*u.shape[:-1], 32)

    old = model.layers[0].mlp.down_proj
    model.layers[0].mlp.down_proj = Zero()
    assert not torch.allclose(model(x), before)
    model.layers[0].mlp.down_proj = old
    assert torch.equal(model(x), before)
    loss = torch.nn.functional.cross_entropy(model(x)[0, :-1], x[0, 1:])
    loss.backward()
    assert old.weight.grad is not None and old.weight.grad.abs().sum() > 0


def test_run_layers_in_pieces_equals_forward():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 7))
    h = model.run_layers(model.embed(x), 0, 1)
    assert torch.allclose(model.head(model.run_layers(h, 1, 2)), model(x), atol=1e-6)


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_is_bit_identical(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    header, _ = llama.read_safetensors_header(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in header) == (not tied)       # a tied head is stored once
    back = llama.Llama.from_pretrained(tmp_path)
    assert back.config == model.config
    for (n, p), (m, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(p, q)
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_sharded_save_and_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    back = llama.Llama.from_pretrained(tmp_path)
    x = torch.randint(0, 97, (1, 5))
    assert torch.equal(back(x), model(x))
    model.save_pretrained(tmp_path)                          # re-save unsharded: old shards go away
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_dtype_conversion_on_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = llama.Llama.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.lm_head.weight.dtype == torch.float32
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.bfloat16().float())


def _break(tmp_path, fn):
    tiny_model().save_pretrained(tmp_path)
    fn(tmp_path)
    with pytest.raises(llama.CheckpointError) as e:
        llama.Llama.from_pretrained(tmp_path)
    return str(e.value)


def _rewrite(path, mutate):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


def test_bad_checkpoints_name_the_culprit(tmp_path):
    msg = _break(tmp_path / "a", lambda d: (d / "config.json").unlink())
    assert "config.json not found" in msg
    msg = _break(tmp_path / "b", lambda d: _rewrite(d / "model.safetensors",
                                                    lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))
    assert "model.layers.1.mlp.up_proj.weight is missing" in msg
    msg = _break(tmp_path / "c", lambda d: _rewrite(d / "model.safetensors",
                                                    lambda t: t.update({"model.layers.9.extra": torch.zeros(2)})))
    assert "unknown tensor model.layers.9.extra" in msg
    msg = _break(tmp_path / "d", lambda d: _rewrite(d / "model.safetensors",
                                                    lambda t: t.update({"model.norm.weight": torch.ones(31)})))
    assert "model.norm.weight has shape [31]" in msg

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:-100])
    assert "truncated" in _break(tmp_path / "e", truncate)

    def corrupt(d):
        data = bytearray((d / "model.safetensors").read_bytes())
        data[8:12] = b"\xff\xfe{{"
        (d / "model.safetensors").write_bytes(bytes(data))
    assert "corrupt safetensors header" in _break(tmp_path / "f", corrupt)
    assert "corrupt safetensors header" in _break(
        tmp_path / "g", lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"))


def test_missing_shard_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(llama.CheckpointError, match=f"{victim.name}: shard listed in the index is missing"):
        llama.Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True), ("sliding_window", 4096),
                                         ("model_type", "mistral"), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
                                         ("hidden_act", "gelu"), ("attn_logit_softcapping", 50.0)])
def test_unsupported_config_fields_are_refused(field, value):
    d = tiny_config().to_dict()
    d[field] = value
    with pytest.raises(llama.CheckpointError, match=f"unsupported field {field}="):
        llama.LlamaConfig.from_dict(d)


def test_config_reads_transformers5_rope_parameters():
    d = tiny_config().to_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = llama.LlamaConfig.from_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"


# -- generation -----------------------------------------------------------------------------------

def test_kv_cache_generation_equals_full_recompute():
    model = tiny_model(seed=3)
    prompt = [1, 17, 42, 5, 88]
    out = llama.generate(model, [prompt], 12, eos_ids=[])[0]
    assert_same_greedy(model, prompt, out, greedy_no_cache(model, prompt, 12)[len(prompt):])


def test_batched_generation_is_independent_of_padding_side():
    model = tiny_model(seed=4)
    prompts = [[1, 5, 9], [1, 20, 30, 40, 50, 60, 70], [1, 3]]
    alone = [llama.generate(model, [p], 8, eos_ids=[])[0] for p in prompts]
    for side in ("left", "right"):
        for p, got, want in zip(prompts, llama.generate(model, prompts, 8, eos_ids=[], pad_side=side), alone):
            assert_same_greedy(model, p, got, want)
    tokens, mask = llama.pad_batch(prompts, side="left")
    one = model(torch.tensor([prompts[0]]))[0]
    assert torch.allclose(model(tokens, attention_mask=mask)[0, -3:], one, atol=1e-5)


def test_generation_stops_at_eos_and_sampling_is_seeded():
    model = tiny_model(seed=5)
    prompt = [1, 7, 8]
    free = llama.generate(model, [prompt], 10, eos_ids=[])[0]
    stopped = llama.generate(model, [prompt], 10, eos_ids=[free[3]])[0]
    assert stopped == free[:free.index(free[3])]
    g = lambda: torch.Generator().manual_seed(0)
    a = llama.generate(model, [prompt], 10, temperature=1.0, generator=g(), eos_ids=[])
    assert a == llama.generate(model, [prompt], 10, temperature=1.0, generator=g(), eos_ids=[])
    assert llama.generate(model, [prompt], 10, temperature=1.0, top_k=1, generator=g(), eos_ids=[])[0] == free


def test_generation_rejects_empty_and_overlong_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        llama.generate(model, [[]], 4)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        llama.generate(model, [list(range(60))], 8)


# -- real checkpoints in ../shared (skipped when absent) -------------------------------------------

def test_stories260k_greedy_ids_match_reference():
    d = shared_path("models", "stories260k")
    ref = json.loads((d / "expected_greedy.json").read_text())
    model = llama.Llama.from_pretrained(d)
    out = llama.generate(model, [ref["prompt_ids"]], len(ref["greedy_ids"]) - len(ref["prompt_ids"]), eos_ids=[])
    assert ref["prompt_ids"] + out[0] == ref["greedy_ids"]


def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    model = llama.Llama.from_pretrained(smollm2_dir)
    tok = llama.load_tokenizer(smollm2_dir)
    assert llama.generate_text(model, tok, ["The capital of France is"], 3)[0].startswith(" Paris")


# -- parity with the reference implementation (dev only: needs transformers) ----------------------

@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("kw", [
    dict(num_key_value_heads=2, tie_word_embeddings=False),
    dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=16),
    dict(num_key_value_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
])
def test_logits_match_transformers(tmp_path, kw):
    from transformers import LlamaForCausalLM
    model = tiny_model(seed=7, **kw)
    model.save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 40))
    mask = torch.ones_like(x)
    mask[0, :6] = 0                                          # left padding on row 0
    with torch.no_grad():
        assert (ref(x).logits - model(x)).abs().max() < 1e-4
        diff = ref(x, attention_mask=mask).logits[0, 6:] - model(x, attention_mask=mask)[0, 6:]
        assert diff.abs().max() < 1e-4


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_smollm2_logits_match_transformers(smollm2_dir):
    from transformers import LlamaForCausalLM
    model = llama.Llama.from_pretrained(smollm2_dir)
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    x = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 198, 504, 2988, 314]])
    with torch.no_grad():
        assert (ref(x).logits - model(x)).abs().max() < 1e-4


def test_bf16_weights_with_fp32_compute_equal_fp32_model_of_rounded_weights(tmp_path):
    model = tiny_model(seed=8)
    model.save_pretrained(tmp_path, dtype="bfloat16")
    narrow = llama.Llama.from_pretrained(tmp_path, dtype=torch.bfloat16, compute_dtype=torch.float32)
    wide = llama.Llama.from_pretrained(tmp_path, dtype=torch.float32)
    assert narrow.lm_head.weight.dtype == torch.bfloat16 and narrow.dtype == torch.float32
    x = torch.randint(0, 97, (2, 6))
    assert torch.allclose(narrow(x), wide(x), atol=1e-5)
    assert_same_greedy(wide, [1, 2, 3], llama.generate(narrow, [[1, 2, 3]], 5, eos_ids=[])[0],
                       llama.generate(wide, [[1, 2, 3]], 5, eos_ids=[])[0])


def test_narrow_frozen_weights_give_fp32_gradients_without_keeping_wide_copies(tmp_path):
    model = tiny_model(seed=9)
    model.save_pretrained(tmp_path, dtype="bfloat16")
    narrow = llama.Llama.from_pretrained(tmp_path, dtype=torch.bfloat16, compute_dtype=torch.float32).requires_grad_(False)
    wide = llama.Llama.from_pretrained(tmp_path, dtype=torch.float32).requires_grad_(False)
    x = torch.randint(0, 97, (2, 6))
    grads, saved = [], []
    for m in (narrow, wide):
        h = m.embed(x).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((m is narrow, t.dtype, t.dim())) or t, lambda t: t):
            m.head(m.run_layers(h, 0, 2)).square().mean().backward()
        grads.append(h.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    # autograd keeps the narrow model's matrices in bf16 (7 per block, 2 blocks, lm_head), never a
    # widened fp32 copy of them; the fp32 model keeps its 15 fp32 matrices
    matrices = lambda narrow_run, dt: sum(1 for n, d, dim in saved if n == narrow_run and d == dt and dim == 2)
    assert matrices(True, torch.bfloat16) == 15 and matrices(True, torch.float32) == 0
    assert matrices(False, torch.float32) == 15
