"""lorite's Triton Jacobi eigensolvers (the sync-free r×r eigh used on GPUs), checked against LAPACK.

On a machine without a GPU they run in Triton's interpreter, in a subprocess (TRITON_INTERPRET must be set
before Triton compiles anything); without Triton installed (CPU builds of torch) they are skipped. The
interpreter is slow (~10 s per 3 matrices at 48 × 48), so the global-memory cases are few and small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import torch
    from lorite.optim._jacobi import REGISTER_KERNEL_UP_TO, jacobi_eigh
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for r in (4, 16, 20):
        X = torch.randn(5, r, r)
        A = X @ X.mT
        A[0] = 0.0                                   # a zero matrix: V at peft's B = 0 start
        A[1] = torch.diag(torch.arange(r, dtype=torch.float32))  # already diagonal
        A[2, :, :] = 1.0                             # rank one, repeated zero eigenvalues
        done = torch.full((5,), -1, dtype=torch.int32, device=device)
        values, vectors = jacobi_eigh(A.to(device), sweeps_done=done)
        values, vectors = values.cpu(), vectors.cpu()
        done = done.cpu().tolist()
        # converged on arrival: the register kernel (r <= 16) tests before its first sweep, the one-sided
        # kernel (its default at 20: padded 32) after it
        assert done[0] == 0 and done[1] == (0 if r <= REGISTER_KERNEL_UP_TO else 1), done
        assert all(1 <= d <= 10 for d in done[2:]), done
        scale = A.abs().amax(dim=(1, 2)).clamp(min=1.0)[:, None]
        worst = max(worst, float(((values.sort(-1).values - torch.linalg.eigvalsh(A)).abs() / scale).max()))
        rebuilt = vectors @ torch.diag_embed(values) @ vectors.mT
        worst = max(worst, float(((rebuilt - A).abs().amax(dim=(1, 2)) / scale[:, 0]).max()))
        worst = max(worst, float((vectors.mT @ vectors - torch.eye(r)).abs().max()))
    print(worst)
    """
)

# Both global-memory methods on the matrices that break eigensolvers, against float64 LAPACK. Prints one
# JSON object: {method: {"r/case": [eigenvalue error, reconstruction error, orthogonality, sweeps]}}.
GLOBAL_MEMORY_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from lorite.optim._jacobi import jacobi_eigh
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def symmetric_noise(r):
        x = torch.randn(r, r, dtype=torch.float64)
        return (x + x.mT) / 2

    def psd(r, rank=None):
        x = torch.randn(r, rank or r, dtype=torch.float64)
        return x @ x.mT / r

    def repeated(r):  # eigenvalues 1 (r/2 times) and 2, in a random basis
        Q = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
        values = torch.ones(r, dtype=torch.float64)
        values[r // 2 :] = 2.0
        return Q @ torch.diag(values) @ Q.mT

    def warm(r):  # nearly diagonal: what a start in the previous eigenbasis sees
        return torch.diag(torch.rand(r, dtype=torch.float64) * 4 + 0.1) + 1e-4 * symmetric_noise(r)

    def rank_one(r):
        x = torch.randn(r, 1, dtype=torch.float64)
        return x @ x.mT

    CASES = {
        33: {"zero": lambda r: torch.zeros(r, r, dtype=torch.float64),
             "diagonal": lambda r: torch.diag(torch.arange(r, dtype=torch.float64)),
             "rank_one": rank_one, "repeated": repeated},
        48: {"random": psd, "indefinite": lambda r: psd(r, r - 4) - 1e-7 * torch.eye(r, dtype=torch.float64),
             "warm": warm},
        64: {"random": psd, "warm": warm, "repeated": repeated, "rank_one": rank_one},
        128: {"random": psd, "warm": warm},
    }
    results = {}
    for method in sys.argv[1].split(","):
        out = results[method] = {}
        for r, cases in CASES.items():
            A64 = torch.stack([make(r) for make in cases.values()])
            A = A64.float()
            done = torch.full((len(cases),), -1, dtype=torch.int32, device=device)
            values, vectors = jacobi_eigh(A.to(device), method=method, sweeps_done=done)
            values, vectors = values.cpu().double(), vectors.cpu().double()
            exact = torch.linalg.eigvalsh(A.double())  # of the fp32 input the kernel sees
            scale = exact.abs().amax(dim=-1).clamp(min=1e-30)
            value_error = (values.sort(-1).values - exact).abs().amax(dim=-1) / scale
            rebuilt = vectors @ torch.diag_embed(values) @ vectors.mT
            rebuild_error = (rebuilt - A.double()).abs().amax(dim=(1, 2)) / scale
            orthogonality = (vectors.mT @ vectors - torch.eye(r, dtype=torch.float64)).abs().amax(dim=(1, 2))
            finite = bool(torch.isfinite(values).all() and torch.isfinite(vectors).all())
            for i, name in enumerate(cases):
                out[f"{r}/{name}"] = [float(value_error[i]) if finite else float("inf"),
                                      float(rebuild_error[i]), float(orthogonality[i]), int(done[i])]
    print(json.dumps(results))
    """
)


def _run(script: str, *args: str) -> str:
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not ship it)")
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_jacobi_eigh_matches_lapack():
    worst = float(_run(CHECK))
    assert worst < 2e-5, f"eigenvalues, reconstruction or orthogonality off by {worst:.2e}"


@pytest.fixture(scope="module")
def global_memory_results() -> dict:
    """Both methods' errors and sweep counts per case (one interpreter subprocess for all tests)."""
    return json.loads(_run(GLOBAL_MEMORY_CHECK, "two_sided,one_sided"))


@pytest.mark.parametrize("method", ["two_sided", "one_sided"])
def test_global_memory_jacobi_matches_lapack(global_memory_results, method):
    """Eigenvalues (relative to ‖A‖₂), the reconstruction E diag(λ) Eᵀ and EᵀE = I, to 2e-5, for random,
    zero, diagonal, rank-one, repeated-eigenvalue, slightly indefinite and nearly diagonal matrices."""
    bad = {
        case: [f"{x:.1e}" for x in errors[:3]]
        for case, errors in global_memory_results[method].items()
        if not max(errors[:3]) < 2e-5
    }
    assert not bad, f"{method}: [eigenvalue, reconstruction, orthogonality] errors {bad}"


@pytest.mark.parametrize("method", ["two_sided", "one_sided"])
def test_global_memory_jacobi_exits_early(global_memory_results, method):
    """The convergence test ends each matrix's loop on its own: a nearly diagonal input (a warm start)
    takes at most 2 sweeps, a diagonal or zero one at most 1 (two-sided: 0, tested before the first
    sweep), while a random one needs several and stays within the cap."""
    sweeps = {case: errors[3] for case, errors in global_memory_results[method].items()}
    for case in ("48/warm", "64/warm", "128/warm"):
        assert 1 <= sweeps[case] <= 2, (case, sweeps)
    first = 0 if method == "two_sided" else 1
    assert sweeps["33/zero"] == 0 and sweeps["33/diagonal"] == first, sweeps
    cap = {"two_sided": {48: 12, 64: 12, 128: 14}, "one_sided": {48: 16, 64: 16, 128: 18}}[method]
    for r in (48, 64, 128):
        assert 4 <= sweeps[f"{r}/random"] <= cap[r], (r, sweeps)
