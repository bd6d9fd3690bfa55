"""Bad input at the reader level: each is skipped with one warning naming the file, and counted."""

from __future__ import annotations

import logging

import pytest

from bonecluster.data import SkipLog, read_records
from bonecluster.data.readers import ReaderLimits
from tests.conftest import write_png


def _manifest(tmp_path, body: str):
    write_png(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("path,body_part,abnormal\nok.png,WRIST,0\n" + body)
    return p


def test_file_listed_in_csv_but_missing(tmp_path, caplog):
    skips = SkipLog()
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        recs = read_records(_manifest(tmp_path, "gone.png,HAND,1\n"), skips)
    assert len(recs) == 1 and len(skips) == 1
    assert skips.items[0].path.endswith("gone.png") and "m.csv:3 but missing" in skips.items[0].reason
    assert "gone.png" in caplog.text and caplog.text.count("skipped") == 1


@pytest.mark.parametrize("row,why", [
    ("a.png,HAND\n", "2 fields, header has 3"),
    ("ok.png,KNEE,1\n", "unknown body part"),
    ("ok.png,HAND,maybe\n", "abnormal must be"),
    (",HAND,1\n", "empty path"),
    ('"ok.png,HAND,1\n', "fields"),
])
def test_malformed_csv_row(tmp_path, row, why):
    skips = SkipLog()
    recs = read_records(_manifest(tmp_path, row), skips)
    assert len(recs) == 1 and len(skips) == 1
    assert skips.items[0].path.endswith("m.csv:3")
    assert "malformed row" in skips.items[0].reason and why in skips.items[0].reason


def test_oversize_csv_row_is_skipped_and_reading_goes_on(tmp_path):
    skips = SkipLog()
    p = _manifest(tmp_path, "x" * 5000 + ",HAND,1\nok.png,HAND,1\n")
    recs = read_records(p, skips, ReaderLimits(max_csv_row_chars=1000))
    assert len(recs) == 2 and len(skips) == 1 and "longer than 1000" in skips.items[0].reason
