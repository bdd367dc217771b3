"""
llama.py: a single-file Llama that reads and writes Hugging Face checkpoints directly.

Inside, top to bottom:
  1. LlamaConfig   - a dataclass filled from config.json; unsupported fields are refused.
  2. The model     - RMSNorm, rotary embeddings (rotate-half, llama3 scaling), grouped-query
                     attention, SwiGLU FFN with a swappable down projection, tied/untied head.
  3. Checkpoints   - strict safetensors loading (single file or shards + index) into a model
                     built on the meta device; atomic sharded saving.
  4. Tokenizers    - SentencePiece (tokenizer.model) and byte-level BPE (tokenizer.json).
  5. Generation    - KV cache, greedy / temperature / top-k sampling, batched prompts.
  6. CLI           - python llama.py --ckpt DIR --prompt "The capital of France is"

The architecture is Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models";
module names equal the checkpoint's tensor names (model.layers.3.mlp.down_proj.weight, ...), so
the weight map is one-to-one. Editors (scen.py, nse.py) read the FFN down-projection input and
swap the down projection module itself; nothing here disables gradients except generate().
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint, config or tokenizer that cannot be used as is; the message names the culprit."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# 1. Config

@dataclass
class LlamaConfig:
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None   # None -> num_attention_heads (no GQA)
    head_dim: int | None = None              # None -> hidden_size // num_attention_heads
    vocab_size: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    torch_dtype: str = "float32"             # the dtype the weights are stored in

    # config.json keys that we accept and ignore because they do not change the computation
    _IGNORED = {"architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias",
                "attention_dropout", "initializer_range", "pretraining_tp", "use_cache",
                "transformers_version", "sliding_window", "_name_or_path", "torch_dtype",
                "dtype", "rope_type", "output_hidden_states", "output_attentions", "return_dict",
                "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
                "problem_type", "tokenizer_class", "rope_parameters"}

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Fill the config from a Hugging Face Llama config.json; refuse what we do not implement."""
        def refuse(key, why):
            raise CheckpointError(f"{source}: unsupported field {key}={d[key]!r} ({why})")
        if d.get("model_type", "llama") != "llama":
            refuse("model_type", "only llama is implemented")
        if d.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "only silu (SwiGLU) is implemented")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                refuse(key, "Llama has no biases")
        if d.get("sliding_window") is not None:
            refuse("sliding_window", "sliding-window attention is not implemented")
        if d.get("pretraining_tp", 1) != 1:
            refuse("pretraining_tp", "only 1 is implemented")
        if d.get("rope_parameters"):   # transformers >= 5 writes theta and scaling in one dict
            rp = dict(d["rope_parameters"])
            d = {**d, "rope_theta": rp.pop("rope_theta", d.get("rope_theta", 10000.0)),
                 "rope_scaling": None if rp.get("rope_type", "default") == "default" else rp}
        rs = d.get("rope_scaling")
        if rs is not None:
            if not isinstance(rs, dict):
                raise CheckpointError(f"{source}: field rope_scaling must be an object or null, got {rs!r}")
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("default", "linear", "llama3"):
                refuse("rope_scaling", "only null, linear and llama3 are implemented")
            needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}.get(kind, ())
            for key in needs:
                if not _is_number(rs.get(key)) or rs[key] <= 0:
                    raise CheckpointError(f"{source}: field rope_scaling.{key} must be a positive number "
                                          f"({kind} scaling), got {rs.get(key)!r}")
            if kind == "llama3" and rs["low_freq_factor"] >= rs["high_freq_factor"]:
                raise CheckpointError(f"{source}: field rope_scaling.low_freq_factor {rs['low_freq_factor']} "
                                      f"must be below high_freq_factor {rs['high_freq_factor']}")
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["torch_dtype"] = d.get("torch_dtype") or d.get("dtype") or "float32"
        unknown = set(d) - known - cls._IGNORED - {"bos_token_id", "eos_token_id", "pad_token_id"}
        for key in sorted(unknown):   # e.g. "rope_parameters", "layer_types", "attn_logit_softcapping"
            if d[key] not in (None, False, 0, [], {}):
                refuse(key, "not a field of the Llama architecture")
        cls._check_fields(d, source)
        return cls(**kwargs)

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    @classmethod
    def _check_fields(cls, d: dict, source: str):
        """Types and ranges of the fields the model is built from, so that a bad config.json is one
        line naming the field (expected, found) rather than an error from deep inside torch."""
        def wrong(key, expected):
            raise CheckpointError(f"{source}: field {key} must be {expected}, got {d.get(key)!r}")
        for key in cls.REQUIRED:
            if key not in d:
                raise CheckpointError(f"{source}: missing required field {key} (a positive integer)")
        for key in (*cls.REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = d.get(key)
            if (key in cls.REQUIRED or v is not None) and (not _is_int(v) or v <= 0):
                wrong(key, "a positive integer")
        for key in ("rms_norm_eps", "rope_theta"):
            if d.get(key) is not None and (not _is_number(d[key]) or not 0 < d[key] < math.inf):
                wrong(key, "a positive number")
        if not isinstance(d.get("tie_word_embeddings", False), bool):
            wrong("tie_word_embeddings", "true or false")
        for key in ("bos_token_id", "pad_token_id"):
            if d.get(key) is not None and not _is_int(d[key]):
                wrong(key, "an integer or null")
        eos = d.get("eos_token_id")
        if eos is not None and not _is_int(eos) and not (isinstance(eos, list) and all(map(_is_int, eos))):
            wrong("eos_token_id", "an integer, a list of integers or null")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        if d.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"{source}: field num_attention_heads {heads} does not divide hidden_size "
                                  f"{hidden} (and no head_dim is given)")
        if heads % kv:
            raise CheckpointError(f"{source}: field num_key_value_heads {kv} does not divide "
                                  f"num_attention_heads {heads}")
        head_dim = d.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {head_dim} must be even (rotary embeddings rotate pairs)")

    @classmethod
    def from_file(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_bytes())
        except ValueError as e:                   # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The Hugging Face config.json layout, so any Llama tool can load what we save."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, **d}


