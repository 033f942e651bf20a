"""The batched r × r primitives of lorite.optim._linalg on CPU (their CUDA routes: tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from lorite.optim import _linalg


@pytest.mark.parametrize("rank", [4, 64])
def test_small_eigh_on_cpu_is_lapack(rank):
    x = torch.randn(6, rank, rank, generator=torch.Generator().manual_seed(0))
    V = x @ x.mT
    assert _linalg.eigh_route(V) == "torch"
    values, vectors = _linalg.eigh_small(V)
    exact_values, _ = torch.linalg.eigh(V)
    torch.testing.assert_close(values, exact_values)
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, V, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        _linalg.eigvalsh_small(V), exact_values, rtol=0, atol=1e-5 * float(exact_values.max())
    )


def test_cholesky_factor_flags_rank_deficient_factors_by_the_relative_tolerance():
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1, 7] = x[1, 6] + 1e-4 * x[1, 7]  # two nearly parallel rows: min/max |R_ii| ~ 1e-4
    x[2] = 0.0  # peft's B = 0 start
    R, full_rank = _linalg.cholesky_factor(x @ x.mT, tolerance_dtype=torch.float32)
    assert full_rank.tolist() == [True, True, False]
    torch.testing.assert_close(R[0].mT @ R[0], x[0] @ x[0].mT)
    assert torch.equal(R[2], torch.zeros(8, 8, dtype=torch.float64))
    _, guarded = _linalg.cholesky_factor(x @ x.mT, tolerance_dtype=torch.float32, relative_tolerance=3e-3)
    assert guarded.tolist() == [True, False, False]
