"""
experts.py: SCEN's per-edit experts (Yao et al. 2024, sec. 3.2), as values and as trainable modules.

An expert is what layer l's down projection becomes for the queries routed to it. Two kinds:
  full     a whole copy of W_down (D, F): the paper's expert, a tensor;
  lowrank  W0 + B A, B (D, r), A (r, F) around the untouched original W0: (D + F) r numbers per edit,
           this project's compact expert (LowRank). B starts at zero, so training starts from W0.
scen.py trains them (Expert, LowRankExpert inside `swapped`), routes to them (output) and keeps them
on disk (tensors / from_tensors).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class LowRank(NamedTuple):
    """A compact expert: the edit's W_down is W0 + B A, B (D, r), A (r, F); only A and B are stored."""
    A: torch.Tensor
    B: torch.Tensor


def output(e, u: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The expert's down projection of u, given base_out = u W0^T: x W0^T + (x A^T) B^T for a
    LowRank (no (D, F) matrix built), u W_e^T for a full expert."""
    if isinstance(e, LowRank):
        return base_out + F.linear(F.linear(u, e.A.to(u.dtype)), e.B.to(u.dtype))
    return F.linear(u, e.to(u.dtype))


def tensors(e) -> dict:
    """The expert as a safetensors dict ({"A", "B"} or {"weight"})."""
    return e._asdict() if isinstance(e, LowRank) else {"weight": e}


def from_tensors(t: dict):
    return LowRank(t["A"], t["B"]) if "A" in t else t["weight"]


def nbytes(e) -> int:
    return sum(x.numel() * x.element_size() for x in tensors(e).values())


class Expert(nn.Module):
    """A trainable copy of W_down (used while training a full expert, and for FT)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))

    def result(self):
        return self.weight.detach()


class LowRankExpert(nn.Module):
    """A trainable W0 + B A around the original W_down (left untouched): B starts at zero, so
    training starts from the original layer exactly; A starts small and random (seeded)."""

    def __init__(self, weight0, rank: int, generator=None):
        super().__init__()
        D, F_ = weight0.shape
        self.weight0 = weight0
        self.A = nn.Parameter(torch.randn(rank, F_, generator=generator).to(weight0.device) / math.sqrt(F_))
        self.B = nn.Parameter(torch.zeros(D, rank, device=weight0.device))

    def forward(self, x):
        return F.linear(x, self.weight0.to(x.dtype)) + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))

    def result(self):
        return LowRank(self.A.detach(), self.B.detach())


@contextlib.contextmanager
def swapped(model, layer: int, module: nn.Module):
    """Temporarily put `module` in place of layer `layer`'s down projection."""
    mlp = model.layers[layer].mlp
    old, mlp.down_proj = mlp.down_proj, module
    try:
        yield
    finally:
        mlp.down_proj = old