# ----------------------------------------------------------------------------------------------
# 2. The model

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, with the optional linear or llama3 frequency scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of position * theta for each (row, position): (B, T, head_dim) each."""
    inv_freq = rope_frequencies(cfg, positions.device)
    angles = positions[..., None].float() * inv_freq          # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)              # (B, T, head_dim): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle: the convention HF Llama weights expect."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]          # cos/sin broadcast over heads


class _WidenOnTheFly(torch.autograd.Function):
    """y = x W^T for a frozen narrow W: backward widens W again (dL/dx = g W) rather than keeping
    the widened copy alive until then, so autograd memory holds activations, not fp32 weights."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ w.to(g.dtype), None


class Linear(nn.Linear):
    """y = x W^T. The weight may be stored in a narrower dtype than x (bf16 weights, fp32 compute on a
    CPU): it is then widened on the fly, so memory holds one narrow copy. For a few tokens without
    autograd (decoding) it is widened ROWS rows at a time into a small buffer that stays in cache;
    a whole fresh fp32 copy per call makes a Llama-2-7B forward about 4x slower."""
    ROWS = 64

    def forward(self, x):
        w = self.weight
        if w.dtype == x.dtype:
            return F.linear(x, w)
        if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
            if w.requires_grad:
                return F.linear(x, w.to(x.dtype))  # training the narrow weight itself
            return _WidenOnTheFly.apply(x, w)
        if x.numel() > self.ROWS * x.shape[-1]:
            return F.linear(x, w.to(x.dtype))      # many tokens: compute-bound, widen it all
        out = x.new_empty(*x.shape[:-1], w.shape[0])
        buf = x.new_empty(min(self.ROWS, w.shape[0]), w.shape[1])
        for r in range(0, w.shape[0], self.ROWS):  # y[..., r:r+ROWS] = x W[r:r+ROWS]^T
            b = buf[:min(self.ROWS, w.shape[0] - r)].copy_(w[r:r + self.ROWS])
            torch.matmul(x, b.t(), out=out[..., r:r + len(b)])
        return out


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:                  # write this step's keys/values, read all so far
            k_all, v_all, start = kv_cache
            k_all[:, :, start:start + T] = k
            v_all[:, :, start:start + T] = v
            k, v = k_all[:, :, :start + T], v_all[:, :, :start + T]            # (B, n_kv, S, hd)
        # softmax(q k^T / sqrt(hd) + mask) v, each group of n_heads/n_kv query heads sharing a kv head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: down( silu(gate(x)) * up(x) ). down_proj is a plain module: editors swap it."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def intermediate(self, x):
        """u = silu(W_gate x) * (W_up x): the down projection's input, the 'keys' of NSE/SCEN."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x, trace=None):
        u = self.intermediate(x)
        if trace is not None:
            trace.ffn_in.append(u)
        return self.down_proj(u)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, kv_cache=None, trace=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h), trace)


@dataclass
class Trace:
    """Intermediate values of one forward pass (gradients flow through them unless disabled).
    block_output(l), block_input(l) and down_proj_input(l) take absolute layer numbers and mean
    the same under forward_trace and run_layers; the raw lists are offset differently (below)."""
    # TRAP: forward_trace: hidden[l] = INPUT of block l (hidden[0]: embeddings); run_layers(h, s, ..): OUTPUT of block s+l
    hidden: list = field(default_factory=list)
    ffn_in: list = field(default_factory=list)   # ffn_in[i]: down_proj input of block blocks[i]
    logits: torch.Tensor | None = None
    blocks: list = field(default_factory=list)   # the blocks run, in order (absolute layer numbers)
    first_input: torch.Tensor | None = None      # the input of block blocks[0] (forward_trace: embeddings)

    def block_output(self, l: int) -> torch.Tensor:
        """Output of block l; l = -1 means the embeddings (the input of block 0)."""
        if self.blocks and l == self.blocks[0] - 1 and self.first_input is not None:
            return self.first_input
        if l not in self.blocks:
            raise IndexError(f"block {l} was not run in this trace (blocks run: {self.blocks})")
        lead = len(self.hidden) - len(self.blocks)          # 1 under forward_trace (embeddings), else 0
        return self.hidden[lead + self.blocks.index(l)]

    def block_input(self, l: int) -> torch.Tensor:
        """Input of block l: the output of block l-1 (the embeddings for l = 0)."""
        return self.block_output(l - 1)

    def down_proj_input(self, l: int) -> torch.Tensor:
        """u = silu(W_gate x) * (W_up x) of block l: its down projection's input."""
        if l not in self.blocks:
            raise IndexError(f"block {l} was not run in this trace (blocks run: {self.blocks})")
        return self.ffn_in[self.blocks.index(l)]


