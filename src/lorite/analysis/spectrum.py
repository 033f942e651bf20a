r"""The spectrum of a fine-tuning update: how many directions does ΔW use?

Biderman et al., "LoRA Learns Less and Forgets Less" (arXiv 2405.09673, §6): per weight matrix,

.. math::
    \Delta W = W_{\text{tuned}} - W_{\text{base}}, \qquad
    \sigma_1 \ge \sigma_2 \ge \dots \text{ its singular values}, \qquad
    \text{explained}(k) = \frac{\sum_{i \le k} \sigma_i^2}{\sum_i \sigma_i^2}, \qquad
    \text{rank}_{90} = \min\{k : \text{explained}(k) \ge 0.9\}

(``threshold`` = 0.9; ``criterion="var"`` uses σ², the paper's "variance"; ``criterion="sv"`` uses σ and
gives larger ranks). Each rank is shown beside the same number for an i.i.d. Gaussian matrix of the same
shape — about 0.51·n for n×n with σ² — and for W_base itself: full fine-tuning's ΔW is close to the
random reference (rank 10–100× typical LoRA ranks), while a LoRA update ΔW = s·B·A has rank ≤ r by
construction.

For a LoRA adapter the update is never materialised: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced
QR), ``s·B·A = Q_B (s R_B R_Aᵀ) Q_Aᵀ``, so its singular values are those of the small ``s R_B R_Aᵀ``.

Everything runs in fp32 (ΔW of bf16 checkpoints is taken after the cast: subtracting in bf16 loses the
small update) with ``torch.linalg.svdvals`` (no singular vectors), on the GPU when there is one.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_save_figure, atomic_write_text
from ..errors import LoriteError
from ..models import resolve_model_dir
from ..runtime import pick_device

CRITERIA = ("var", "sv")
# Table and plot order: attention then MLP, as in a Llama layer; other modules after, alphabetically.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Decoder-layer matrices: "model.layers.3.self_attn.q_proj.weight" → layer 3, module "self_attn.q_proj".
_LAYER_MATRIX = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")


# ------------------------------------------------------------------------------------------- the math
def _check(threshold: float, criterion: str) -> None:
    if not (0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def explained_fraction(singular_values: torch.Tensor, criterion: str = "var") -> torch.Tensor:
    """``explained(k)`` for k = 1 … len: the cumulative share of Σσ² (``"var"``) or Σσ (``"sv"``), in
    float64, descending order enforced. All zeros (a zero update) gives all zeros."""
    _check(0.5, criterion)
    values = singular_values.detach().double().abs().flatten().sort(descending=True).values
    weights = values.square() if criterion == "var" else values
    total = weights.sum()
    cumulative = weights.cumsum(0)
    return cumulative / total if total > 0 else torch.zeros_like(cumulative)


def rank_from_singular_values(
    singular_values: torch.Tensor, threshold: float = 0.9, criterion: str = "var"
) -> int:
    """``min {k : explained(k) ≥ threshold}``; 0 for a zero matrix."""
    _check(threshold, criterion)
    cumulative = explained_fraction(singular_values, criterion)
    if cumulative.numel() == 0 or cumulative[-1] == 0:
        return 0
    # the tolerance absorbs rounding of a share that is exactly the threshold (e.g. 9 of 10 equal σ²)
    reached = (cumulative >= threshold - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(cumulative.numel())


@dataclass(frozen=True)
class SpectralRank:
    rank: int
    explained: torch.Tensor  # explained(k), float64 on the CPU
    singular_values: torch.Tensor  # descending, float32 on the CPU


def spectral_rank(matrix: torch.Tensor, threshold: float = 0.9, criterion: str = "var") -> SpectralRank:
    """rank90 (for ``threshold`` = 0.9) of one matrix, from fp32 singular values (float64 input stays
    float64)."""
    if matrix.ndim != 2:
        raise ValueError(f"spectral_rank needs a matrix, got shape {tuple(matrix.shape)}")
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    values = torch.linalg.svdvals(matrix.to(dtype))
    return SpectralRank(
        rank_from_singular_values(values, threshold, criterion),
        explained_fraction(values, criterion).cpu(),
        values.float().cpu(),
    )


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of ``scale · B · A`` (B: m×r, A: r×n) without forming the m×n product: the
    nonzero ones are those of ``scale · R_B R_Aᵀ`` from the reduced QR of B and Aᵀ (min(m, r, n) values)."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lowrank_singular_values: B {tuple(B.shape)} and A {tuple(A.shape)} do not chain")
    dtype = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    _, r_b = torch.linalg.qr(B.to(dtype))
    _, r_a = torch.linalg.qr(A.to(dtype).T)
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(scale)


@lru_cache(maxsize=64)
def random_singular_values(shape: tuple[int, int], seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Singular values (float32, on the CPU) of an i.i.d. N(0, 1) matrix of ``shape``, drawn on the CPU with
    ``seed`` (the same matrix on any device) and decomposed on ``device``. Cached per shape."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    gaussian = torch.randn(tuple(int(s) for s in shape), generator=generator)
    return torch.linalg.svdvals(gaussian.to(device)).float().cpu()


def random_baseline_rank(
    shape: tuple[int, int], threshold: float = 0.9, criterion: str = "var", seed: int = 0, device="cpu"
) -> int:
    """rank90 of an i.i.d. Gaussian matrix of ``shape``: the "no structure" reference (≈ 0.51·n for n×n
    with σ², ≈ 0.71·m for 4096×11008; spec §3)."""
    _check(threshold, criterion)
    values = random_singular_values(tuple(int(s) for s in shape), int(seed), str(device))
    return rank_from_singular_values(values, threshold, criterion)


# ------------------------------------------------------------------------------------------- weights
def split_name(name: str) -> tuple[int | None, str]:
    """``(layer, module)`` of a decoder-layer weight name; ``(None, name)`` for any other tensor."""
    match = _LAYER_MATRIX.search(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name.removesuffix(".weight"))


def resolve_weights_dir(path: str | Path, what: str) -> Path:
    """A model directory holding ``*.safetensors``: ``path`` itself, or ``path/model`` for a full
    fine-tuning run directory."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").exists() and list(candidate.glob("*.safetensors")):
            return candidate
    if not path.exists():
        raise LoriteError(f"{what} {str(path)!r} does not exist")
    raise LoriteError(
        f"{what} {str(path)!r} holds no safetensors model (expected config.json and *.safetensors, "
        "or a run directory with model/)"
    )


