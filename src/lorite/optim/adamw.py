"""AdamW over the trainable parameters — torch's own ``torch.optim.AdamW``, not a rewrite."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def create_adamw(
    model: nn.Module,
    lr: float | torch.Tensor = 1e-4,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.AdamW:
    r"""``torch.optim.AdamW`` over every parameter with ``requires_grad``, fused on CUDA, foreach elsewhere.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \quad
        X \leftarrow X - \eta\,\big(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda_{wd} X\big)

    elementwise on each LoRA factor separately (Loshchilov & Hutter, arXiv 1711.05101). Other
    ``torch.optim.AdamW`` keyword arguments pass through.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("adamw: the model has no trainable parameters")
    if "fused" not in kwargs and "foreach" not in kwargs:
        on_cuda = all(p.is_cuda for p in params)
        kwargs["fused"] = True if on_cuda else None
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