class KVCache:
    """Preallocated keys/values of every layer; `length` slots are filled, shared by all rows."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device=None, dtype=None):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a token
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)          # next rope position
        self.length = 0


class _Body(nn.Module):
    """Holds the tensors named model.* in the checkpoint."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":  # (initialising on meta costs a 1.3 s import; loading fills it)
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None, compute_dtype=None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype   # None: compute in the weights' dtype
        with torch.device(device or "cpu"):
            self.model = _Body(config)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if dtype is not None:
            self.to(dtype)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Fresh weights for training from scratch: N(0, std) matrices, unit norms."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    # -- the forward pass in pieces, so editors can run part of the network -------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)                                     # (B, T, D)
        return h if self.compute_dtype is None else h.to(self.compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in."""
        return self.compute_dtype or self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))                                 # (B, T, V)

    def _mask_and_positions(self, B, T, device, attention_mask, positions, cache):
        """Boolean attention mask (B, 1, T, S) and rope positions (B, T) for T new tokens.

        Query t may attend key s when s is a real token (not padding) and s is not in its future.
        Each query also attends to itself, so a padding row stays finite (no all-masked softmax).
        Positions count real tokens only, so left and right padding give the same results.
        """
        am = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
              else attention_mask.to(device=device, dtype=torch.bool))
        start = 0 if cache is None else cache.length
        if positions is None:
            base = 0 if cache is None else cache.next_pos[:, None]
            positions = base + (am.long().cumsum(-1) - 1).clamp(min=0)
        if cache is None:
            keys = am
        else:
            cache.key_mask[:, start:start + T] = am
            cache.next_pos = positions[:, -1] + 1
            keys = cache.key_mask[:, :start + T]
        S = keys.shape[1]
        q_slot = torch.arange(start, start + T, device=device)[:, None]        # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]                        # (1, S)
        mask = (k_slot <= q_slot)[None] & keys[:, None, :]                      # (B, T, S)
        mask = mask | (k_slot == q_slot)[None]
        return mask[:, None], positions                                         # (B, 1, T, S)

    def run_layers(self, h, start: int, end: int, attention_mask=None, positions=None,
                   cache: KVCache | None = None, trace: Trace | None = None):
        """Run blocks start..end-1 on hidden states h (B, T, D)."""
        B, T, _ = h.shape
        mask, positions = self._mask_and_positions(B, T, h.device, attention_mask, positions, cache)
        cos, sin = rope_cos_sin(self.config, positions, h.dtype)
        if trace is not None and not trace.blocks:
            trace.first_input = h
        for i in range(start, end):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.length)
            h = self.layers[i](h, cos, sin, mask, kv, trace)
            if trace is not None:
                trace.hidden.append(h)
                trace.blocks.append(i)
        if cache is not None and end == self.config.num_hidden_layers:
            cache.length += T
        return h

    def forward(self, tokens, attention_mask=None, positions=None, cache: KVCache | None = None):
        """tokens (B, T) -> logits (B, T, V)."""
        h = self.embed(tokens)
        return self.head(self.run_layers(h, 0, self.config.num_hidden_layers, attention_mask, positions, cache))

    def forward_trace(self, tokens, attention_mask=None, positions=None) -> Trace:
        """Like forward, also returning every block's output and every down projection's input."""
        trace = Trace()
        h = self.embed(tokens)
        trace.hidden.append(h)
        h = self.run_layers(h, 0, self.config.num_hidden_layers, attention_mask, positions, trace=trace)
        trace.logits = self.head(h)
        return trace

    # -- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu", dtype=torch.float32, compute_dtype=None) -> "Llama":
        """dtype: how the weights are held; compute_dtype: how activations are computed (None: same).
        bf16 weights with fp32 compute fit Llama-2-7B in 14 GB and run at fp32 matmul speed on a CPU."""
        model = load_checkpoint(ckpt_dir, device=device, dtype=dtype)
        model.compute_dtype = DTYPES.get(compute_dtype, compute_dtype)
        return model

    def save_pretrained(self, out_dir, tokenizer_dir=None, dtype=None, max_shard_bytes: int = 2 << 30):
        save_checkpoint(self, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints: safetensors in, safetensors out

# safetensors dtype names of the floating tensors a model can be loaded from <-> torch dtypes
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# bytes per element of every safetensors dtype: only to explain a file the package refuses
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """"bfloat16" or torch.bfloat16 -> torch.bfloat16; anything but a floating dtype is refused."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: expected a floating torch dtype or one of {', '.join(DTYPES)}")
    return dtype