def resolve_adapter_dir(path: str | Path) -> Path:
    """A peft adapter directory: ``path`` itself, or ``path/adapter`` for a LoRA run directory."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    if not path.exists():
        raise LoriteError(f"--adapter {str(path)!r} does not exist")
    raise LoriteError(f"--adapter {str(path)!r} holds no adapter_config.json (nor adapter/ below it)")


class _SafetensorsModel:
    """Tensors of a (possibly sharded) safetensors model directory, read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open  # optional dependency (lorite[peft])

        self.handles = [safe_open(str(f), framework="pt") for f in sorted(folder.glob("*.safetensors"))]
        files = sorted(folder.glob("*.safetensors"))
        # the files' path, size and modification time: a cache key that changes when the weights do
        self.identity = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        self.where = {name: h for h in self.handles for name in h.keys()}  # noqa: SIM118 (safe_open is not iterable)

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


@dataclass(frozen=True)
class _Update:
    name: str
    shape: tuple[int, int]
    delta: torch.Tensor | None = None  # the dense ΔW, or
    factors: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (B, A, scale): ΔW = scale·B·A


def _model_updates(base: Path, tuned: Path) -> Iterator[_Update]:
    """ΔW of every 2-D decoder-layer weight of ``tuned`` against ``base``, in fp32."""
    base_weights, tuned_weights = _SafetensorsModel(base), _SafetensorsModel(tuned)
    names = [
        n for n in tuned_weights.names() if split_name(n)[0] is not None and len(tuned_weights.shape(n)) == 2
    ]
    if not names:
        raise LoriteError(
            f"--tuned {str(tuned)!r}: no decoder-layer weight matrices (model.layers.N.*.weight)"
        )
    for name in names:
        if name not in base_weights.where:
            raise LoriteError(f"--base {str(base)!r} has no {name!r}: not the model --tuned was trained from")
        if base_weights.shape(name) != tuned_weights.shape(name):
            raise LoriteError(
                f"{name}: --base is {base_weights.shape(name)}, --tuned {tuned_weights.shape(name)}; "
                "not the same architecture"
            )
        delta = tuned_weights.get(name).float() - base_weights.get(name).float()
        yield _Update(name, tuple(delta.shape), delta=delta)


