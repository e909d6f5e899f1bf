"""The book's one table style."""

import pandas as pd

from lib.book.tables import COMPACT, compact


def test_compact_styles_and_captions_a_table():
    html = compact(pd.DataFrame({"a": [1.5]}).style, "A caption").to_html()
    assert "A caption" in html and "tabular-nums" in html
    assert "caption" not in compact(pd.DataFrame({"a": [1]}).style).to_html().split("<table")[1].split(">")[0]
    assert any(rule["selector"] == "td" for rule in COMPACT)