def open_safetensors(path):
    """safetensors.safe_open(path) for torch on the CPU: the one reader of weights in this project.

    Opening reads only the header; the package checks it against the file size (every tensor's
    bytes in the file, nothing left over) before any data is read. A file it refuses becomes a
    one-line CheckpointError naming the file and the tensor or field at fault.
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise _refused_safetensors(path, e) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _refused_safetensors(path: Path, err) -> CheckpointError:
    """Why the safetensors package refused `path`, in one line. Its own message names no tensor,
    so the header alone (8-byte little-endian length N, then N bytes of JSON) is re-read here to
    say which; the tensor data is never touched."""
    size = path.stat().st_size
    bad = lambda what: CheckpointError(f"{path}: {what}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return bad(f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        if head == b"version ":
            return bad("not a safetensors file: it is a Git LFS pointer (fetch the real file: git lfs pull)")
        for magic, kind in ((b"PK\x03\x04", "a zip archive (torch.save)"), (b"\x80", "a pickle"), (b"GGUF", "GGUF")):
            if head.startswith(magic):
                return bad(f"not a safetensors file: it is {kind} (this project never loads pickle: convert it)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return bad(f"corrupt safetensors header: header length {n} bytes, only {size - 8} follow "
                       f"(truncated, or not a safetensors file)")
        if n > 100 << 20:
            return bad(f"corrupt safetensors header: header length {n} bytes, over the 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:                       # JSONDecodeError, UnicodeDecodeError
        return bad(f"corrupt safetensors header: not JSON ({e}); not a safetensors file?")
    if not isinstance(header, dict):
        return bad(f"corrupt safetensors header: expected a JSON object, found {type(header).__name__}")
    data_start, spans = 8 + n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            return bad(f"corrupt safetensors header: tensor {name}: expected dtype, shape and data_offsets, "
                       f"found {json.dumps(info)[:120]}")
        if dtype not in _ST_ITEMSIZE:
            return bad(f"tensor {name}: unknown safetensors dtype {dtype!r}")
        need = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if end - begin != need:
            return bad(f"corrupt safetensors header: tensor {name} ({dtype} {shape}) needs {need} bytes, "
                       f"its data_offsets span {end - begin}")
        spans.append((end, begin, name))
    for end, begin, name in sorted(spans):
        if data_start + end > size:
            return bad(f"truncated: tensor {name} needs bytes {data_start + begin}..{data_start + end}, "
                       f"the file has {size} bytes")
    covered = data_start + max((s[0] for s in spans), default=0)
    if covered != size:
        return bad(f"corrupt safetensors file: the header accounts for {covered} bytes, the file has {size}")
    return bad(f"not a usable safetensors file ({err})")


def read_safetensors_header(path) -> tuple[dict, dict]:
    """({name: {"dtype": "BF16", "shape": [...]}} in file order, the file's __metadata__), read
    through the safetensors package (no tensor data is read)."""
    with open_safetensors(path) as f:
        names = getattr(f, "offset_keys", f.keys)()
        slices = {n: f.get_slice(n) for n in names}
        return {n: {"dtype": s.get_dtype(), "shape": list(s.get_shape())} for n, s in slices.items()}, f.metadata() or {}


def _weight_files(ckpt_dir: Path) -> tuple[list[Path], Path | None, dict | None]:
    """(files, index, weight_map): model.safetensors, or the shards of model.safetensors.index.json."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: field weight_map must map tensor names to shard file names")
        for shard in weight_map.values():
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the checkpoint folder")
        files = [ckpt_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (ckpt_dir / "model.safetensors").is_file():
        index, weight_map, files = None, None, [ckpt_dir / "model.safetensors"]
    else:
        if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pth")):
            raise CheckpointError(f"{ckpt_dir}: only pickle weights (*.bin/*.pth) found; this project reads "
                                  f"safetensors only (never pickle): convert the checkpoint first")
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
    return files, index, weight_map


def checkpoint_files(ckpt_dir) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    return _weight_files(Path(ckpt_dir))[0]


def load_checkpoint(ckpt_dir, device="cpu", dtype=torch.float32) -> Llama:
    """Build the model on the meta device, then assign every checkpoint tensor to its parameter.

    Strict: every tensor of the checkpoint must be a parameter of the model (a tied head's
    redundant lm_head.weight aside), stored once, where the index says, and every parameter must
    be in the checkpoint with the same shape; a violation is an error naming the file and tensor.
    config.json, the index and every shard's header are checked before any tensor data is read.
    Then tensors are read one at a time (safetensors' own reader) and each is converted to
    `dtype` on `device` as it arrives, so memory holds the model plus one tensor as stored: a
    bf16 7B checkpoint loaded in float32 never exists as a whole second copy.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint folder not found")
    cfg = LlamaConfig.from_file(ckpt_dir / "config.json")
    dtype = resolve_dtype(dtype)
    files, index, weight_map = _weight_files(ckpt_dir)
    model = Llama(cfg, device="meta")
    params = dict(model.named_parameters())           # tied lm_head appears once, as embed_tokens
    tied_copy = lambda name: name == "lm_head.weight" and cfg.tie_word_embeddings
    where = {}                                        # every header is checked before any data is read
    with contextlib.ExitStack() as stack:
        for path in files:
            f = stack.enter_context(open_safetensors(path))
            for name in getattr(f, "offset_keys", f.keys)():
                target = params["model.embed_tokens.weight"] if tied_copy(name) else params.get(name)
                if target is None:
                    raise CheckpointError(f"{path}: unknown tensor {name} (not a parameter of this Llama config)")
                shape, st_dtype = list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()
                if shape != list(target.shape):
                    raise CheckpointError(f"{path}: tensor {name} has shape {shape}, config.json needs "
                                          f"{list(target.shape)}")
                if st_dtype not in _ST_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has dtype {st_dtype}, expected one of "
                                          f"{', '.join(_ST_DTYPES)}")
                if name in where:
                    raise CheckpointError(f"{path}: tensor {name} is stored twice (also in {where[name].name})")
                if weight_map is not None and weight_map.get(name) != path.name:
                    said = f"for {weight_map[name]}" if name in weight_map else "nowhere"
                    raise CheckpointError(f"{path}: tensor {name} is in this shard, {index.name} lists it {said}")
                where[name] = path
    missing = [n for n in params if n not in where]
    if missing:
        name, more = missing[0], f"; {len(missing)} missing in all" if len(missing) > 1 else ""
        file = files[0] if weight_map is None else ckpt_dir / weight_map[name] if name in weight_map else index
        raise CheckpointError(f"{file}: tensor {name} is missing (config.json needs shape "
                              f"{list(params[name].shape)}{more})")
    for name, shard in (weight_map or {}).items():
        if name not in where:
            raise CheckpointError(f"{index}: tensor {name} is listed for {shard}, which does not hold it")
    for path in files:                                # one shard mapped at a time
        with open_safetensors(path) as f:
            for name in getattr(f, "offset_keys", f.keys)():
                if tied_copy(name):
                    continue                          # a redundant copy of a tied head is not read
                t = f.get_tensor(name)                # this tensor alone, as stored, in its own memory
                if t.dtype != dtype or torch.device(device).type != "cpu":
                    t = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)   # the stored copy goes
                module_name, _, pname = name.rpartition(".")
                model.get_submodule(module_name)._parameters[pname] = nn.Parameter(t)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def weights_digest(named_tensors) -> bytes:
    """A hash of (name, tensor) pairs: the names and the tensors' exact bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in named_tensors:
        h.update(str(name).encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.digest()


def layer_fingerprints(model, layers) -> dict:
    """{l: hash of the weights that determine layer l's keys (embeddings, blocks 0..l)}, each
    tensor hashed once (a 7B model's first 9 blocks are 3.6 GB)."""
    chain, out = [weights_digest(model.model.embed_tokens.named_parameters())], {}
    for i in range(max(layers) + 1):
        chain.append(weights_digest(model.layers[i].named_parameters()))
        if i in layers:
            out[i] = hashlib.blake2b(b"".join(chain), digest_size=16).hexdigest()
    return out


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) on a temp file in the same folder, then rename it over `path`:
    a reader sees the old file or the new one, never half of one. Permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Tensors (detached, moved to the CPU, made contiguous) to a .safetensors file, atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(path, obj):
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def save_checkpoint(model: Llama, out_dir, tokenizer_dir=None, dtype=None, max_shard_bytes: int = 2 << 30):
    """config.json + model.safetensors (or shards + index above max_shard_bytes) + tokenizer files.

    Each file is written atomically; the index is written after its shards, and shards of an
    earlier save that the new index does not name are removed last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tensors = {}
    for name, p in model.named_parameters():         # tied lm_head is saved once, as embed_tokens
        t = p.detach()
        tensors[name] = (t.to(dtype) if dtype is not None else t).to("cpu").contiguous()
    groups, size = [[]], 0                            # greedy split into shards in parameter order
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for fname, group in zip(names, groups):
        write_safetensors(out_dir / fname, {n: tensors[n] for n in group}, metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if len(groups) > 1:
        write_json(index, {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                           "weight_map": {n: f for f, g in zip(names, groups) for n in g}})
    elif index.exists():
        index.unlink()
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(out_dir / "config.json", cfg)
    for old in out_dir.glob("model*.safetensors"):
        if old.name not in names:
            old.unlink()
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                atomic_write(out_dir / fname, lambda tmp, s=src: Path(tmp).write_bytes(s.read_bytes()))


# ----------------------------------------------------------------------------------------------
# 4. Tokenizers

INF = float("inf")
# GPT-2's pre-tokenizer regex (the default of a ByteLevel pre-tokenizer with use_regex=true):
# contractions, letter runs, number runs, punctuation runs (each with an optional leading
# space), then whitespace. \p{L} / \p{N} need the `regex` package (stdlib `re` lacks them).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable char map used by byte-level BPE: printable Latin-1
    bytes stand for themselves, the others (controls, space, ...) become chr(256 + n) in order,
    so a space is 'Ġ' (U+0120) and a newline 'Ċ' (U+010A) inside vocab strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b], n = chr(256 + n), n + 1
    return out


class Tokenizer:
    """Common interface. Subclasses encode/decode ordinary text; this class splits special
    (added) token strings such as "<|im_start|>" or "<s>" out of the text first and handles
    BOS/EOS. Settings from tokenizer_config.json are applied by load_tokenizer."""
    vocab_size: int = 0
    bos_id = eos_id = pad_id = None
    add_bos = add_eos = False
    chat_format = "none"       # "llama2" | "chatml" | "llama3" | "none"
    default_system = None     # system prompt the chat template uses when none is given

    def _set_added(self, added):
        """added: list of (content, id, special, lstrip, rstrip). They are found with one regex
        alternation, longest first so that the leftmost-longest token wins (plain literals, so
        `re` can skip ahead fast; lstrip/rstrip tokens also eat the whitespace beside them)."""
        added = sorted(added, key=lambda a: -len(a[0]))
        self._added_by_id = {a[1]: a[0] for a in added}
        self._added_by_content = {a[0]: a[1] for a in added}
        self.special_ids = {a[1] for a in added if a[2]}
        alts = [(r"\s*" if a[3] else "") + re.escape(a[0]) + (r"\s*" if a[4] else "") for a in added]
        self._added_re = re.compile("|".join(alts)) if alts else None

    def _added_id(self, s):
        """id of a matched added token; s may carry the whitespace an lstrip/rstrip token ate."""
        for c in (s, s.lstrip(), s.rstrip(), s.strip()):
            if c in self._added_by_content:
                return self._added_by_content[c]

    def encode(self, text, bos=None, eos=None):
        """text -> token ids. bos/eos None -> the tokenizer's add_bos/add_eos."""
        ids = []
        if self.add_bos if bos is None else bos:
            ids.append(self._need(self.bos_id, "BOS"))
        pos = 0
        for m in self._added_re.finditer(text) if self._added_re else ():
            ids += self._encode_ordinary(text[pos:m.start()])
            ids.append(self._added_id(m.group()))
            pos = m.end()
        ids += self._encode_ordinary(text[pos:])
        if self.add_eos if eos is None else eos:
            ids.append(self._need(self.eos_id, "EOS"))
        return ids

    def decode(self, ids, skip_special=False):
        """ids -> text; added tokens decode to their string (special ones dropped if skip_special).
        Ids the vocabulary lacks (a model whose embedding is padded past the tokenizer) decode to
        nothing, as in the `tokenizers` library."""
        out, run = [], []
        for i in ids:
            if i in self._added_by_id:
                out.append(self._decode_ordinary(run))
                run = []
                if not (skip_special and i in self.special_ids):
                    out.append(self._added_by_id[i])
            else:
                run.append(i)
        out.append(self._decode_ordinary(run))
        return "".join(out)

    def _need(self, i, what):
        if i is None:
            raise ValueError(f"this tokenizer has no {what} token")
        return i


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through the sentencepiece library, with Hugging Face's (legacy)
    LlamaTokenizer conventions: control pieces ("<s>", "</s>") and "<unk>" written in the text
    map to their ids, each stretch of text between them is encoded by SentencePiece on its own
    (so each gets SentencePiece's dummy-prefix space), BOS is added by default."""
    def __init__(self, path):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = n = self.sp.get_piece_size()
        sp_id = lambda i: i if 0 <= i < n else None  # sentencepiece says -1 for "none"
        self.bos_id, self.eos_id, self.pad_id = sp_id(self.sp.bos_id()), sp_id(self.sp.eos_id()), sp_id(self.sp.pad_id())
        self.add_bos = self.bos_id is not None
        self._set_added([(self.sp.id_to_piece(i), i, True, False, False) for i in range(n)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)])

    def _encode_ordinary(self, text):
        return self.sp.encode(text)

    def _decode_ordinary(self, ids):
        return self.sp.decode(ids)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i)

    def token_to_id(self, s):
        i = self.sp.piece_to_id(s)
        return i if self.sp.id_to_piece(i) == s else None


