"""Gradient-descent factorization of ‖E − U·V‖²_F with Adam, open to user loss terms."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError

LossTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@register_method("gd", description="gradient descent (Adam) on ‖E−UV‖², with optional extra loss terms")
def gd(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    steps: int = 500,
    lr: float = 1e-2,
    init: str = "spectral",
    extra_loss: LossTerm | None = None,
    split: str = "symmetric",
) -> Factors:
    """Factorize by minimizing ‖E − U·V‖²_F/‖E‖²_F (+ ``extra_loss(U, V)``) with Adam.

    Args:
        steps: Adam steps (full batch); the learning rate decays on a cosine schedule to 0.
        lr: peak learning rate, relative to the scale of the factors.
        init: ``"spectral"`` starts from a randomized SVD (then the loop only improves on it, which matters
            when ``extra_loss`` is given); ``"random"`` starts from a seeded Gaussian of matching scale.
        extra_loss: a differentiable function of (U, V) added to the loss, e.g. a penalty on U's row norms.

    The best iterate (lowest total loss) is returned, so the result is never worse than the start.
    ``split`` only applies to the spectral start; the trained factors keep the gauge the optimizer found.

    Example:
        >>> f = gd(torch.randn(60, 10), 3, steps=50)
        >>> f.meta["steps"]
        50
    """
    if steps < 0 or lr <= 0:
        raise ConfigError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if init not in ("spectral", "random"):
        raise ConfigError(f"init must be 'spectral' or 'random', got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    scale = float(E.double().pow(2).sum()) or 1.0
    if init == "spectral":
        from embfactor.decomposition.rsvd import rsvd

        f0 = rsvd(E, rank, seed=seed, power_iters=2, split=split)
        U0, V0 = f0.U, f0.V
    else:
        s = (scale / E.numel()) ** 0.5 / rank**0.25
        U0 = torch.randn(E.shape[0], rank, generator=gen, dtype=E.dtype) * s
        V0 = torch.randn(rank, E.shape[1], generator=gen, dtype=E.dtype) * s
    U = U0.clone().requires_grad_(True)
    V = V0.clone().requires_grad_(True)
    opt = torch.optim.Adam([U, V], lr=lr * float(U0.abs().mean() + V0.abs().mean()) / 2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))

    best, best_U, best_V = float("inf"), U0, V0
    bar = tqdm(range(steps + 1), desc="gd", disable=not progress, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        # The Frobenius term's gradient is written by hand (R = E − UV; dU = −2RVᵀ, dV = −2UᵀR):
        # autograd through the vocab×d residual costs several extra full-size temporaries per step.
        with torch.no_grad():
            R = E - U @ V
            cur = float(torch.linalg.vector_norm(R)) ** 2 / scale
            U.grad = R @ V.T * (-2.0 / scale)
            V.grad = U.T @ R * (-2.0 / scale)
            del R
        if extra_loss is not None:
            term = extra_loss(U, V)
            term.backward()  # accumulates into the hand-written gradients
            cur += float(term.detach())
        if cur < best:  # loss of the current parameters, before this step moves them
            best, best_U, best_V = cur, U.detach().clone(), V.detach().clone()
        if step == steps:
            break
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{cur:.5f}")
    return Factors(best_U.contiguous(), best_V.contiguous(), method="gd", meta={"steps": steps, "loss": best})
