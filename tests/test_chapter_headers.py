"""Chapters 01-04 on nights whose headers follow other software's conventions (issue 12).

Each night is a hard-link copy of part of the sample night (the sample night itself is never
written: files are deleted in the copy only, and a changed header goes into a new file that
replaces the link). The conventions are set by a settings file (DATARED_CONFIG) alone:

- the date in DATE-OBS and the local time with its UTC offset in TIME-OBS (``time_key``);
- OBJECT spelled in other ways (target ``aliases``, case, spaces, '-', '_', a filter name);
- no image-type keyword (``imagetyp_key = object_key``);
- the flats' filter in FILTNAME (``header_overrides``) and the binning in CCDSUM
  (``binning_key``);
- image types in other words and cases (``Bias Frame``, ``Light Frame`` and ``light`` in
  one night: ``imagetyp`` values matched ignoring case, a list for the lights).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time, TimeDelta

from tests.building import execute_printed

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"01": "01-data.ipynb", "02": "02-pre-reduction.ipynb",
             "03": "03-astrometry.ipynb", "04": "04-photometry.ipynb"}
M37 = {"kind": "cluster", "ra_deg": 88.074, "dec_deg": 32.545}
WASP = {"kind": "transit", "ra_deg": 160.6025, "dec_deg": 7.4350}


def subset_night(night_dir: Path, dest: Path, *, lights: dict[tuple[str, str], int],
                 flat_filters: tuple[str, ...] = ("g", "r", "i"), n_bias: int | None = None,
                 n_dark: int | None = None) -> Path:
    """Hard-link copy of ``night_dir`` with the first ``lights[(object, filter)]`` science
    frames of each group, the flats of ``flat_filters`` and the first bias and dark frames."""
    subprocess.run(["cp", "-al", str(night_dir), str(dest)], check=True)
    kept: dict[tuple[str, str], int] = {}
    for path in sorted((dest / "LIGHT").glob("*.fits")):
        header = fits.getheader(path)
        group = (header["OBJECT"], header["FILTER"])
        kept[group] = kept.get(group, 0) + 1
        if kept[group] > lights.get(group, 0):
            path.unlink()  # removes the link in the copy only
    for path in (dest / "FLAT").glob("*.fits"):
        if fits.getval(path, "FILTER") not in flat_filters:
            path.unlink()
    for folder, number in (("BIAS", n_bias), ("DARK", n_dark)):
        if number is not None:
            for path in sorted((dest / folder).glob("*.fits"))[number:]:
                path.unlink()
    return dest


def rewrite(path: Path, edit) -> None:
    """Replace the hard link ``path`` by a new file whose header ``edit(header)`` changed."""
    with fits.open(path) as hdul:  # read only: the file is shared with the sample night
        data = hdul[0].data.copy()
        header = hdul[0].header.copy()
    edit(header)
    path.unlink()
    fits.writeto(path, data, header)


def local_date_and_time(header, hours: float) -> tuple[str, str]:
    """DATE-OBS split into a local date and a local time with its UTC offset (``+02:00``)."""
    local = Time(header["DATE-OBS"], scale="utc") + TimeDelta(hours * 3600.0, format="sec")
    sign = "+" if hours >= 0 else "-"
    offset = f"{sign}{int(abs(hours)):02d}:{int(round(abs(hours) % 1 * 60)):02d}"
    return local.isot[:10], local.isot[11:] + offset


def settings_file(folder: Path, text: str, targets: dict[str, dict]) -> Path:
    """A settings file with ``text`` and the ``targets`` tables."""
    lines = [text.strip(), ""]
    for name, entry in targets.items():
        lines.append(f"[targets.{name}]")
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datared.toml"
    path.write_text("\n".join(lines))
    return path


def run_chapter(label: str, data_dir: Path, work: Path, config_file: Path) -> str:
    """Execute one chapter on ``data_dir``; return its printed output (fails on an error)."""
    return execute_printed(REPO / "notebooks" / NOTEBOOKS[label],
                           work.parent / f"executed-{label}-{config_file.parent.name}",
                           {"DATARED_DATA_DIR": str(data_dir), "DATARED_WORK_DIR": str(work),
                            "DATARED_CONFIG": str(config_file)},
                           max_width=100, hidden=(data_dir, work))


def flat(text: str) -> str:
    """The output with line breaks turned into spaces (notes are wrapped)."""
    return " ".join(text.split())


def test_chapter_01_separate_time_keyword_utc_offset_and_object_spellings(night_dir, tmp_path):
    night = subset_night(night_dir, tmp_path / "night",
                         lights={("M37", "g"): 2, ("M37", "r"): 2, ("WASP-104", "r"): 4})
    spellings = ["M 37", "ngc2099_g", "M37-r", "m37", "WASP104", "wasp_104", "M38", "Wasp-104"]
    paths = sorted((night / "LIGHT").glob("*.fits"))
    assert len(paths) == len(spellings)
    starts = [Time(fits.getval(path, "DATE-OBS"), scale="utc") for path in paths]
    for path, spelling in zip(paths, spellings, strict=True):
        def edit(header, spelling=spelling):
            header["DATE-OBS"], header["TIME-OBS"] = local_date_and_time(header, 2.0)
            header["OBJECT"] = spelling
        rewrite(path, edit)
    assert fits.getval(night_dir / "LIGHT" / paths[0].name, "OBJECT") == "M37", \
        "the sample night itself was changed"
    targets = {"M37": {**M37, "filters": ["g", "r", "i"], "aliases": ["NGC 2099"]},
               "WASP-104": {**WASP, "filters": ["r"]}}

    with_time = settings_file(tmp_path / "with-time", 'time_key = "TIME-OBS"', targets)
    text = flat(run_chapter("01", night, tmp_path / "work", with_time))
    first, last = min(starts).isot, max(starts).isot
    assert f"{len(paths)} science frames from {first} to {last} UTC" in text  # UTC, not local
    assert "time_key TIME-OBS" in text  # the header table shows the setting in use
    assert ("OBJECT = 'M38' (1 science frame(s)) matches no target of config.targets: add it "
            'to the "aliases" of its target') in text
    for spelling in spellings[:-2] + spellings[-1:]:
        assert f"OBJECT = '{spelling}'" not in text, spelling

    without_time = settings_file(tmp_path / "without-time", "", targets)
    text = flat(run_chapter("01", night, tmp_path / "work", without_time))
    date_only = fits.getval(paths[0], "DATE-OBS")
    assert (f"Skipped {paths[0].name}: DATE-OBS = '{date_only}' holds only a date, no time of "
            "day; set time_key in config.py") in text
    assert "No science frame with a usable date: the figure of the night is skipped." in text
    assert "00:00:00" not in text


def test_chapter_01_without_an_image_type_keyword(night_dir, tmp_path):
    night = subset_night(night_dir, tmp_path / "night", lights={("M37", "r"): 3},
                         flat_filters=("r",), n_bias=3, n_dark=2)
    for folder, value in (("BIAS", "bias"), ("DARK", "dark"), ("FLAT", "flat"), ("LIGHT", None)):
        for path in (night / folder).glob("*.fits"):
            def edit(header, value=value):
                del header["IMAGETYP"]
                if value:
                    header["OBJECT"] = value
            rewrite(path, edit)
    config_file = settings_file(tmp_path / "settings", '''
imagetyp_key = "OBJECT"

[imagetyp]
bias = "bias"
dark = "dark"
flat = "flat"
light = "M37"
''', {"M37": {**M37, "filters": ["r"]}})
    text = flat(run_chapter("01", night, tmp_path / "work", config_file))
    for kind, number in (("bias", 3), ("dark", 2), ("flat", 7), ("light", 3)):
        value = "M37" if kind == "light" else kind
        assert f"{kind} {value} {number}" in text, kind
    assert "Every frame type is present, with flats in every filter" in text
    assert "3 science frames from" in text


def test_chapters_02_to_04_with_type_overrides_ccdsum_times_and_aliases(night_dir, tmp_path):
    night = subset_night(night_dir, tmp_path / "night",
                         lights={("M37", "r"): 3, ("WASP-104", "r"): 4}, flat_filters=("r",),
                         n_bias=5)

    def flat_edit(header):  # this software names the flats' filter FILTNAME
        header["FILTNAME"] = header.pop("FILTER")

    for path in (night / "FLAT").glob("*.fits"):
        rewrite(path, flat_edit)

    def bias_edit(header):  # MaxIm DL's value, matched to the setting whatever its case
        header["IMAGETYP"] = "Bias Frame"

    for path in (night / "BIAS").glob("*.fits"):
        rewrite(path, bias_edit)
    truth = {}
    spellings = {"M37": ["M 37 r", "NGC2099", "m37_R"],
                 "WASP-104": ["WASP 104", "wasp-104", "WASP_104r", "WASP104"]}
    for path in sorted((night / "LIGHT").glob("*.fits")):
        header = fits.getheader(path)
        target = header["OBJECT"]
        spelling = spellings[target].pop(0)
        truth[path.stem] = (target, spelling, header["DATE-OBS"])

        image_type = "Light Frame" if len(truth) % 2 else "light"

        def edit(header, spelling=spelling, image_type=image_type):
            header["DATE-OBS"], header["TIME-OBS"] = local_date_and_time(header, -7.0)
            header["OBJECT"] = spelling
            header["CCDSUM"] = f"{header.pop('XBINNING')} {header.pop('YBINNING')}"
            header["IMAGETYP"] = image_type  # two values for one type: a list in the settings
        rewrite(path, edit)
    config_file = settings_file(tmp_path / "settings", '''
time_key = "TIME-OBS"
binning_key = "CCDSUM"

[imagetyp]
bias = "BIAS FRAME"
light = ["LIGHT", "Light Frame"]

[header_overrides.flat]
filter_key = "FILTNAME"
''', {"M37": {**M37, "filters": ["r"], "aliases": ["NGC 2099"]},
      "WASP-104": {**WASP, "filters": ["r"]}})
    work = tmp_path / "work"
    text = flat(run_chapter("01", night, work, config_file))
    assert "binning of this frame: 2 x 2" in text
    assert "flat frames: filter_key = 'FILTNAME' (config.header_overrides)" in text
    assert "matches no target" not in text

    text = flat(run_chapter("02", night, work, config_file))
    assert "filter r: 7 flats combined" in text
    assert f"{len(truth)} frames calibrated, 0 skipped" in text

    text = flat(run_chapter("03", night, work, config_file))
    solved = sorted((work / "ASTROMETRY").glob("*.fits"))
    assert len(solved) == len(truth), text[-2000:]
    assert {fits.getval(path, "OBJECT") for path in solved} == \
        {spelling for _, spelling, _ in truth.values()}  # headers are kept as written
    # grouped by the targets' names (only the example frame's header is shown as written)
    assert "NGC2099" not in text and "WASP_104r" not in text and "m37_R" not in text

    run_chapter("04", night, work, config_file)
    catalogues = [path for path in (work / "PHOTOMETRY").glob("*.fits")
                  if not path.name.startswith("ref_catalog")]
    assert len(catalogues) == len(truth)
    for path in catalogues:
        meta = Table.read(path).meta
        target, spelling, date_obs = truth[path.stem]
        assert (meta["OBJECT"], meta["HDROBJ"]) == (target, spelling)
        assert abs((Time(meta["DATE-OBS"]) - Time(date_obs)).sec) < 1e-3, path.name


@pytest.fixture(autouse=True)
def _no_settings_file_of_the_developer(monkeypatch):
    """The chapters read only the settings file each test writes."""
    monkeypatch.delenv("DATARED_CONFIG", raising=False)
