"""The public-domain corpora from their real sources (downloads once, then the lorite cache)."""

from __future__ import annotations

import pytest

from lorite.data.corpora import CORPORA, load_corpus


@pytest.mark.real_data
def test_public_domain_corpora_have_their_documents(real_data):
    bible = load_corpus("bible")
    assert len(bible) == 1189 and bible[0].title == "Genesis 1" and bible[-1].title == "Revelation 22"
    assert "In the beginning God created the heaven and the earth." in bible[0].text
    austen = load_corpus("austen")
    assert {d.title.split("/")[0] for d in austen} == {
        "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility",
    }  # fmt: skip
    pride = next(d for d in austen if d.title == "prideprejudice/01")
    assert "It is a truth universally acknowledged" in pride.text
    webster = load_corpus("webster")
    assert len(webster) > 900 and "Zythepsary" in webster[-1].title
    assert "[1913 Webster]" not in webster[10].text  # source markers are dropped
    cpython = load_corpus("cpython")
    titles = [d.title for d in cpython]
    assert titles == sorted(titles) and any(t.endswith("/os.py") for t in titles)
    assert not any("/test/" in t or "/encodings/" in t for t in titles)
    assert set(CORPORA) >= {"shakespeare", "bible", "austen", "webster", "cpython"}