def _pattern_value(patterns: dict[str, Any], module: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module path that ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's LoRA scaling s for one module: α/r, or α/√r with rsLoRA (``use_rslora``)."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _adapter_updates(adapter: Path) -> Iterator[_Update]:
    """(B, A, s) of every LoRA pair in a peft adapter directory, named like the base weight it updates."""
    from safetensors.torch import load_file  # optional dependency (lorite[peft])

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoriteError(f"--adapter {str(adapter)!r} is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        raise LoriteError(
            f"--adapter {str(adapter)!r} is DoRA: its ΔW is not s·B·A (merge it and use --tuned)"
        )
    files = sorted(adapter.glob("*.safetensors"))
    if not files:
        raise LoriteError(f"--adapter {str(adapter)!r} holds no adapter_model.safetensors")
    weights = {k: v for f in files for k, v in load_file(str(f)).items()}
    found = 0
    for key in sorted(weights):
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        A, B = weights[key], weights.get(prefix + ".lora_B.weight")
        if B is None or A.ndim != 2 or B.ndim != 2:
            continue  # embedding/conv LoRA keep other layouts; only linear pairs are ΔW matrices here
        module = prefix.removeprefix("base_model.model.")
        found += 1
        scale = adapter_scale(config, module, A.shape[0])
        yield _Update(f"{module}.weight", (B.shape[0], A.shape[1]), factors=(B.float(), A.float(), scale))
    if not found:
        raise LoriteError(f"--adapter {str(adapter)!r} holds no lora_A/lora_B weight pairs")


# ------------------------------------------------------------------------------------------- analysis
@dataclass
class MatrixSpectrum:
    """One weight matrix: the rank90 of its update beside the references."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    rank: int  # rank_threshold(ΔW)
    random_rank: int  # the same for an i.i.d. Gaussian matrix of this shape
    base_rank: int | None  # the same for W_base (None without --base)
    max_rank: int  # min(m, n), or the LoRA rank r for an adapter
    norm: float  # ‖ΔW‖_F
    relative_norm: float | None  # ‖ΔW‖_F / ‖W_base‖_F
    explained: torch.Tensor = field(repr=False)  # explained(k), for the plot (not in the JSON)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("explained")
        data["shape"] = list(self.shape)
        data["rank_over_random"] = self.rank / self.random_rank if self.random_rank else None
        return data


_BASE_SPECTRA: dict[
    tuple[str, str, str], torch.Tensor
] = {}  # several analyses of one base: decompose it once


def _base_singular_values(weights: _SafetensorsModel, name: str, device: str) -> torch.Tensor:
    key = (weights.identity, name, device)
    if key not in _BASE_SPECTRA:
        _BASE_SPECTRA[key] = torch.linalg.svdvals(weights.get(name).float().to(device)).cpu()
    return _BASE_SPECTRA[key]


def analyze_spectrum(
    base: str | Path | None = None,
    tuned: str | Path | None = None,
    adapter: str | Path | None = None,
    threshold: float = 0.9,
    criterion: str = "var",
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """rank90 of ΔW for every decoder-layer matrix, beside the random and (with ``base``) W_base references.

    Give ``tuned`` (a model directory or a full fine-tuning run; ΔW = W_tuned − W_base, needs ``base``) or
    ``adapter`` (a peft LoRA adapter or a LoRA run; ΔW = s·B·A, merge-free; ``base`` optional, for the W_base
    column). ``base`` is anything ``--model`` accepts (None: the default SmolLM2). Returns a dict with
    ``matrices`` (:class:`MatrixSpectrum`), ``modules`` (per-module summary) and the settings.
    """
    if (tuned is None) == (adapter is None):
        raise LoriteError("give --tuned MODEL (full fine-tuning) or --adapter DIR (LoRA), exactly one")
    if not (0 < threshold <= 1):
        raise LoriteError(f"--threshold must be in (0, 1], got {threshold}")
    if criterion not in CRITERIA:
        raise LoriteError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    run_device = pick_device(device)
    tuned_dir = resolve_weights_dir(tuned, "--tuned") if tuned is not None else None
    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    base_dir = None
    if tuned is not None or base is not None:
        base_dir = resolve_weights_dir(resolve_model_dir(base), "--base")
    base_weights = _SafetensorsModel(base_dir) if base_dir is not None else None
    updates = _model_updates(base_dir, tuned_dir) if tuned_dir is not None else _adapter_updates(adapter_dir)

    matrices: list[MatrixSpectrum] = []
    for update in updates:
        layer, module = split_name(update.name)
        if update.factors is not None:
            B, A, scale = update.factors
            values = lowrank_singular_values(B.to(run_device), A.to(run_device), scale)
            max_rank = min(A.shape[0], *update.shape)
        else:
            values = torch.linalg.svdvals(update.delta.to(run_device))
            max_rank = min(update.shape)
        norm = float(values.double().square().sum().sqrt())
        base_rank = relative = None
        if base_weights is not None and update.name in base_weights.where:
            if base_weights.shape(update.name) != update.shape:
                raise LoriteError(
                    f"{update.name}: --base is {base_weights.shape(update.name)}, the adapter's ΔW {update.shape}"
                )
            base_values = _base_singular_values(base_weights, update.name, str(run_device))
            base_rank = rank_from_singular_values(base_values, threshold, criterion)
            base_norm = float(base_values.double().square().sum().sqrt())
            relative = norm / base_norm if base_norm > 0 else None
        matrices.append(
            MatrixSpectrum(
                name=update.name, layer=layer, module=module, shape=update.shape,
                rank=rank_from_singular_values(values, threshold, criterion),
                random_rank=random_baseline_rank(update.shape, threshold, criterion, seed, str(run_device)),
                base_rank=base_rank, max_rank=max_rank, norm=norm, relative_norm=relative,
                explained=explained_fraction(values, criterion).cpu(),
            )
        )  # fmt: skip
    matrices.sort(key=lambda m: (m.layer if m.layer is not None else -1, module_order(m.module)))
    return {
        "source": {
            "base": str(base_dir) if base_dir else None,
            "tuned": str(tuned_dir) if tuned_dir else None,
            "adapter": str(adapter_dir) if adapter_dir else None,
        },
        "threshold": threshold,
        "criterion": criterion,
        "seed": seed,
        "device": str(run_device),
        "matrices": matrices,
        "modules": summarize_modules(matrices),
    }


def module_order(module: str) -> tuple[int, str]:
    """Sort key: q, k, v, o, gate, up, down, then the rest by name."""
    last = module.rsplit(".", 1)[-1]
    return (_MODULE_ORDER.index(last) if last in _MODULE_ORDER else len(_MODULE_ORDER), module)


def summarize_modules(matrices: list[MatrixSpectrum]) -> dict[str, dict[str, Any]]:
    """Per module name (``self_attn.q_proj``, …): shape, rank90 mean/min/max over layers, the references."""
    summary: dict[str, dict[str, Any]] = {}
    for module in sorted({m.module for m in matrices}, key=module_order):
        group = [m for m in matrices if m.module == module]
        ranks = [m.rank for m in group]
        bases = [m.base_rank for m in group if m.base_rank is not None]
        summary[module] = {
            "shape": list(group[0].shape),
            "matrices": len(group),
            "rank_mean": statistics.fmean(ranks),
            "rank_min": min(ranks),
            "rank_max": max(ranks),
            "max_rank": group[0].max_rank,
            "random_rank": group[0].random_rank,
            "base_rank_mean": statistics.fmean(bases) if bases else None,
            "rank_over_random": statistics.fmean(m.rank / m.random_rank for m in group if m.random_rank)
            if any(m.random_rank for m in group)
            else None,
        }
    return summary


# ------------------------------------------------------------------------------------------- output
def spectrum_markdown(result: dict[str, Any]) -> str:
    """The per-module summary and the layer × module table of rank90 values."""
    pct = f"{100 * result['threshold']:g}%"
    crit = "σ²" if result["criterion"] == "var" else "σ"
    source = result["source"]
    what = (
        f"adapter `{source['adapter']}`" if source["adapter"] else f"`{source['tuned']}` − `{source['base']}`"
    )
    lines = [
        f"# Spectrum of ΔW: rank needed to explain {pct} of Σ{crit}",
        "",
        f"ΔW = {what}. Random: an i.i.d. Gaussian matrix of the same shape (seed {result['seed']}).",
        "",
        "| module | shape | max rank | ΔW rank (mean) | min–max | random | W_base (mean) | ΔW / random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module, info in result["modules"].items():
        base = f"{info['base_rank_mean']:.1f}" if info["base_rank_mean"] is not None else "–"
        ratio = f"{info['rank_over_random']:.3f}" if info["rank_over_random"] is not None else "–"
        lines.append(
            f"| {module} | {info['shape'][0]}×{info['shape'][1]} | {info['max_rank']} | {info['rank_mean']:.1f} "
            f"| {info['rank_min']}–{info['rank_max']} | {info['random_rank']} | {base} | {ratio} |"
        )
    matrices = result["matrices"]
    modules = list(result["modules"])
    layers = sorted({m.layer for m in matrices if m.layer is not None})
    if layers:
        cells = {(m.layer, m.module): m.rank for m in matrices}
        lines += ["", f"ΔW rank per layer ({pct} of Σ{crit}):", ""]
        lines += ["| layer | " + " | ".join(modules) + " |", "|---" * (len(modules) + 1) + "|"]
        for layer in layers:
            row = [str(cells.get((layer, module), "–")) for module in modules]
            lines.append(f"| {layer} | " + " | ".join(row) + " |")
        lines.append(
            "| random | " + " | ".join(str(result["modules"][m]["random_rank"]) for m in modules) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_spectrum(result: dict[str, Any], path: Path) -> Path | None:
    """Left: explained(k) of every ΔW (one line per matrix, coloured by module) and of the random reference
    (dashed). Right: rank90 per layer for each module, the random reference dotted."""
    import matplotlib  # optional dependency (lorite[all]), slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (lorite[all]), slow to import

    matrices = result["matrices"]
    if not matrices:
        return None
    modules = list(result["modules"])
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(modules)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in matrices:
        k = torch.arange(1, m.explained.numel() + 1)
        left.plot(k, m.explained, color=colours[m.module], alpha=0.35, linewidth=0.8)
    for module in modules:
        shape = result["modules"][module]["shape"]
        values = random_singular_values(tuple(shape), result["seed"], result.get("device", "cpu"))
        reference = explained_fraction(values, result["criterion"])
        left.plot(
            torch.arange(1, reference.numel() + 1), reference, "--", color=colours[module], linewidth=1.2
        )
        left.plot([], [], color=colours[module], label=module)
    left.axhline(result["threshold"], color="grey", linewidth=0.8)
    left.set(xlabel="k (singular values kept)", ylabel="explained(k)", xscale="log", ylim=(0, 1.02))
    left.set_title("cumulative spectrum of ΔW (dashed: random Gaussian)", fontsize=10)
    left.legend(fontsize=7)
    layered = [m for m in matrices if m.layer is not None]
    for module in modules:
        points = sorted((m.layer, m.rank) for m in layered if m.module == module)
        if points:
            right.plot(*zip(*points), marker=".", color=colours[module], label=module)
            right.axhline(result["modules"][module]["random_rank"], linestyle=":", color=colours[module])
    right.set(xlabel="layer", ylabel=f"rank for {100 * result['threshold']:g}% of variance")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_title("rank of ΔW per layer (dotted: random Gaussian)", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def spectrum_json(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "matrices": [m.to_json() for m in result["matrices"]]}


def write_spectrum_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``spectrum.json``, ``spectrum.md`` and ``spectrum.png`` in ``out`` (each written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "spectrum.json", "markdown": out / "spectrum.md"}
    atomic_write_text(paths["json"], json.dumps(spectrum_json(result), indent=1))
    atomic_write_text(paths["markdown"], spectrum_markdown(result))
    plot = plot_spectrum(result, out / "spectrum.png")
    if plot is not None:
        paths["plot"] = plot
    return paths
