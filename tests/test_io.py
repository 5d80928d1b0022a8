"""datared.io: finding frames in sub-folders, prerequisites and the skip log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from datared import io as dio
from datared.io import (
    MissingInputError,
    SkipLog,
    find_fits,
    night_collection,
    require,
    unreadable_files,
)


def _frame(path: Path, imagetyp: str, filt: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = fits.Header({"IMAGETYP": imagetyp, "FILTER": filt, "EXPTIME": 1.0})
    fits.writeto(path, np.zeros((4, 4), dtype=np.uint16), header)


@pytest.fixture
def night(tmp_path) -> Path:
    root = tmp_path / "night"
    _frame(root / "BIAS" / "b1.fits", "BIAS")
    _frame(root / "BIAS" / "b2.fits", "BIAS")
    _frame(root / "FLAT" / "r" / "f1.fits", "FLAT", "r")
    _frame(root / "LIGHT" / "l1.fit", "LIGHT", "r")
    _frame(root / "truth" / "bias.fits", "TRUTH")
    (root / "LIGHT" / "broken.fits").write_bytes(b"not a FITS file")
    (root / "notes.txt").write_text("observing log")
    return root


def test_find_fits_skips_truth_and_non_fits(night):
    names = [p.relative_to(night).as_posix() for p in find_fits(night)]
    assert names == ["BIAS/b1.fits", "BIAS/b2.fits", "FLAT/r/f1.fits", "LIGHT/broken.fits", "LIGHT/l1.fit"]


def test_night_collection_names_real_files_in_sub_folders(night):
    collection = night_collection(night, ignored_subdirs=("truth",))
    flats = collection.files_filtered(imagetyp="FLAT", filter="r", include_path=True)
    assert [Path(p) for p in flats] == [night / "FLAT" / "r" / "f1.fits"]
    biases = collection.files_filtered(imagetyp="BIAS", include_path=True)
    assert len(biases) == 2 and all(Path(p).exists() for p in biases)
    assert unreadable_files(collection) == [night / "LIGHT" / "broken.fits"]


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(MissingInputError, match="DATARED_DATA_DIR"):
        find_fits(tmp_path / "nowhere")


def test_require_names_the_chapter(tmp_path):
    with pytest.raises(MissingInputError, match="02-pre-reduction"):
        require(tmp_path / "masterbias.fits", chapter="02-pre-reduction")
    (tmp_path / "masterbias.fits").write_text("x")
    assert require(tmp_path / "masterbias.fits", chapter="02-pre-reduction").exists()


def test_skip_log_lists_reasons(capsys):
    log = SkipLog("calibration")
    log.skip("/data/LIGHT/a.fits", "no flat in filter z")
    assert "a.fits: no flat in filter z" in capsys.readouterr().out
    table = log.table()
    assert len(log) == 1 and list(table["file"]) == ["a.fits"]


def test_skip_log_names_the_file_once_and_wraps(capsys):
    log = SkipLog("night in time", width=60)
    reason = ("the header has no DATE-OBS keyword (date); add it, or set date_key in config.py "
              "to the keyword your software writes")
    log.skip("/data/LIGHT/a.fits", f"a.fits: {reason}")
    out = capsys.readouterr().out
    assert out.count("a.fits") == 1 and out.startswith("Skipped a.fits: the header has no")
    assert max(len(line) for line in out.splitlines()) <= 60
    assert list(log.table()["reason"]) == [reason]


def test_output_name_drops_every_fits_suffix():
    assert dio.output_name("night/LIGHT/a.fits.gz") == "a.fits"
    assert dio.output_name("b.fit") == "b.fits"
    assert dio.output_name("c.FITS") == "c.fits"
    assert dio.output_name("d.fts") == "d.fits"


def test_manifest_lists_this_run_and_removes_stale_outputs(tmp_path):
    folder = tmp_path / "ASTROMETRY"
    folder.mkdir()
    for name in ("a.fits", "b.fits", "old.fits"):
        (folder / name).write_bytes(b"x")
    (folder / "summary.ecsv").write_text("kept: not a FITS output\n")
    removed = dio.write_manifest(folder, [folder / "b.fits", "a.fits"], chapter="03-astrometry",
                                 sources=["raw_b.fits.gz", "raw_a.fits"])
    assert [p.name for p in removed] == ["old.fits"]
    assert not (folder / "old.fits").exists() and (folder / "summary.ecsv").exists()
    assert [p.name for p in dio.read_manifest(folder, chapter="03-astrometry")] == [
        "b.fits", "a.fits"]
    table = Table.read(folder / dio.MANIFEST_NAME)
    assert list(table["source"]) == ["raw_b.fits.gz", "raw_a.fits"]
    assert table.meta["chapter"] == "03-astrometry"
    # A rerun that writes nothing leaves an empty list and no stale frame.
    assert len(dio.write_manifest(folder, [], chapter="03-astrometry")) == 2
    assert dio.read_manifest(folder, chapter="03-astrometry") == []


def test_read_manifest_names_the_chapter_to_rerun(tmp_path):
    with pytest.raises(MissingInputError, match="run notebooks/02-pre-reduction.ipynb again"):
        dio.read_manifest(tmp_path, chapter="02-pre-reduction")
    (tmp_path / "a.fits").write_bytes(b"x")
    dio.write_manifest(tmp_path, ["a.fits"], chapter="02-pre-reduction")
    (tmp_path / "a.fits").unlink()
    with pytest.raises(MissingInputError, match="a.fits"):
        dio.read_manifest(tmp_path, chapter="02-pre-reduction")


def test_manifest_refuses_two_outputs_of_one_name(tmp_path):
    with pytest.raises(ValueError, match="rename one"):
        dio.write_manifest(tmp_path, ["x/a.fits", "y/a.fits"], chapter="02-pre-reduction")
