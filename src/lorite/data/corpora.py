"""Public-domain plain-text corpora, downloaded once and cached: the registry and its loader.

* ``shakespeare`` — the complete works (modern-spelling Gutenberg texts), one document per work;
* ``bible``, ``austen``, ``webster``, ``cpython`` — King James Bible, Jane Austen's novels, Webster 1913
  (GCIDE) and the Python standard library's source.

Sources and document units: :mod:`lorite.data.corpus_sources`. How a corpus is split into training and
held-out documents is the task layer's (:func:`lorite.tasks.splits.split_documents`).
"""

from __future__ import annotations

import json

from ..cache import atomic_write_text, cache_dir
from ..errors import LoriteError
from . import corpus_sources
from .corpus_sources import Document

CORPORA = {
    "shakespeare": corpus_sources.shakespeare,
    "bible": corpus_sources.bible,
    "austen": corpus_sources.austen,
    "webster": corpus_sources.webster,
    "cpython": corpus_sources.cpython,
}

__all__ = ["CORPORA", "Document", "load_corpus"]


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
