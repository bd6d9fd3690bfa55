from __future__ import annotations

from pathlib import Path

import pytest

from bonecluster.data.readers import (DataError, detect_kind, parse_abnormal, read_records,
                                      read_sources)
from bonecluster.data.records import SkipLog, normalise_body_part
from tests.conftest import make_mura_tree, write_png


def test_mura_tree_walk_reads_labels_from_folder_names(tmp_path):
    make_mura_tree(tmp_path)
    assert detect_kind(tmp_path) == "mura"
    recs = read_records(tmp_path)
    assert len(recs) == 8
    assert {r.body_part for r in recs} == {"WRIST", "HAND"}
    assert sum(r.abnormal for r in recs) == 4
    assert all(r.split == "train" for r in recs)
    wrist_pos = [r for r in recs if r.body_part == "WRIST" and r.abnormal]
    assert {r.study for r in wrist_pos} == {"WRIST/patient00000/study1"}
    assert {r.patient for r in recs} == {"patient00000", "patient00001"}


def test_mura_csvs_are_used_when_present_and_override_folder_labels(tmp_path):
    root = tmp_path / "MURA-v1.1"
    paths = make_mura_tree(root)
    rels = [p.relative_to(tmp_path).as_posix() for p in paths]
    (root / "train_image_paths.csv").write_text("\n".join(rels[:6]) + "\nMURA-v1.1/train/XR_HAND/gone.png\n")
    studies = sorted({r.rsplit("/", 1)[0] + "/" for r in rels})
    # deliberately flip one study's label to prove the CSV wins over the folder name
    flipped = studies[0]
    lines = [f"{s},{0 if s == flipped and 'positive' in s else int('positive' in s)}" for s in studies]
    (root / "train_labeled_studies.csv").write_text("\n".join(lines) + "\n")
    skips = SkipLog()
    assert detect_kind(root) == "mura-csv"
    recs = read_records(root, skips)
    assert len(recs) == 6
    assert len(skips) == 1 and "gone.png" in skips.items[0].path and "missing" in skips.items[0].reason
    by_study = {r.study: r.abnormal for r in recs}
    flipped_study = "/".join(flipped.split("/")[2:5]).replace("XR_", "").replace("_positive", "").replace("_negative", "")
    assert flipped_study in by_study
    assert by_study[flipped_study] is ("positive" not in flipped)


def test_manifest_relative_paths_and_empty_cells(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "b.png")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,body_part,abnormal\nimgs/a.png,wrist,1\nimgs/b.png,,\n")
    assert detect_kind(csv_path) == "manifest"
    recs = read_records(csv_path)
    assert [Path(r.path).name for r in recs] == ["a.png", "b.png"]
    assert recs[0].body_part == "WRIST" and recs[0].abnormal is True
    assert recs[1].body_part is None and recs[1].abnormal is None
    assert Path(recs[0].path).is_absolute() or Path(recs[0].path).exists()


def test_manifest_optional_columns(tmp_path):
    write_png(tmp_path / "a.png")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,body_part,abnormal,patient,study,split\na.png,HAND,0,p1,s1,valid\n")
    (rec,) = read_records(csv_path)
    assert (rec.patient, rec.study, rec.split, rec.abnormal) == ("p1", "s1", "valid", False)


def test_manifest_without_required_columns_is_fatal(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match="abnormal"):
        read_records(csv_path)


def test_plain_folder_recursive_unlabelled(tmp_path):
    write_png(tmp_path / "x" / "1.png")
    write_png(tmp_path / "x" / "y" / "2.PNG")
    (tmp_path / "notes.txt").write_text("hello")
    assert detect_kind(tmp_path) == "folder"
    recs = read_records(tmp_path)
    assert len(recs) == 2
    assert all(r.body_part is None and r.abnormal is None for r in recs)
    assert {r.study for r in recs} == {"x", "x/y"}


def test_plain_folder_finds_extensionless_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from tests.unit.dicom_utils import write_dicom

    write_dicom(tmp_path / "series" / "IM0001", patient="P7", body_part="WRIST")
    (rec,) = read_records(tmp_path)
    assert rec.patient == "P7" and rec.body_part == "WRIST"


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope")


def test_read_sources_deduplicates(tmp_path):
    write_png(tmp_path / "a.png")
    recs = read_sources([tmp_path, tmp_path / "a.png"])
    assert len(recs) == 1


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("", None), ("True", True),
                                            ("negative", False), (None, None)])
def test_parse_abnormal(value, expected):
    assert parse_abnormal(value) is expected


def test_parse_abnormal_rejects_junk():
    with pytest.raises(ValueError):
        parse_abnormal("maybe")


def test_normalise_body_part():
    assert normalise_body_part("XR_WRIST") == "WRIST"
    assert normalise_body_part(" hand ") == "HAND"
    assert normalise_body_part("") is None
    with pytest.raises(ValueError, match="unknown body part"):
        normalise_body_part("KNEE")