class BPETokenizer(Tokenizer):
    """Byte-level BPE from a Hugging Face tokenizer.json. Encoding: split out added tokens,
    normalize (none or a Unicode form), pre-tokenize (regex splits), map every byte of each
    pre-token to its printable char, then apply the merges to each pre-token, always merging
    the adjacent pair that comes first in the merge list, until no listed pair is left."""
    def __init__(self, path):
        import regex
        path = Path(path)
        d = _read_json(path)
        def refuse(field, value):
            raise CheckpointError(f"{path}: unsupported {field} {json.dumps(value)[:200]}")
        model = d.get("model") or {}
        if model.get("type") != "BPE":
            refuse("model.type", model.get("type"))
        for key, ok in [("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                        ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False)), ("fuse_unk", (None, False))]:
            if model.get(key) not in ok:
                refuse(f"model.{key}", model.get(key))
        self.vocab = model["vocab"]                                    # token string -> id
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: r for r, pair in enumerate(merges)}        # pair -> priority
        self.ignore_merges = bool(model.get("ignore_merges"))          # Llama-3: whole word in vocab wins
        self.unk_id = self.vocab.get(model.get("unk_token"))
        # normalizer: none, or a Unicode normal form
        norm = d.get("normalizer")
        if norm is not None and norm.get("type") not in ("NFC", "NFD", "NFKC", "NFKD"):
            refuse("normalizer", norm)
        self.normal_form = norm and norm["type"]
        # pre-tokenizer: regex splits (Split / Digits / ByteLevel's own regex) ending in ByteLevel
        pre = d.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        if not steps or steps[-1].get("type") != "ByteLevel":
            refuse("pre_tokenizer (must be ByteLevel, or a Sequence ending in ByteLevel)", pre)
        self.splits = []                     # (compiled regex, add_prefix_space) applied in order
        for s in steps:
            if s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
                p = s["pattern"]
                self.splits.append((regex.compile(p["Regex"] if "Regex" in p else regex.escape(p["String"])), False))
            elif s["type"] == "Digits":
                self.splits.append((regex.compile(r"\p{N}" if s.get("individual_digits") else r"\p{N}+"), False))
            elif s["type"] == "ByteLevel" and s is steps[-1]:
                if s.get("use_regex", True) or s.get("add_prefix_space"):
                    self.splits.append((regex.compile(GPT2_PATTERN) if s.get("use_regex", True) else None,
                                        bool(s.get("add_prefix_space"))))
            else:
                refuse("pre_tokenizer step", s)
        if (d.get("decoder") or {}).get("type") != "ByteLevel":
            refuse("decoder (must be ByteLevel)", d.get("decoder"))
        # added tokens (special or not) are split out of the raw text before anything else
        added = d.get("added_tokens") or []
        for a in added:
            if a.get("single_word"):
                refuse("added_tokens single_word", a)
        self._set_added([(a["content"], a["id"], a.get("special", False), a.get("lstrip", False),
                          a.get("rstrip", False)) for a in added])
        self.id_to_token = {i: t for t, i in self.vocab.items()} | self._added_by_id
        self.vocab_size = max(self.id_to_token) + 1
        self.byte_enc = bytes_to_unicode()
        self.byte_dec = {c: b for b, c in self.byte_enc.items()}
        self.cache = {}                      # pre-token -> ids (words repeat a lot)
        # a TemplateProcessing post-processor tells whether BOS/EOS are added (Llama-3 adds BOS)
        post = d.get("post_processor") or {}
        for p in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
            if p.get("type") == "TemplateProcessing":
                single = p["single"]
                if "SpecialToken" in single[0]:
                    self.bos_id, self.add_bos = self.token_to_id(single[0]["SpecialToken"]["id"]), True
                if "SpecialToken" in single[-1]:
                    self.eos_id, self.add_eos = self.token_to_id(single[-1]["SpecialToken"]["id"]), True
            elif p and p.get("type") != "ByteLevel":
                refuse("post_processor", p)

    def _pretokenize(self, text):
        """Apply the split steps in turn; each cuts every piece at its regex matches, keeping
        both the matches and the text between them ('Isolated')."""
        pieces = [text] if text else []
        for pattern, prefix_space in self.splits:
            out = []
            for piece in pieces:
                if prefix_space and not piece.startswith(" "):
                    piece = " " + piece
                cuts = sorted({0, len(piece), *(x for m in (pattern.finditer(piece) if pattern else ()) for x in m.span())})
                out += [piece[a:b] for a, b in zip(cuts, cuts[1:])]
            pieces = out
        return pieces

    def _bpe(self, word):
        """One pre-token (already byte-mapped) -> ids."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        parts = list(word)
        while len(parts) > 1:
            # merge the adjacent pair with the lowest rank (leftmost on a tie); stop when no
            # adjacent pair is in the merge list
            rank, i = min((self.ranks.get(pair, INF), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == INF:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        # a byte missing from the vocab (it never merges) becomes UNK, or is dropped when the
        # model has no UNK token, as Hugging Face tokenizers does
        return [self.vocab.get(p, self.unk_id) for p in parts if p in self.vocab or self.unk_id is not None]

    def _encode_ordinary(self, text):
        if self.normal_form:
            text = unicodedata.normalize(self.normal_form, text)
        ids = []
        for piece in self._pretokenize(text):
            if piece not in self.cache:
                self.cache[piece] = self._bpe("".join(self.byte_enc[b] for b in piece.encode("utf-8")))
            ids += self.cache[piece]
        return ids

    def _decode_ordinary(self, ids):
        data = bytes(self.byte_dec[c] for i in ids for c in self.id_to_token.get(i, ""))
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, i):
        return self.id_to_token[i]

    def token_to_id(self, s):
        return self._added_by_content.get(s, self.vocab.get(s))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_bytes())
    except ValueError as e:                       # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def check_vocab_fits(tok, vocab_size, tok_file, config_file="config.json"):
    """A tokenizer may have fewer ids than the embedding has rows (padded vocabularies are common),
    never more: its top ids would index past the embedding. vocab_size None (unknown) passes."""
    if _is_int(vocab_size) and vocab_size > 0 and tok.vocab_size > vocab_size:
        raise CheckpointError(f"{tok_file}: tokenizer has {tok.vocab_size} ids (0..{tok.vocab_size - 1}), "
                              f"the model's embedding has {vocab_size} rows ({config_file} vocab_size): "
                              f"ids {vocab_size} and up would index out of range")


def load_tokenizer(ckpt_dir):
    """Tokenizer of a Hugging Face checkpoint folder: tokenizer.json (byte-level BPE) or
    tokenizer.model (SentencePiece; also used when tokenizer.json is a SentencePiece-style one,
    as Llama-2 folders ship both), then tokenizer_config.json's special tokens, add_bos/eos and
    chat template, with config.json's token ids as the fallback."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder not found")
    src = d / "tokenizer.json"
    if src.exists():
        try:
            tok = BPETokenizer(src)
        except CheckpointError:
            if not (d / "tokenizer.model").exists():
                raise
            tok, src = SentencePieceTokenizer(d / "tokenizer.model"), d / "tokenizer.model"
    elif (d / "tokenizer.model").exists():
        tok, src = SentencePieceTokenizer(d / "tokenizer.model"), d / "tokenizer.model"
    else:
        raise CheckpointError(f"{d}: no tokenizer.json or tokenizer.model in this folder")
    read = lambda name: _read_json(d / name) if (d / name).exists() else {}
    tcfg, cfg = read("tokenizer_config.json"), read("config.json")
    check_vocab_fits(tok, cfg.get("vocab_size"), src, d / "config.json")
    for name in ("bos", "eos", "pad"):
        if f"{name}_token" in tcfg:                 # a string, {"content": ...}, or null
            s = tcfg[f"{name}_token"]
            s = s.get("content") if isinstance(s, dict) else s
            i = None if s is None else tok.token_to_id(s)
            if s is not None and i is None:
                raise CheckpointError(f"{d / 'tokenizer_config.json'}: {name}_token {s!r} is not in the vocabulary")
        else:
            i = cfg.get(f"{name}_token_id", getattr(tok, f"{name}_id"))
            i = i[0] if isinstance(i, list) else i
        setattr(tok, f"{name}_id", i)
    tok.add_bos = bool(tcfg.get("add_bos_token", tok.add_bos)) and tok.bos_id is not None
    tok.add_eos = bool(tcfg.get("add_eos_token", tok.add_eos)) and tok.eos_id is not None
    template = tcfg.get("chat_template") or ""
    if isinstance(template, list):                  # [{"name": ..., "template": ...}, ...]
        template = " ".join(t["template"] for t in template)
    if not template and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    tok.chat_format = ("chatml" if "<|im_start|>" in template else "llama3" if "<|start_header_id|>" in template
                       else "llama2" if "[INST]" in template else "none")
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template)  # a literal default system prompt
    tok.default_system = m.group(1) if m else None
    tok.source_dir = d                              # where its files are (an exported edit copies them)
    return tok


