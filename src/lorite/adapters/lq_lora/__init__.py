"""LQ-LoRA: every target matrix as ``W ≈ Q + L1·L2`` — a frozen NF-k quantized ``Q`` plus a trainable rank-r
LoRA ``L1·L2`` — with each matrix's storage format chosen by an integer linear program under a budget of bits
per parameter.

Guo, Greengard, Xing, Kim, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language
Model Finetuning", arXiv 2311.12023 (ICLR 2024). Quantization formats: :mod:`lorite.adapters.quant`.

1. **Decomposition** (:func:`lq_decompose`). From ``Q = 0`` alternate ``L1·L2 ←`` the rank-r randomized SVD
   of ``W − Q`` (√S split between the factors: ``L1 = U·diag(√S)``, ``L2 = diag(√S)·Vᵀ``) and
   ``Q ← dequant(quant(W − L1·L2))``; stop as soon as ``‖W − (Q + L1·L2)‖_F`` no longer falls and return the
   *best* iterate (the reference code returns the last one).
2. **Allocation** (:func:`solve_allocation`). For matrices ``i`` and formats ``c`` with cost
   ``cost[i,c] = ‖W_i − (Q + L1·L2)‖_F²`` and storage ``storage[i,c]`` bits, binary ``x[i,c]``:
   minimise ``Σ cost·x`` subject to ``Σ_c x[i,c] = 1`` and ``Σ storage·x ≤ budget · Σ_i numel(W_i)``
   (a multiple-choice knapsack), solved exactly by ``scipy.optimize.milp`` (HiGHS), with a Lagrangian
   fallback. The budget covers ``Q`` only; the LoRA factors come on top.
3. **Fisher weighting** (:func:`estimate_fisher`). With the diagonal empirical Fisher
   ``F = Σ_k (∂ℓ_k/∂W)²`` (per-example gradients) the objective becomes ``‖√F ⊙ (W − Q − L1·L2)‖_F``. It has
   no closed-form SVD, so ``F`` is taken as rank 1 ("two-sided"): ``D_row = √(mean_j F_ij)``,
   ``D_col = √(mean_i F_ij)``; the SVD runs on ``diag(D_row)(W − Q)diag(D_col)`` and is unscaled after. The
   quantization step stays unweighted; the weighted error drives the stop rule and the ILP costs.
4. **In the model** (:func:`apply_lq_lora`). peft computes ``y = x·Wᵀ + s·x·Aᵀ·Bᵀ`` with ``s = α/r``: the base
   weight becomes ``Q`` (a :class:`QuantizedLinear`, dequantized on the fly), and ``A = L2/√s``,
   ``B = L1/√s`` so that ``s·B·A = L1·L2`` at the start. Every lorite optimizer pairs ``(A, B)`` by module
   (:func:`lorite.optim.find_lora_pairs`), LoRA-RITE included.
5. **Storage** (:func:`save_lq_lora`, :func:`load_lq_lora`): packed ``Q`` (safetensors), the peft adapter and a
   JSON description, written atomically; ``Q`` replaces ``W``, so the adapter alone would not be enough.

Modules: :mod:`.config` (settings, format grids), :mod:`.decomposition` (step 1), :mod:`.allocation`
(step 2), :mod:`.layers` (step 4), :mod:`.pipeline` (steps 3 and 1-4 on a model), :mod:`.io` (step 5).
Fine-tuning from it (``lorite finetune --method lq_lora``) is :mod:`lorite.train.methods.lq_lora`; the
``lorite quantize`` job is :mod:`lorite.train.quantize`.
"""

from .allocation import Allocation, CostTable, QuantizationPlan, cost_table, plan_allocation, solve_allocation
from .config import GRIDS, INITS, WEIGHTINGS, LQLoRAConfig, parse_config_name, resolve_grid
from .decomposition import LQDecomposition, fisher_sides, lq_decompose, lq_decompose_batch, quantization_error
from .io import FORMAT, attach_lq_lora, load_lq_lora, read_lq_lora_meta, save_lq_lora, write_lq_lora
from .layers import (
    LORA_FACTOR_BITS,
    QuantizedLinear,
    apply_lq_lora,
    quantized_layers,
    storage_report,
    target_linears,
)
from .pipeline import decompose_matrices, estimate_fisher, quantize_model

__all__ = [
    "FORMAT",
    "GRIDS",
    "INITS",
    "LORA_FACTOR_BITS",
    "WEIGHTINGS",
    "Allocation",
    "CostTable",
    "LQDecomposition",
    "LQLoRAConfig",
    "QuantizationPlan",
    "QuantizedLinear",
    "apply_lq_lora",
    "attach_lq_lora",
    "cost_table",
    "decompose_matrices",
    "estimate_fisher",
    "fisher_sides",
    "load_lq_lora",
    "lq_decompose",
    "lq_decompose_batch",
    "parse_config_name",
    "plan_allocation",
    "quantization_error",
    "quantize_model",
    "quantized_layers",
    "read_lq_lora_meta",
    "resolve_grid",
    "save_lq_lora",
    "solve_allocation",
    "storage_report",
    "target_linears",
    "write_lq_lora",
]
