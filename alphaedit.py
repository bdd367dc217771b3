"""
alphaedit.py: AlphaEdit's null-space constraint (Fang et al., "AlphaEdit: Null-Space Constrained
Knowledge Editing for Language Models", ICLR 2025), the third method of the MEMIT family here.

AlphaEdit keeps MEMIT's z and keys (nse.py steps 1-2) and changes one thing, the solve: the update
of a down projection is confined to the null space of the preserved keys K0, whose second moment is
C0 = E[k k^T] (stats.py), so dW K0 ~ 0 and the outputs of everything C0 describes stay put, and Cp
(the keys of earlier batches) holds earlier edits. Inside: the projector, the projected closed-form
solve, and the two settings derived for the checkpoint at hand where the paper gives Llama3-8B's
absolute values. nse.Editor calls them with --method alphaedit.
"""
from __future__ import annotations

import torch


def null_space_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T, U0 = the eigenvectors of C0 = E[k k^T] whose eigenvalue is below `threshold`
    (AlphaEdit's projector: dW P K0 ~ 0 for the preserved keys K0). Symmetric and idempotent. (F, F)"""
    e, U = torch.linalg.eigh(C0.double())                        # ascending eigenvalues
    U0 = U[:, e < threshold]                                     # (F, null dim)
    return U0 @ U0.T


def solve_projected_update(R, K, P, Cp, l2: float) -> torch.Tensor:
    """dW = (X)^T,  X = (P (K K^T + Cp) + l2 I)^-1 P K R^T  (AlphaEdit's closed form, as its official
    code solves it): the minimiser of ||dW' P K - R||^2 + ||dW' P Kp||^2 + l2 ||dW'||^2 over
    dW = dW' P, i.e. an update whose rows live in the null space of C0. R (D, n), K (F, n), P (F, F),
    Cp the sum of K K^T of earlier batches (or None). The system is not symmetric: LU solve, float64."""
    K64, P64 = K.double(), P.double()
    A = K64 @ K64.T                                              # (F, F)
    if Cp is not None:
        A += Cp
    A = P64 @ A
    A.diagonal().add_(l2)
    return torch.linalg.solve(A, P64 @ K64 @ R.double().T).T     # (D, F)


# -- settings derived from the checkpoint (the paper's 2e-2 and l2 are absolute, for Llama3-8B) ---

L2_PER_PK2 = 0.1


def default_nullspace_threshold(C0, layers) -> float:
    """The threshold for the checkpoint at hand: the mean eigenvalue of C0 (trace / F, averaged over
    the edited layers), so the null space is the directions with less than average key variance.
    On SmolLM2-135M (WikiText-2, layers 4-8) this is 0.024, next to the official absolute 2e-2 for
    Llama3-8B."""
    return sum(C0[l].diagonal().double().mean().item() for l in layers) / len(layers)


def default_l2(P_last: torch.Tensor, K_last: torch.Tensor) -> dict:
    """The ridge: l2 = L2_PER_PK2 * median ||P k||^2 over the first batch's keys K_last (F, n) at the
    last edited layer, so a lone request's projected solve realises about 1 / (1 + L2_PER_PK2) of
    its residual, whatever the key scale."""
    pk2 = (P_last @ K_last.double()).pow(2).sum(0).median().item()
    return {"l2": L2_PER_PK2 * pk2, "projected_key_norm2_median": pk2}