def format_chat(tokenizer, user, system=None):
    """Prompt text for one user turn with the assistant's turn opened (like a chat template with
    add_generation_prompt). BOS is not included: encode() adds it when the tokenizer does."""
    f = tokenizer.chat_format
    if f == "chatml":
        system = tokenizer.default_system if system is None else system
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        return head + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if f == "llama2":
        if system:
            user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user.strip()}"
        return f"[INST] {user.strip()} [/INST]"
    if f == "llama3":
        turn = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"
        head = turn("system", system) if system else ""
        return head + turn("user", user) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if system:
        raise ValueError("this tokenizer has no chat template, so there is no place for a system prompt")
    return user


# ----------------------------------------------------------------------------------------------
# 5. Generation

def _sample(logits, temperature: float, top_k: int | None, generator):
    """Greedy argmax at temperature 0; else softmax(logits / T) restricted to the top k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_batch(seqs: list[list[int]], pad_id: int = 0, side: str = "left", device=None):
    """tokens (B, T) and attention_mask (B, T) for sequences of different lengths."""
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        tokens[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return tokens.to(device), mask.to(device)


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, eos_ids=None, pad_id: int = 0, tokenizer=None, stop_strings=None,
             generator: torch.Generator | None = None, pad_side: str = "left") -> list[list[int]]:
    """Continue each prompt with a KV cache; returns the new ids of each, without the EOS token.

    A row stops at an EOS id, or (with a tokenizer) once its decoded continuation contains one of
    stop_strings: its ids then end with the token that completed the stop string (generate_text
    cuts the text at the stop string itself).
    """
    cfg = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    for p in prompts:
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens is longer than "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the continuation")
    eos = set(cfg.eos_token_id if eos_ids is None else eos_ids)
    device, dtype = model.device, model.dtype
    tokens, mask = pad_batch(prompts, pad_id, pad_side, device)
    B, T = tokens.shape
    cache = KVCache(cfg, B, T + max_new_tokens, device, dtype)
    logits = model(tokens, attention_mask=mask, cache=cache)
    last = mask.sum(-1) - 1 if pad_side == "right" else torch.full((B,), T - 1, device=device)
    logits = logits[torch.arange(B, device=device), last]                       # (B, V)
    out = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_k, generator)                     # (B,)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            out[i].append(t)
            if stop_strings:
                tail = tokenizer.decode(out[i][-16:])
                done[i] = any(s in tail for s in stop_strings)
        if all(done) or step == max_new_tokens - 1:   # the last token needs no forward pass
            break
        step_mask = torch.tensor([0 if d else 1 for d in done], device=device)[:, None]
        logits = model(nxt[:, None], attention_mask=step_mask, cache=cache)[:, -1]
    return out


def generate_text(model: Llama, tokenizer, prompts: list[str], max_new_tokens: int, *, stop_strings=None,
                  **kwargs) -> list[str]:
    """Text in, text out: encode (with the tokenizer's BOS convention), generate, decode, cut at a stop string."""
    ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, max_new_tokens, tokenizer=tokenizer, stop_strings=stop_strings,
                    pad_id=tokenizer.pad_id or 0, **kwargs)
    texts = [tokenizer.decode(o, skip_special=True) for o in outs]
    for s in stop_strings or []:
        texts = [t.split(s)[0] for t in texts]
    return texts


