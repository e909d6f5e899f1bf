"""The chapters' glue: myst-nb's when present, a stand-in on nodes without the book tools."""

import sys

import pytest

from lib.book import glue as G


def test_stand_in_keeps_values_when_myst_nb_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import now raises ImportError
    G.GLUED.clear()
    G.glue("answer", 42, display=False)
    assert G.GLUED == {"answer": 42}


def test_uses_myst_nb_when_installed(monkeypatch):
    pytest.importorskip("myst_nb")
    calls = []
    import myst_nb

    monkeypatch.setattr(myst_nb, "glue", lambda *a, **k: calls.append((a, k)))
    G.GLUED.clear()
    G.glue("x", 1, display=False)
    assert calls == [(("x", 1), {"display": False})] and G.GLUED == {}


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="glue name"):
        G.glue(name, 1)
