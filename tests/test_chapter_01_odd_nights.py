"""Chapter 01 on odd nights: no darks, no bias and no flats, a science frame without a date.

Each night is a hard-link copy of part of the sample night (the sample night itself is never
written: folders and files are deleted in the copy only, and a changed header goes into a new
file that replaces the link). Notebook 01 runs headless on it and must complete, saying what is
missing, what chapter 02 will do about it, and which frame it left out and why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from astropy.io import fits

from tests.building import execute_printed

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01-data.ipynb"
N_LIGHTS = 10  # science frames kept in each odd night, to keep the chapter short


def odd_night(night_dir: Path, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """Hard-link copy of ``night_dir`` with only the first LIGHT frames and without ``drop``."""
    subprocess.run(["cp", "-al", str(night_dir), str(dest)], check=True)
    for folder in drop:
        subprocess.run(["rm", "-r", str(dest / folder)], check=True)
    for path in sorted((dest / "LIGHT").glob("*.fits"))[N_LIGHTS:]:
        path.unlink()  # removes the link in the copy only
    return dest


def without_keyword(path: Path, keyword: str) -> None:
    """Replace the hard link ``path`` by a new file whose header lacks ``keyword``."""
    with fits.open(path) as hdul:  # read only: the file is shared with the sample night
        data = hdul[0].data.copy()
        header = hdul[0].header.copy()
    del header[keyword]
    path.unlink()
    fits.writeto(path, data, header)


def run_chapter_01(data_dir: Path, tmp_path: Path, notebook: Path = NOTEBOOK) -> str:
    """Execute notebook 01 on ``data_dir``; return its printed output (fails on an error)."""
    return execute_printed(notebook, tmp_path / "executed",
                           {"DATARED_DATA_DIR": str(data_dir),
                            "DATARED_WORK_DIR": str(tmp_path / "work")},
                           max_width=90, hidden=(data_dir, tmp_path))


def flat(text: str) -> str:
    """The output with line breaks turned into spaces (notes are wrapped)."""
    return " ".join(text.split())


def test_night_without_darks(night_dir, tmp_path):
    night = odd_night(night_dir, tmp_path / "night", drop=("DARK",))
    text = flat(run_chapter_01(night, tmp_path))
    assert "dark DARK 0" in text
    assert "No dark frames: chapter 02 skips the dark step. The dark current is not subtracted" \
        in text
    assert "No readable dark frame in this night: section 4.2 is skipped." in text
    assert "bias frame:" in text and "flat frame:" in text  # the other types are still shown
    assert f"{N_LIGHTS} science frames from" in text


def test_night_without_bias_and_flats(night_dir, tmp_path):
    night = odd_night(night_dir, tmp_path / "night", drop=("BIAS", "FLAT"))
    text = flat(run_chapter_01(night, tmp_path))
    assert "bias BIAS 0" in text and "flat FLAT 0" in text
    assert "No bias frames: chapter 02 makes a stand-in master bias" in text
    assert "No flat frames: chapter 02 has no master flat in any filter. It calibrates" in text
    assert "No readable bias frame in this night: section 4.1 is skipped." in text
    assert "No readable flat frame in this night: section 4.3 is skipped." in text
    assert "the measurement is skipped" in text  # no bias pair for the read noise
    assert "dark frame:" in text


def test_science_frame_without_date(night_dir, tmp_path):
    night = odd_night(night_dir, tmp_path / "night")
    undated = sorted((night / "LIGHT").glob("*.fits"))[1]
    without_keyword(undated, "DATE-OBS")
    assert "DATE-OBS" in fits.getheader(night_dir / "LIGHT" / undated.name), \
        "the sample night itself was changed"
    out = run_chapter_01(night, tmp_path)
    text = flat(out)
    assert (f"Skipped {undated.name}: the header has no DATE-OBS keyword (date); add it, or set "
            "date_key in config.py") in text
    assert out.count(undated.name) >= 1 and f"{undated.name}: {undated.name}" not in text
    assert f"{N_LIGHTS - 1} science frames from" in text
    assert "1 science frame(s) left out of the time span" in text
    assert "frames left out by this chapter: 1" in text
    assert "Every frame type is present" in text



def test_night_without_flats_in_one_filter(night_dir, tmp_path):
    night = odd_night(night_dir, tmp_path / "night")
    bands = {fits.getval(path, "FILTER") for path in (night / "LIGHT").glob("*.fits")}
    band = sorted(bands)[-1]  # a filter of the science frames kept
    for path in (night / "FLAT").glob("*.fits"):
        if fits.getval(path, "FILTER") == band:
            path.unlink()
    text = flat(run_chapter_01(night, tmp_path))
    assert (f"No flats in filter {band}: chapter 02 calibrates the science frames of filter "
            f"{band} without a flat and flags them (FLATFLD = F; config.missing_flat)") in text
    assert "Every frame type is present" not in text and "flat frame:" in text
    # Chapter 02 on the same night: those frames are calibrated, flagged and listed.
    out = flat(execute_printed(REPO / "notebooks" / "02-pre-reduction.ipynb",
                               tmp_path / "executed",
                               {"DATARED_DATA_DIR": str(night),
                                "DATARED_WORK_DIR": str(tmp_path / "work")},
                               max_width=100, hidden=(night, tmp_path)))
    unflat = [p.name for p in (night / "LIGHT").glob("*.fits")
              if fits.getval(p, "FILTER") == band]
    assert f"filter {band}: science frames but no master flat; they are calibrated" in out
    assert f"Note: {len(unflat)} frame(s) in filter(s) {band} have no master flat" in out
    assert f"{N_LIGHTS} frames calibrated, 0 skipped" in out
    for name in unflat:
        header = fits.getheader(tmp_path / "work" / "LIGHT_PRERED" / name)
        assert header["FLATFLD"] is False and "NOT flat-fielded" in str(header["HISTORY"])


def test_night_without_bias_gets_a_stand_in_from_the_darks(night_dir, tmp_path):
    # Chapters 01 and 02 on a night without bias frames: the darks (60 s and 180 s) give the
    # bias as their intercept, which must match the master bias of the real bias frames.
    night = odd_night(night_dir, tmp_path / "night", drop=("BIAS",))
    text = flat(run_chapter_01(night, tmp_path))
    assert "bias BIAS 0" in text and "No bias frames: chapter 02 makes a stand-in" in text
    out = flat(execute_printed(REPO / "notebooks" / "02-pre-reduction.ipynb",
                               tmp_path / "executed",
                               {"DATARED_DATA_DIR": str(night),
                                "DATARED_WORK_DIR": str(tmp_path / "work")},
                               max_width=100, hidden=(night, tmp_path)))
    assert "No readable bias frame" in out and "nothing to combine" in out
    assert "the bias of each pixel is the intercept of its master darks" in out
    assert f"{N_LIGHTS} frames calibrated, 0 skipped" in out
    stand_in = fits.getdata(tmp_path / "work" / "masterbias.fits").astype(float)
    assert fits.getheader(tmp_path / "work" / "masterbias.fits")["BIASSRC"] == "darks-intercept"
    real = np.median([fits.getdata(p).astype(float)
                      for p in sorted((night_dir / "BIAS").glob("*.fits"))[:9]], axis=0)
    difference = stand_in - real
    # The level to a small fraction of the read noise (about 4 ADU); per pixel, the noise of
    # an intercept of averaged darks.
    assert abs(np.median(difference)) < 0.5, f"level off by {np.median(difference):.2f} ADU"
    assert np.std(difference) < 5.0


def test_night_of_only_science_frames_is_calibrated_with_a_pedestal(night_dir, tmp_path):
    # No bias, dark or flat frames: chapter 02 measures a pedestal, warns, and calibrates
    # every science frame without a flat, flagged.
    night = odd_night(night_dir, tmp_path / "night", drop=("BIAS", "DARK", "FLAT"))
    run_chapter_01(night, tmp_path)
    out = flat(execute_printed(REPO / "notebooks" / "02-pre-reduction.ipynb",
                               tmp_path / "executed",
                               {"DATARED_DATA_DIR": str(night),
                                "DATARED_WORK_DIR": str(tmp_path / "work")},
                               max_width=100, hidden=(night, tmp_path)))
    assert "Warning: no bias, dark or overscan. A constant pedestal of" in out
    assert f"{N_LIGHTS} frames calibrated, 0 skipped" in out
    assert f"Note: {N_LIGHTS} frame(s) in filter(s)" in out
    assert fits.getheader(tmp_path / "work" / "masterbias.fits")["BIASSRC"] == "pedestal"
    for path in (tmp_path / "work" / "LIGHT_PRERED").glob("*.fits"):
        assert fits.getheader(path)["FLATFLD"] is False