# ----------------------------------------------------------------------------------------------
# 6. CLI

def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are hundreds of times slower there), bfloat16 on an accelerator."""
    return torch.float32 if str(device).startswith("cpu") else torch.bfloat16


def load_model(ckpt_dir, device="cpu", dtype=None) -> Llama:
    """The model of a checkpoint folder, with the project's one dtype rule: the weights are held in
    `dtype` (default: float32 on a CPU, bfloat16 on an accelerator); activations are computed in
    float32 on a CPU (bf16 matmuls are hundreds of times slower there) and in `dtype` elsewhere."""
    wd = default_dtype(device) if dtype in (None, "auto") else DTYPES.get(dtype, dtype)
    cd = torch.float32 if str(device).startswith("cpu") else wd
    return Llama.from_pretrained(ckpt_dir, device=device, dtype=wd, compute_dtype=cd)


def load(ckpt_dir, device="cpu", dtype=None):
    """(model, tokenizer) of a checkpoint folder (load_model's dtype rule). The cheap checks come
    first: config.json, then the tokenizer against the embedding's rows, then the weights."""
    if Path(ckpt_dir).is_dir():
        LlamaConfig.from_file(Path(ckpt_dir) / "config.json")
    tok = load_tokenizer(ckpt_dir)
    return load_model(ckpt_dir, device, dtype), tok


def main(argv=None):
    ap = argparse.ArgumentParser(description="Continue a prompt with a Llama checkpoint (Hugging Face layout).")
    ap.add_argument("--ckpt", required=True, help="folder with config.json, *.safetensors and a tokenizer")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="number of tokens to generate")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="weights dtype (auto: float32 on cpu, bfloat16 elsewhere); compute is float32 on cpu")
    args = ap.parse_args(argv)
    if not args.prompt.strip():
        ap.error("--prompt is empty")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        ap.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        model, tok = load(args.ckpt, args.device, args.dtype)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    text = format_chat(tok, args.prompt) if args.chat else args.prompt
    stop = [tok.id_to_piece(i) for i in [tok.eos_id] if i is not None and args.chat]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        out = generate_text(model, tok, [text], args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, generator=gen, stop_strings=stop or None)[0]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(out if args.chat else args.prompt + out)


if __name__ == "__main__":
    main()
