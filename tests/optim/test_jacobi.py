"""lorite's Triton Jacobi eigensolver (the sync-free r×r eigh used on GPUs), checked against LAPACK.

On a machine without a GPU it runs in Triton's interpreter, in a subprocess (TRITON_INTERPRET must be set
before Triton compiles anything); without Triton installed (CPU builds of torch) it is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import torch
    from lorite.optim._jacobi import jacobi_eigh
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for r in (4, 16, 20):
        X = torch.randn(5, r, r)
        A = X @ X.mT
        A[0] = 0.0                                   # a zero matrix: V at peft's B = 0 start
        A[1] = torch.diag(torch.arange(r, dtype=torch.float32))  # already diagonal
        A[2, :, :] = 1.0                             # rank one, repeated zero eigenvalues
        values, vectors = jacobi_eigh(A.to(device))
        values, vectors = values.cpu(), vectors.cpu()
        scale = A.abs().amax(dim=(1, 2)).clamp(min=1.0)[:, None]
        worst = max(worst, float(((values.sort(-1).values - torch.linalg.eigvalsh(A)).abs() / scale).max()))
        rebuilt = vectors @ torch.diag_embed(values) @ vectors.mT
        worst = max(worst, float(((rebuilt - A).abs().amax(dim=(1, 2)) / scale[:, 0]).max()))
        worst = max(worst, float((vectors.mT @ vectors - torch.eye(r)).abs().max()))
    print(worst)
    """
)


def test_jacobi_eigh_matches_lapack():
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not ship it)")
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    worst = float(result.stdout.strip().splitlines()[-1])
    assert worst < 2e-5, f"eigenvalues, reconstruction or orthogonality off by {worst:.2e}"
