"""Adam's moments and direction on fp32 state, for the pair optimizers whose last stage is Adam-like
(LoRA+, ScaledAdam, Lamb, Shampoo's grafting). Lists of tensors, torch ``_foreach`` kernels, step counts
as device tensors — no host synchronisation.

.. math::
    m \\leftarrow \\beta_1 m + (1-\\beta_1) g \\qquad v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\qquad
    d = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t)} + \\epsilon}
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as torch_adam

from ._linalg import compute_dtype


def init_adam_state(state: dict, param: torch.Tensor, shape: torch.Size | None = None) -> None:
    """Create ``step``, ``exp_avg``, ``exp_avg_sq`` (fp32 at least) if missing."""
    if "exp_avg" in state:
        return
    shape = param.shape if shape is None else shape
    dtype = compute_dtype(param.dtype)
    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
    state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
    state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)


def adam_direction(
    states: list[dict], grads: list[torch.Tensor], beta1: float, beta2: float, eps: float
) -> list[torch.Tensor]:
    """Update the moments of ``states`` with ``grads`` (any dtype) and return Adam's direction ``d``."""
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # bias corrections as device tensors, 1 − β^t, in the moments' dtype (1 − 0.999 loses 1e-5 in fp32)
    steps = [t.to(m.dtype) for t, m in zip(steps, exp_avgs)]
    correction1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(correction1)
    torch._foreach_add_(correction1, 1)
    correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(correction2)
    torch._foreach_add_(correction2, 1)
    torch._foreach_sqrt_(correction2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, correction2)
    torch._foreach_add_(denominators, eps)
    directions = torch._foreach_div(exp_avgs, correction1)
    torch._foreach_div_(directions, denominators)
    return directions


def apply_update(
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
    lr: float | torch.Tensor,
    weight_decay: float,
) -> None:
    """``p ← p − lr·(d + weight_decay·p)`` computed in the directions' dtype, written back in ``p``'s."""
    if not params:
        return
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=directions[0].device, dtype=directions[0].dtype)
    current = [p.to(d.dtype) for p, d in zip(params, directions)]
    if weight_decay:
        directions = torch._foreach_add(directions, current, alpha=weight_decay)
    steps = torch._foreach_mul(directions, lr)
    torch._foreach_sub_(current, steps)
    torch._foreach_copy_(params, current)


def adamw_group_step(optimizer_state, group: dict, owner: str) -> None:
    """One step of torch's own AdamW (``torch.optim.adam.adam``, decoupled weight decay) over ``group``'s
    parameters that have a gradient, with state in ``optimizer_state`` (``step``, ``exp_avg``,
    ``exp_avg_sq``, as ``torch.optim.AdamW`` keeps it): the fallback group of the pair optimizers and of
    GaLore/Fira. Fused on CUDA (the step counts then live on the device); a tensor ``lr`` works too.
    ``owner`` names the optimizer in errors."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    if any(p.grad.is_sparse for p in params):
        raise TypeError(f"{owner}: sparse gradients are not supported")
    fused = all(p.is_cuda for p in params)
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in params:
        state = optimizer_state[p]
        step_device = p.device if fused else torch.device("cpu")
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != step_device:
            state["step"] = state["step"].to(step_device)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if fused and isinstance(lr, torch.Tensor):
        lr = lr.to(params[0].device)
    torch_adam(
        params,
        [p.grad for p in params],
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=False if fused or isinstance(lr, torch.Tensor) else None,  # foreach rejects a tensor lr
        fused=True if fused else None,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )
