"""LiGO: grow a pretrained Llama-style decoder into a larger one with a *learned linear growth operator*.

Wang, Panda, Torroba Hennigen, Greengard, Karlinsky, Feris, Cox, Wang & Kim, "Learning to Grow Pretrained
Models for Efficient Transformer Training", ICLR 2023, arXiv 2303.00980.

The small model Θ has L1 layers of width D1, the large one L2 layers of width D2. Every large weight is a
linear function of the frozen small weights, factorised into depth mixing then width expansion, with the
expansions indexed by the *new* layer i (as in the official code):

    W̄_i   = Σ_j w^{(m)}_{i,j} · W^{(m)}_j                 depth: w^{(m)} ∈ R^{L2×L1}, one per module type m
    W_i   = s_m · E_out^{(i)} · W̄_i · A_in^{(i)ᵀ}          width: vec(W_i) = s_m (A_in ⊗ E_out) vec(W̄_i)

Width expansions E ∈ R^{n2×n1} (n2 ≥ n1) are, in the default ``"identity_plus_C"`` form, fixed one-hot
*copy rows* (the first n1 units keep the old units) and learned rows C ∈ R^{(n2−n1)×n1} (new units are
learned linear combinations of old ones, bert2BERT-style); the ``"full"`` form learns all of E.

Which expansion acts on which side (Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU):

* residual stream, one ``E_res ∈ R^{D2×D1}`` for the whole model ("tied along the residual stream"):
  the embedding table's columns, every RMSNorm γ, the input side of q/k/v/gate/up and the LM head, the output
  side of o and down.
* attention, per new layer i, head-level expansions acting as ``E_heads ⊗ E_dims`` so RoPE's rotary pairs
  inside a head are never mixed with other coordinates:
  ``E_q ∈ R^{H2×H1}`` (query heads), ``E_k, E_v ∈ R^{K2×K1}`` (key/value heads, GQA), q and k share one
  within-head expansion ``E_qk = blockdiag(P, P)`` with ``P ∈ R^{(d2/2)×(d1/2)}`` over rotary *pairs*
  (identity when head_dim d is unchanged — then no parameters), v has ``E_vd ∈ R^{d2×d1}``; o's input side
  is ``E_q ⊗ E_vd`` (attention output is indexed by query heads, with value coordinates).
* MLP, per new layer i: ``E_ffn ∈ R^{F2×F1}`` on the outputs of gate and up and the input of down.

Input sides are tied (``A = E``, LiGO) or, with ``input_side="pinv"``, the pseudo-inverse ``A = E(EᵀE)⁻¹``
(Net2Net/bert2BERT's function-preserving division: with copy rows, ``W·E⁺·(E x) = W x``).

Initialisation (§3 of the spec): depth ``stack_noisy`` (one-hot at i mod L1 plus U(0, noise), rows
renormalised to 1 — StackBERT), ``stack``, ``interlace`` (one-hot at ⌊i·L1/L2⌋), ``identity`` (interlace
whose repeated copies have zero o/down coefficients: the grown model computes exactly the small model's
function), ``rand``; width ``rand`` (U(0,1) rows normalised to 1: each new unit a random convex combination of
old units — the official README recipe), ``sel_noisy`` (copy one random old unit + U(0, noise), renormalised),
``sel`` (exact copies, balanced), ``zero`` (C = 0: new units stay zero; exact function preservation but a
saddle point the operator cannot learn out of — for tests). Query-head rows are initialised as
``E_kv ⊗ E_group`` so a new query head starts as a combination of the old query heads *of the key/value heads
its own key/value head combines*, with the same coefficients (GQA-consistent growth).

Scale compensations (``compensate_scales``, on by default; fixed constants, so the operator stays linear):
RMSNorm γ × sqrt(D1/D2) — when new residual units are ≈ 0 (``rand``/``zero`` rows) the root-mean-square over
D2 units is sqrt(D1/D2) times that over the old D1 units; q × sqrt(d2/d1) — HF scales logits by d^{-1/2}.

Only the operator's parameters train (:func:`train_operator`): the large model's forward is
``torch.func.functional_call`` of a weightless (meta-device) LlamaForCausalLM on the fused weights, loss = the
usual next-token loss. :meth:`LiGOOperator.materialize` then returns an ordinary ``LlamaForCausalLM``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..runtime import lr_scheduler

WIDTH_FORMS = ("identity_plus_C", "full")
DEPTH_INITS = ("stack_noisy", "stack", "interlace", "identity", "rand")
WIDTH_INITS = ("rand", "sel_noisy", "sel", "zero")
INPUT_SIDES = ("tied", "pinv")
METHODS = ("ligo", "stack")

# module type → (HF submodule path inside a decoder layer, has a weight matrix (True) or a vector (False))
_LAYER_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
}
# the modules that write into the residual stream: zeroing their depth coefficients makes a layer the identity
_RESIDUAL_WRITERS = ("o", "down")


@dataclass
class LiGOConfig:
    """How the growth operator is parameterised and initialised (spec §2–§3)."""

    width_form: str = "identity_plus_C"  # "identity_plus_C" (copy rows + learned C) or "full"
    depth_init: str = "stack_noisy"
    width_init: str = "rand"
    noise: float = 0.03  # U(0, noise) added in the *_noisy schemes
    input_side: str = "tied"  # "tied" (A = E, LiGO) or "pinv" (A = E(EᵀE)⁻¹, Net2Net-style)
    compensate_scales: bool = True  # RMSNorm γ·sqrt(D1/D2) and q·sqrt(d2/d1); see the module docstring
    seed: int = 0

    def validate(self) -> None:
        for name, value, allowed in (
            ("width_form", self.width_form, WIDTH_FORMS),
            ("depth_init", self.depth_init, DEPTH_INITS),
            ("width_init", self.width_init, WIDTH_INITS),
            ("input_side", self.input_side, INPUT_SIDES),
        ):
            if value not in allowed:
                raise ValueError(f"LiGOConfig.{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"LiGOConfig.noise must be a non-negative number, got {self.noise}")


def stack_config(seed: int = 0) -> LiGOConfig:
    """The no-learning baseline: StackBERT depth duplication (layer i copies layer i mod L1, no noise) with
    the same width expansion LiGO starts from — i.e. LiGO's operator at initialisation, never trained."""
    return LiGOConfig(depth_init="stack", seed=seed)


@dataclass
class OperatorTrainingConfig:
    """Operator training (spec §4): AdamW on the operator only, linear warmup then linear decay to 0.

    Set warmup explicitly below ``steps`` (the official command's 10000-step warmup over 100 steps kept the lr
    near zero — the spec's "warmup trap")."""

    steps: int = 100
    lr: float = 3e-3  # tuned on a CPU char-level 64→128-wide growth: 3e-3…3e-2 all beat 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0  # decay would pull depth coefficients (≈1) towards 0, i.e. shrink layers
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    bf16: bool = True  # autocast on CUDA

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"operator steps must be >= 0, got {self.steps}")
        if self.steps and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"operator lr must be a positive number, got {self.lr}")


# ------------------------------------------------------------------------------------- pure functions
def depth_mix(weights: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``W̄_i = Σ_j w_{i,j} W_j``: ``weights`` (L1, …) stacked small weights, ``coefficients`` w (L2, L1)."""
    return torch.tensordot(coefficients, weights, dims=([1], [0]))


def expand_axis(x: torch.Tensor, expansion: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply ``expansion`` (n2, n1), or one per new layer (L2, n2, n1) with x's leading axis the new layer,
    to axis ``axis`` of ``x`` (size n1 → n2): ``y[…, a, …] = Σ_b E[a, b] x[…, b, …]``."""
    moved = x.movedim(axis, -1)
    if expansion.dim() == 2:
        out = moved @ expansion.mT
    else:  # per-layer: x is (L2, …, n1); broadcast E over the middle axes
        shape = moved.shape
        flat = moved.reshape(shape[0], -1, shape[-1])
        out = torch.bmm(flat, expansion.mT).reshape(*shape[:-1], expansion.shape[-2])
    return out.movedim(-1, axis)


def width_expand(
    weight: torch.Tensor, out_expansion: torch.Tensor, in_expansion: torch.Tensor
) -> torch.Tensor:
    """``B·W·Aᵀ`` for one matrix W (d_out, d_in), B (d_out', d_out), A (d_in', d_in) — the Kronecker identity
    ``vec(B W Aᵀ) = (A ⊗ B) vec(W)`` is what makes the width operator R_width Kronecker-factored."""
    return out_expansion @ weight @ in_expansion.mT


def pair_positions(d_small: int, d_large: int) -> list[int]:
    """Rotary pair p of a d_small-dim head goes to pair ⌊p·d_large/d_small⌋ of a d_large-dim head: when the
    ratio is an integer k the frequency base^{-2kp/d_large} equals base^{-2p/d_small} exactly."""
    ratio = d_large / d_small
    return [math.floor(p * ratio) for p in range(d_small // 2)]


# ------------------------------------------------------------------------------------ initialisation
def _width_rows(n_new: int, n_in: int, scheme: str, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Initial learned rows C (n_new, n_in) of one width expansion."""
    if scheme == "zero" or n_new == 0:
        return torch.zeros(n_new, n_in)
    if scheme == "rand":
        rows = torch.rand(n_new, n_in, generator=gen)
        return rows / rows.sum(-1, keepdim=True)
    # sel / sel_noisy: copy one old unit each; balanced (a random permutation, cycled) so multiplicities
    # differ by at most one — duplication then changes RMSNorm statistics as little as possible
    order = torch.cat([torch.randperm(n_in, generator=gen) for _ in range(-(-n_new // n_in))])[:n_new]
    rows = torch.zeros(n_new, n_in)
    rows[torch.arange(n_new), order] = 1.0
    if scheme == "sel_noisy":
        rows = rows + noise * torch.rand(n_new, n_in, generator=gen)
        rows = rows / rows.sum(-1, keepdim=True)
    return rows


def _width_init(n_out: int, copy_rows: list[int], scheme: str, noise: float, gen) -> torch.Tensor:
    """Full initial expansion E (n_out, n_in): one-hot copy rows at ``copy_rows``, scheme rows elsewhere."""
    n_in = len(copy_rows)
    E = torch.zeros(n_out, n_in)
    E[copy_rows, torch.arange(n_in)] = 1.0
    copied = set(copy_rows)
    new_rows = [r for r in range(n_out) if r not in copied]
    E[new_rows] = _width_rows(len(new_rows), n_in, scheme, noise, gen)
    return E


def depth_init(L2: int, L1: int, scheme: str, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Initial depth coefficients w (L2, L1) (spec §3)."""
    if scheme == "rand":
        w = torch.rand(L2, L1, generator=gen)
        return w / w.sum(-1, keepdim=True)
    if scheme in ("stack", "stack_noisy"):
        sources = [i % L1 for i in range(L2)]
    else:  # interlace, identity
        sources = [i * L1 // L2 for i in range(L2)]
    w = torch.zeros(L2, L1)
    w[torch.arange(L2), sources] = 1.0
    if scheme == "stack_noisy":
        w = w + noise * torch.rand(L2, L1, generator=gen)
        w = w / w.sum(-1, keepdim=True)
    return w


def _repeated_copies(L2: int, L1: int) -> list[int]:
    """New layers (under interlacing) that repeat a source already used by an earlier new layer."""
    seen, repeats = set(), []
    for i in range(L2):
        source = i * L1 // L2
        if source in seen:
            repeats.append(i)
        seen.add(source)
    return repeats


class Expansion(nn.Module):
    """A batch of width expansions E (*batch, n_out, n_in) with fixed one-hot copy rows and learned rows C
    (``identity_plus_C``), or entirely learned (``full``). No parameter when nothing is learned."""

    def __init__(self, initial: torch.Tensor, copy_rows: list[int], form: str):
        super().__init__()
        n_out = initial.shape[-2]
        copy = torch.zeros(initial.shape[-2:])
        copy[copy_rows, torch.arange(len(copy_rows))] = 1.0
        if not torch.equal(initial[..., copy_rows, :], copy[copy_rows].expand_as(initial[..., copy_rows, :])):
            raise ValueError("initial expansion does not copy the old units at its copy rows")
        copied = set(copy_rows)
        new_rows = [r for r in range(n_out) if r not in copied]
        self.form = form
        self.register_buffer("fixed", copy.expand_as(initial).clone(), persistent=False)
        self.register_buffer("new_rows", torch.tensor(new_rows, dtype=torch.long), persistent=False)
        if form == "full":
            self.matrix_param = nn.Parameter(initial.clone())
        elif new_rows:
            self.rows = nn.Parameter(initial[..., new_rows, :].clone())
        else:
            self.rows = None

    def forward(self) -> torch.Tensor:
        if self.form == "full":
            return self.matrix_param
        if self.rows is None:
            return self.fixed
        return self.fixed.index_add(-2, self.new_rows, self.rows)


# ---------------------------------------------------------------------------------------- the operator
@dataclass(frozen=True)
class _Shapes:
    layers: int
    width: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int

    @staticmethod
    def of(config) -> _Shapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return _Shapes(
            config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.num_attention_heads, kv, head_dim,
        )  # fmt: skip


def check_growable(small_config, large_config) -> None:
    """ValueError unless ``large_config`` is a Llama that LiGO can grow ``small_config`` into."""
    for name in ("vocab_size", "hidden_act", "attention_bias", "mlp_bias", "rope_parameters", "model_type"):
        a, b = getattr(small_config, name, None), getattr(large_config, name, None)
        if a != b:
            raise ValueError(f"small and large configs differ in {name}: {a!r} vs {b!r}")
    if small_config.model_type != "llama":
        raise ValueError(
            f"LiGO here grows Llama-architecture models, got model_type={small_config.model_type!r}"
        )
    s, g = _Shapes.of(small_config), _Shapes.of(large_config)
    for field in ("layers", "width", "ffn", "heads", "kv_heads", "head_dim"):
        if getattr(g, field) < getattr(s, field):
            raise ValueError(
                f"the large model must not be smaller: {field} {getattr(s, field)} → {getattr(g, field)}"
            )
    if g.heads // g.kv_heads < s.heads // s.kv_heads:
        raise ValueError(
            f"query heads per key/value head must not shrink: {s.heads}/{s.kv_heads} → {g.heads}/{g.kv_heads} "
            "(grow heads and kv-heads consistently)"
        )
    if g.head_dim % 2 or s.head_dim % 2:
        raise ValueError("head_dim must be even (RoPE rotates coordinate pairs)")
    if small_config.tie_word_embeddings is False and large_config.tie_word_embeddings:
        raise ValueError(
            "the small model has separate input/output embeddings; the large one cannot tie them"
        )


class LiGOOperator(nn.Module):
    """The learned growth operator M = L_depth · R_width from a frozen small Llama to ``large_config``.

    ``parameters()`` are exactly the operator's coefficients (depth w per module type, width rows C); the
    small weights are non-persistent buffers. ``fused_state_dict()`` gives the large weights,
    ``forward(**batch)`` runs the large model on them, ``materialize()`` returns a plain LlamaForCausalLM."""

    def __init__(self, small_model, large_config, config: LiGOConfig | None = None):
        super().__init__()
        # transformers: an optional dependency (lorite[peft]), slow to import
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config or LiGOConfig()
        self.config.validate()
        small_config = small_model.config
        check_growable(small_config, large_config)
        self.small_config, self.large_config = small_config, large_config
        s, g = _Shapes.of(small_config), _Shapes.of(large_config)
        self.small, self.large = s, g
        self.small_tied = bool(small_config.tie_word_embeddings)
        self.large_tied = bool(large_config.tie_word_embeddings)
        self.biases = {"q": small_config.attention_bias, "k": small_config.attention_bias,
                       "v": small_config.attention_bias, "o": small_config.attention_bias,
                       "gate": small_config.mlp_bias, "up": small_config.mlp_bias, "down": small_config.mlp_bias}  # fmt: skip

        # frozen small weights, stacked over layers: (L1, …)
        state = {k: v.detach().float() for k, v in small_model.state_dict().items()}
        self.register_buffer("embed", state["model.embed_tokens.weight"].clone(), persistent=False)
        head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        self.register_buffer("head", head.clone(), persistent=False)
        self.register_buffer("final_norm", state["model.norm.weight"].clone(), persistent=False)
        self.weight_keys: list[str] = []
        for module, path in _LAYER_MODULES.items():
            kinds = ["weight"] + (["bias"] if self.biases.get(module) else [])
            for kind in kinds:
                key = f"{module}_{kind}"
                stacked = torch.stack([state[f"model.layers.{j}.{path}.{kind}"] for j in range(s.layers)])
                self.register_buffer(f"small_{key}", stacked.clone(), persistent=False)
                self.weight_keys.append(key)

        cfg = self.config
        # separate streams, so the width draws do not depend on the depth scheme (stacking = LiGO's init
        # without depth noise, with the very same width expansions)
        gen = torch.Generator().manual_seed(2 * cfg.seed)
        depth_gen = torch.Generator().manual_seed(2 * cfg.seed + 1)
        # depth: one (L2, L1) coefficient matrix per module type (and per bias)
        self.depth = nn.ParameterDict()
        repeats = _repeated_copies(g.layers, s.layers) if cfg.depth_init == "identity" else []
        for key in self.weight_keys:
            w = depth_init(g.layers, s.layers, cfg.depth_init, cfg.noise, depth_gen)
            if key.split("_")[0] in _RESIDUAL_WRITERS and repeats:
                # repeated layers write nothing: the grown model keeps the small one's function
                w[repeats] = 0.0
            self.depth[key] = nn.Parameter(w)

        def make(n_out: int, copy_rows: list[int], per_layer: bool, initial: torch.Tensor | None = None):
            if initial is None:
                batch = g.layers if per_layer else None
                draws = [
                    _width_init(n_out, copy_rows, cfg.width_init, cfg.noise, gen) for _ in range(batch or 1)
                ]
                initial = torch.stack(draws) if per_layer else draws[0]
            return Expansion(initial, copy_rows, cfg.width_form)

        self.residual = make(g.width, list(range(s.width)), per_layer=False)
        self.ffn = make(g.ffn, list(range(s.ffn)), per_layer=True)
        # GQA: kv heads copy to the first K1 slots; query head (group a, slot r) of the old model goes to
        # (group a, slot r) of the new one; E_q starts as E_kv ⊗ E_group (consistent growth)
        s_group, g_group = s.heads // s.kv_heads, g.heads // g.kv_heads
        kv_initial = torch.stack(
            [
                _width_init(g.kv_heads, list(range(s.kv_heads)), cfg.width_init, cfg.noise, gen)
                for _ in range(g.layers)
            ]
        )
        group_initial = torch.stack(
            [
                _width_init(g_group, list(range(s_group)), cfg.width_init, cfg.noise, gen)
                for _ in range(g.layers)
            ]
        )
        q_initial = torch.einsum("lag,lsr->lasgr", kv_initial, group_initial).reshape(
            g.layers, g.heads, s.heads
        )
        q_copy = [a * g_group + r for a in range(s.kv_heads) for r in range(s_group)]
        self.q_heads = make(g.heads, q_copy, True, q_initial)
        self.k_heads = make(g.kv_heads, list(range(s.kv_heads)), True, kv_initial)
        self.v_heads = make(g.kv_heads, list(range(s.kv_heads)), True, kv_initial.clone())
        # within a head: identity (no parameters) when head_dim is unchanged — RoPE pairs stay untouched
        self.grows_head_dim = g.head_dim != s.head_dim
        if self.grows_head_dim:
            self.qk_pairs = make(g.head_dim // 2, pair_positions(s.head_dim, g.head_dim), per_layer=True)
            self.v_dims = make(g.head_dim, list(range(s.head_dim)), per_layer=True)
        self.norm_scale = math.sqrt(s.width / g.width) if cfg.compensate_scales else 1.0
        self.q_scale = math.sqrt(g.head_dim / s.head_dim) if cfg.compensate_scales else 1.0

        # a weightless copy of the large model to run on the fused weights; only the rotary buffers are real
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(large_config)
        object.__setattr__(self, "_skeleton", skeleton)  # not a submodule: its (meta) parameters are not ours
        self.rotary = LlamaRotaryEmbedding(config=large_config)
        for p in self.rotary.parameters():
            p.requires_grad_(False)

    # -------------------------------------------------------------------------------- fused weights
    def _input_side(self, E: torch.Tensor) -> torch.Tensor:
        """A for ``W·Aᵀ`` on an input side: E itself (tied) or E(EᵀE)⁻¹ (pinv: W·E⁺·(E x) = W x)."""
        if self.config.input_side == "tied":
            return E
        return E @ torch.linalg.inv(E.mT @ E)

    def _within_head(self, pairs: torch.Tensor) -> torch.Tensor:
        """blockdiag(P, P): HF's rotate_half pairs coordinate p with p + d/2 (both halves share P)."""
        L2, n2, n1 = pairs.shape
        out = pairs.new_zeros(L2, 2 * n2, 2 * n1)
        out[:, :n2, :n1] = pairs
        out[:, n2:, n1:] = pairs
        return out

    def expansions(self) -> dict[str, torch.Tensor]:
        """The current expansion matrices (E_res, per-layer E_ffn, E_q, E_k, E_v, E_qk, E_vd)."""
        s, g = self.small, self.large
        L2 = g.layers
        if self.grows_head_dim:
            qk, vd = self._within_head(self.qk_pairs()), self.v_dims()
        else:
            eye = torch.eye(s.head_dim, device=self.embed.device)
            qk = vd = eye.expand(L2, s.head_dim, s.head_dim)
        return {"res": self.residual(), "ffn": self.ffn(), "q": self.q_heads(), "k": self.k_heads(),
                "v": self.v_heads(), "qk": qk, "vd": vd}  # fmt: skip

    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """Large-model weights, differentiable in the operator's parameters (HF parameter names)."""
        s, g = self.small, self.large
        E = self.expansions()
        res_in = self._input_side(E["res"])
        ffn_in = self._input_side(E["ffn"])
        o_in_heads, o_in_dims = self._input_side(E["q"]), self._input_side(E["vd"])
        out: dict[str, torch.Tensor] = {}

        def heads_out(x: torch.Tensor, heads: torch.Tensor, dims: torch.Tensor, n_heads: int) -> torch.Tensor:
            # x: (L2, n1_heads·d1, …) → (L2, n2_heads·d2, …) through E_heads ⊗ E_dims
            rest = x.shape[2:]
            x = x.reshape(L2, n_heads, s.head_dim, *rest)
            x = expand_axis(expand_axis(x, heads, 1), dims, 2)
            return x.reshape(L2, -1, *rest)

        L2 = g.layers
        for key in self.weight_keys:
            module, kind = key.rsplit("_", 1)
            W = depth_mix(getattr(self, f"small_{key}"), self.depth[key])  # (L2, out1[, in1])
            if module in ("q", "k", "v"):
                heads = E[module]
                dims = E["vd"] if module == "v" else E["qk"]
                n_heads = s.heads if module == "q" else s.kv_heads
                W = heads_out(W, heads, dims, n_heads)
                if kind == "weight":
                    W = expand_axis(W, res_in, 2)
                if module == "q":
                    W = W * self.q_scale
            elif module == "o":
                W = expand_axis(W, E["res"], 1)
                if kind == "weight":
                    W = W.reshape(L2, g.width, s.heads, s.head_dim)
                    W = expand_axis(expand_axis(W, o_in_heads, 2), o_in_dims, 3).reshape(L2, g.width, -1)
            elif module in ("gate", "up"):
                W = expand_axis(W, E["ffn"], 1)
                if kind == "weight":
                    W = expand_axis(W, res_in, 2)
            elif module == "down":
                W = expand_axis(W, E["res"], 1)
                if kind == "weight":
                    W = expand_axis(W, ffn_in, 2)
            else:  # RMSNorm γ
                W = expand_axis(W, E["res"], 1) * self.norm_scale
            path = _LAYER_MODULES[module]
            for i in range(L2):
                out[f"model.layers.{i}.{path}.{kind}"] = W[i]

        out["model.embed_tokens.weight"] = expand_axis(self.embed, E["res"], 1)
        # the head reads the residual stream; with pinv input sides and a tied table the final norm takes the
        # input-side division instead (the tied matrix needs one consistent expansion)
        norm_side = res_in if self.large_tied else E["res"]
        out["model.norm.weight"] = expand_axis(self.final_norm, norm_side, 0) * self.norm_scale
        if not self.large_tied:
            out["lm_head.weight"] = expand_axis(self.head, res_in, 1)
        return out

    def forward(self, **batch: Any):
        """The large model's forward (HF outputs; pass ``labels`` for the LM loss) on the fused weights."""
        with torch.autocast(self.embed.device.type, enabled=False):  # fused weights in fp32, as materialised
            tensors = self.fused_state_dict()
        for name, buffer in self.rotary.named_buffers():
            tensors[f"model.rotary_emb.{name}"] = buffer
        return functional_call(self._skeleton, tensors, args=(), kwargs=batch, tie_weights=True, strict=False)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype | None = None):
        """A plain ``LlamaForCausalLM(large_config)`` holding the fused weights (the operator is discarded)."""
        from transformers import LlamaForCausalLM  # optional dependency (lorite[peft]), slow to import

        weights = self.fused_state_dict()
        device = self.embed.device
        with torch.device(device):
            model = LlamaForCausalLM(self.large_config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (self.large_tied and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(
                f"fused weights do not fit the large model: missing {missing}, unexpected {unexpected}"
            )
        return model.to(dtype) if dtype is not None else model

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def operator_parameter_count(
    small_config, large_config, width_form: str = "identity_plus_C", biases: int = 0
) -> int:
    """Closed form of the operator's size (spec: O(L1·L2 + Σ D1·D2) per module type):

    depth ``T·L2·L1`` (T = 9 module types + ``biases``); width, with n_new = n2 − n1 rows per expansion
    (``identity_plus_C``) or n2 (``full``): residual n_new(D)·D1, and per new layer FFN n_new(F)·F1,
    query heads n_new(H)·H1, key and value heads 2·n_new(K)·K1 and, when head_dim grows, rotary pairs
    n_new(d/2)·d1/2 and value coordinates n_new(d)·d1."""
    s, g = _Shapes.of(small_config), _Shapes.of(large_config)

    def rows(n2: int, n1: int) -> int:
        return n2 if width_form == "full" else n2 - n1

    count = (len(_LAYER_MODULES) + biases) * g.layers * s.layers
    count += rows(g.width, s.width) * s.width
    per_layer = rows(g.ffn, s.ffn) * s.ffn + rows(g.heads, s.heads) * s.heads
    per_layer += 2 * rows(g.kv_heads, s.kv_heads) * s.kv_heads
    if g.head_dim != s.head_dim:
        per_layer += rows(g.head_dim // 2, s.head_dim // 2) * (s.head_dim // 2)
        per_layer += rows(g.head_dim, s.head_dim) * s.head_dim
    return count + g.layers * per_layer


# ------------------------------------------------------------------------------------------ training
def train_operator(
    operator: LiGOOperator,
    batches: Iterable[torch.Tensor],
    config: OperatorTrainingConfig | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train only the operator's coefficients on the large model's next-token loss; returns the losses.

    ``batches`` yields LongTensor token blocks (B, T) (labels = inputs; HF shifts them). AdamW with linear
    warmup over ``warmup_steps`` then linear decay to 0 at ``steps``, gradient-norm clipping."""
    config = config or OperatorTrainingConfig()
    config.validate()
    params = [p for p in operator.parameters() if p.requires_grad]
    if config.steps == 0:
        return []
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )

    schedule = lr_scheduler(optimizer, config.steps, config.warmup_steps, "linear")
    device = operator.embed.device
    autocast = config.bf16 and device.type == "cuda"
    iterator: Iterator[torch.Tensor] = iter(batches)
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

        steps = tqdm(steps, desc="LiGO operator", leave=False)
    losses: list[float] = []
    operator.train()
    for step in steps:
        try:
            ids = next(iterator).to(device)
        except StopIteration as error:
            raise ValueError(f"batches ran out after {step} of {config.steps} operator steps") from error
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = operator(input_ids=ids, labels=ids).loss
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def held_out_loss(model, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token loss of ``model`` (a :class:`LiGOOperator` — the grown model on its current fused
    weights — or any HF causal LM) over the token blocks ``batches``, weighted by block count."""
    was_training = model.training
    model.eval()
    device = next(iter(model.buffers() if isinstance(model, LiGOOperator) else model.parameters())).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += float(model(input_ids=ids, labels=ids).loss) * ids.shape[0]
        count += ids.shape[0]
    model.train(was_training)
    return total / max(count, 1)


def grow(
    small_model,
    large_config,
    method: str = "ligo",
    batches: Iterable[torch.Tensor] | None = None,
    training: OperatorTrainingConfig | None = None,
    ligo: LiGOConfig | None = None,
    progress: bool = True,
) -> tuple[Any, dict]:
    """Grow ``small_model`` into ``LlamaForCausalLM(large_config)``.

    ``method="ligo"``: build the operator (``ligo`` settings), train it on ``batches`` for ``training.steps``,
    materialise. ``method="stack"``: the same operator with noise-free StackBERT depth (:func:`stack_config`),
    materialised without any training. Returns (large model in fp32 on the small model's device, info)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    training = training or OperatorTrainingConfig()
    if method == "stack":
        ligo = stack_config(seed=(ligo.seed if ligo else 0))
    operator = LiGOOperator(small_model, large_config, ligo).to(next(small_model.parameters()).device)
    info: dict[str, Any] = {"method": method, "ligo_config": asdict(operator.config),
                            "operator_parameters": operator.parameter_count()}  # fmt: skip
    if method == "ligo" and training.steps > 0:
        if batches is None:
            raise ValueError("LiGO needs training batches (token blocks) for its operator steps")
        info["training"] = asdict(training)
        info["operator_losses"] = train_operator(operator, batches, training, progress=progress)
    model = operator.materialize()
    return model, info
