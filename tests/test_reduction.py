"""Unit tests of datared.reduction on small synthetic frames and a synthetic mini night."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import ccdproc
import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData

import config
from datared import errors
from datared import reduction as red
from datared.errors import FrameError, MissingInputError
from datared.frame import HeaderKeys
from datared.io import SkipLog, night_collection, unreadable_files

SHAPE = (48, 64)
HOT = [(5, 7), (30, 50), (40, 12)]  # true hot pixels (row, column)
DEAD = (20, 33)  # a pixel with 30 % response
BIAS_LEVEL = 500.0
DARK_RATE = 0.05  # ADU/s everywhere but the hot pixels
HOT_RATE = 20.0  # ADU/s
READ_NOISE_ADU = 3.0
GAIN = 1.5  # e-/ADU
BIG = 1e9  # a memory budget that never tiles


def true_flat(band: str) -> np.ndarray:
    """Smooth vignetting with a different tilt per filter and one dead pixel."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    tilt = {"g": 0.002, "r": -0.0015, "z": 0.001}[band]
    flat = 1.0 + tilt * (xx - SHAPE[1] / 2) - 0.00005 * ((yy - 24) ** 2)
    flat[DEAD] *= 0.3
    return flat / np.median(flat)


def true_bias() -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return BIAS_LEVEL + 0.2 * xx + 3.0 * np.sin(yy / 5.0)


def true_dark_rate() -> np.ndarray:
    rate = np.full(SHAPE, DARK_RATE)
    for pixel in HOT:
        rate[pixel] = HOT_RATE
    return rate


def write_raw(path: Path, data: np.ndarray, **header) -> Path:
    """Write a NINA-like raw frame (uint16, BZERO 32768)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu = fits.PrimaryHDU(np.clip(np.round(data), 0, 65535).astype(np.uint16))
    for key, value in header.items():
        hdu.header[key.replace("_", "-")] = value
    hdu.writeto(path, overwrite=True)
    return path


def make_night(root: Path, darks: bool = True, flat_bands=("g", "r"), light_bands=("g", "r"),
               seed: int = 1) -> Path:
    """A mini night: 7 biases, 7 darks (60 s), 7 flats per filter (2 s), 2 lights per filter."""
    rng = np.random.default_rng(seed)
    bias, rate = true_bias(), true_dark_rate()

    def noisy(signal):
        electrons = rng.poisson(np.clip(signal, 0, None) * GAIN) / GAIN
        return bias + electrons + rng.normal(0, READ_NOISE_ADU, SHAPE)

    common = {"XBINNING": 2, "YBINNING": 2, "GAIN": 100, "OFFSET": 30}
    for i in range(7):
        write_raw(root / "BIAS" / f"bias_{i:03d}.fits", noisy(np.zeros(SHAPE)),
                  IMAGETYP="BIAS", EXPTIME=0.0, FILTER="r", **common)
    if darks:
        for i in range(7):
            write_raw(root / "DARK" / f"dark_{i:03d}.fits", noisy(rate * 60.0),
                      IMAGETYP="DARK", EXPTIME=60.0, FILTER="r", **common)
    for band in flat_bands:
        for i in range(7):
            level = 20000.0 + 1000.0 * i  # twilight flats at changing levels
            write_raw(root / "FLAT" / f"flat_{band}_{i:03d}.fits",
                      noisy(level * true_flat(band) + rate * 2.0),
                      IMAGETYP="FLAT", EXPTIME=2.0, FILTER=band, **common)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    star = 30000.0 * np.exp(-((yy - 24) ** 2 + (xx - 30) ** 2) / (2 * 2.0**2))
    for band in light_bands:
        for i in range(2):
            sky = np.full(SHAPE, 300.0) + star
            write_raw(root / "LIGHT" / f"M37_{band}_{i:03d}.fits",
                      noisy(sky * true_flat(band) + rate * 30.0),
                      IMAGETYP="LIGHT", EXPTIME=30.0, FILTER=band, OBJECT="M37",
                      DATE_OBS=f"2024-02-15T20:0{i}:00", AIRMASS=1.1, RA=88.07, DEC=32.5,
                      PIERSIDE="West", **common)
    return root


def sha256s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def reduce_mini_night(night: Path, work: Path):
    """The chapter's sequence on a mini night; returns masters, tables and skip logs."""
    collection = night_collection(night, ignored_subdirs=config.ignored_data_subdirs)
    bias_files = red.frames_of_type(collection, "IMAGETYP", "BIAS")
    dark_files = red.frames_of_type(collection, "IMAGETYP", "DARK")
    light_files = red.frames_of_type(collection, "IMAGETYP", "LIGHT")
    master_bias, bias_log = red.build_master_bias(bias_files, scratch_dir=work / "scratch",
                                                  memory_budget=BIG)
    master_darks, dark_log = red.build_master_darks(dark_files, master_bias.data,
                                                    scratch_dir=work / "scratch",
                                                    memory_budget=BIG)
    calibration = red.Calibration(bias=master_bias.data,
                                  darks={t: d.data for t, d in master_darks.items()})
    flat_logs = {}
    for band in ("g", "r", "z"):
        flat_files = red.frames_of_type(collection, "IMAGETYP", "FLAT", FILTER=band)
        if not flat_files:
            continue
        master_flat, flat_logs[band] = red.build_master_flat(
            flat_files, calibration, scratch_dir=work / "scratch", memory_budget=BIG,
            saturation_adu=60000.0)
        if master_flat is not None:
            calibration.flats[band] = master_flat.data
    rate = None
    if master_darks:
        longest = max(master_darks)
        rate = master_darks[longest].data / longest
    calibration.bad_pixels = red.bad_pixel_mask(SHAPE, dark_rate=rate,
                                             master_flats=calibration.flats.values())
    table, light_log = red.calibrate_lights(light_files, calibration, work / "LIGHT_PRERED",
                                            saturation_adu=60000.0)
    return calibration, table, light_log, {"bias": bias_log, "dark": dark_log, **flat_logs}


# ---------------------------------------------------------------------------------------
# Combining
# ---------------------------------------------------------------------------------------

def write_stack(folder: Path, n: int = 5, outlier: float | None = 1e5) -> list[Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        data = (100.0 + rng.normal(0, 1.0, SHAPE)).astype(np.float32)
        if outlier is not None and i == 2:
            data[10, 10] = outlier  # a cosmic ray in one frame
        path = folder / f"frame_{i}.fits"
        fits.writeto(path, data, fits.Header({"BUNIT": "adu", "EXPTIME": 1.0}), overwrite=True)
        paths.append(path)
    return paths


def test_sigma_clipping_really_removes_an_outlier(tmp_path):
    paths = write_stack(tmp_path)
    combined = red.combine_files(paths, memory_budget=BIG)
    # The outlier adds 1e5/5 = 2e4 ADU to a plain average; clipped, the pixel is ~100.
    assert abs(combined.data[10, 10] - 100.0) < 3.0
    assert combined.data.dtype == np.float32
    # With five frames a standard-deviation clip cannot reject anything (the largest
    # possible deviation is (n-1)/sqrt(n) = 1.8 sigma): only the MAD-based deviation
    # function that combine_files passes makes the rejection happen. If that keyword were
    # misspelled, ccdproc would silently use its default and the pixel would stay high.
    default = ccdproc.combine([str(p) for p in paths], sigma_clip=True,
                              sigma_clip_low_thresh=5, sigma_clip_high_thresh=5, unit="adu")
    assert default.data[10, 10] > 1e4


def test_combine_tiles_give_the_same_result(tmp_path, monkeypatch):
    paths = write_stack(tmp_path, n=6)
    whole = red.combine_files(paths, memory_budget=BIG)
    tiles = []
    original = ccdproc.combiner.Combiner

    class CountingCombiner(original):
        def __init__(self, *args, **kwargs):
            tiles.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ccdproc.combiner, "Combiner", CountingCombiner)
    # Leave 20 kB for the stack of tiles: ccdproc must split the frames into strips.
    monkeypatch.setattr(red, "combine_mem_limit", lambda *args, **kwargs: 20_000.0)
    tiled = red.combine_files(paths, memory_budget=BIG, engine="ccdproc")
    assert len(tiles) > 4
    np.testing.assert_allclose(tiled.data, whole.data, rtol=1e-6)
    strips = red.combine_files(paths, memory_budget=BIG)  # the book's engine, in strips too
    np.testing.assert_array_equal(strips.data, whole.data)


@pytest.mark.parametrize("method", ["average", "median"])
def test_the_books_combine_equals_ccdproc(tmp_path, method):
    rng = np.random.default_rng(5)
    paths = []
    for i in range(7):
        data = (500.0 + rng.normal(0, 3.0, SHAPE)).astype(np.float32)
        hits = rng.random(SHAPE) < 0.02
        data[hits] += rng.uniform(50, 5000, hits.sum())  # cosmic rays of every size
        if i == 0:
            data[:, 3] += 40.0  # a column that is off in one frame only
        paths.append(tmp_path / f"f{i}.fits")
        fits.writeto(paths[-1], data, fits.Header({"BUNIT": "adu"}))
    ours = red.combine_files(paths, memory_budget=BIG, method=method)
    theirs = red.combine_files(paths, memory_budget=BIG, method=method, engine="ccdproc")
    np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6, atol=1e-4)
    assert ours.meta["NCOMBINE"] == theirs.meta["NCOMBINE"] == 7
    with pytest.raises(ValueError, match="engine must be one of"):
        red.combine_files(paths, memory_budget=BIG, engine="numpy")


def test_combine_mem_limit_leaves_room_for_the_process():
    shape = (3194, 4788)
    roomy = red.combine_mem_limit(shape, memory_budget=2e9, in_use=0.3e9)
    crowded = red.combine_mem_limit(shape, memory_budget=2e9, in_use=1.0e9)
    assert 0 < crowded < roomy < 2e9 - 0.3e9
    assert roomy - crowded == pytest.approx(0.8 * 0.7e9)
    with pytest.raises(MemoryError, match="combine_memory_budget"):
        red.combine_mem_limit(shape, memory_budget=1e9, in_use=0.8e9)


# ---------------------------------------------------------------------------------------
# Sections, darks, flats, bad pixels, noise
# ---------------------------------------------------------------------------------------

def test_overscan_and_trim(tmp_path):
    data = np.full((20, 30), 1000.0)
    data[:, :25] += 50.0  # light-sensitive part; columns 26-30 are overscan
    data += np.arange(20)[:, None] * 2.0  # a bias level varying with the row
    path = write_raw(tmp_path / "raw.fits", data, IMAGETYP="LIGHT", EXPTIME=1.0)
    ccd = red.read_raw(path, overscan_section="[26:30, 1:20]", trim_section="[1:25, 1:20]")
    assert ccd.data.shape == (20, 25)
    assert ccd.data.dtype == np.float32
    np.testing.assert_allclose(ccd.data, 50.0, atol=0.6)


def test_choose_dark_matches_or_scales_the_longest():
    assert red.choose_dark([10.0, 60.0, 300.0], 60.0) == (60.0, False)
    assert red.choose_dark([10.0, 300.0], 120.0) == (300.0, True)
    assert red.choose_dark([], 120.0) == (None, False)


def test_master_dark_names():
    assert red.master_dark_name(300.0, n_exptimes=1) == "masterdark.fits"
    assert red.master_dark_name(300.0, n_exptimes=2) == "masterdark_300s.fits"
    assert red.master_dark_name(0.5, n_exptimes=3) == "masterdark_0.5s.fits"


def test_calibration_offset_scales_the_dark():
    bias = np.full(SHAPE, 100.0, dtype=np.float32)
    dark = np.full(SHAPE, 30.0, dtype=np.float32)  # 300 s of dark
    cal = red.Calibration(bias=bias, darks={300.0: dark})
    np.testing.assert_allclose(cal.offset(300.0), 130.0)
    np.testing.assert_allclose(cal.offset(60.0), 106.0)
    assert "scaled" in cal.dark_note(60.0)
    assert "no dark" in red.Calibration(bias=bias).dark_note(60.0)


def test_flat_level_problem():
    frame = CCDData(np.full(SHAPE, 55000.0, dtype=np.float32), unit="adu")
    assert "saturation" in red.flat_level_problem(frame, saturation_adu=60000.0)
    frame.data[:] = 300.0
    assert "too faint" in red.flat_level_problem(frame, saturation_adu=60000.0)
    frame.data[:] = 25000.0
    assert red.flat_level_problem(frame, saturation_adu=60000.0) is None


def test_bad_pixel_mask_finds_hot_and_dead_pixels():
    rng = np.random.default_rng(5)
    rate = true_dark_rate() + rng.normal(0, 0.01, SHAPE)
    flat = true_flat("g") * (1 + rng.normal(0, 0.005, SHAPE))
    flat[3, 3] = 1.6  # over-responsive
    mask = red.bad_pixel_mask(SHAPE, dark_rate=rate, master_flats=[flat])
    assert mask.dtype == np.uint8
    assert {tuple(p) for p in np.argwhere(mask & red.BAD_HOT)} == set(HOT)
    assert {tuple(p) for p in np.argwhere(mask & red.BAD_LOW_RESPONSE)} == {DEAD}
    assert {tuple(p) for p in np.argwhere(mask & red.BAD_HIGH_RESPONSE)} == {(3, 3)}
    counts = red.count_bad_pixels(mask)
    assert counts["pixels"][list(counts["reason"]).index("any")] == 5


def test_large_scale_follows_a_gradient():
    yy, xx = np.mgrid[:128, :160]
    image = 1.0 + 0.001 * xx + 0.002 * yy
    image[50, 50] = 10.0
    smooth = red.large_scale(image, box=16)
    assert smooth.shape == image.shape
    assert np.max(np.abs(smooth - (1.0 + 0.001 * xx + 0.002 * yy))[16:-16, 16:-16]) < 0.01


def test_noise_equation():
    sigma = red.noise_equation_adu(np.array([0.0, 10000.0, -50.0]), gain_e_per_adu=GAIN,
                                   read_noise_e=4.5)
    np.testing.assert_allclose(sigma, [3.0, np.sqrt(10000 * GAIN + 4.5**2) / GAIN, 3.0],
                               rtol=1e-6)


def test_cosmic_ray_cleaning_keeps_adu():
    rng = np.random.default_rng(7)
    data = (500.0 + rng.normal(0, np.sqrt(500 / GAIN), (64, 64))).astype(np.float32)
    data[30, 30] += 5000.0  # a one-pixel cosmic-ray hit
    ccd = CCDData(data, unit="adu", mask=np.zeros(data.shape, bool))
    cleaned = red.clean_cosmic_rays(ccd, gain_e_per_adu=GAIN, read_noise_e=READ_NOISE_ADU * GAIN,
                                    saturation_adu=60000.0)
    assert cleaned.mask[30, 30]
    assert abs(cleaned.data[30, 30] - 500.0) < 100.0
    assert abs(np.median(cleaned.data) - 500.0) < 5.0  # still ADU, not electrons
    assert cleaned.data.dtype == np.float32


# ---------------------------------------------------------------------------------------
# Science frames and whole mini nights
# ---------------------------------------------------------------------------------------

def test_calibrate_frame_equals_the_ccdproc_recipe(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    rng = np.random.default_rng(2)
    bias = (true_bias() + rng.normal(0, 0.5, SHAPE)).astype(np.float32)
    dark = (true_dark_rate() * 60.0).astype(np.float32)
    flat = true_flat("g").astype(np.float32)
    cal = red.Calibration(bias=bias, darks={60.0: dark}, flats={"g": flat})
    light = sorted((night / "LIGHT").glob("*.fits"))[0]
    ours = red.calibrate_frame(light, cal, saturation_adu=60000.0)

    raw = CCDData.read(light, unit="adu")
    step = ccdproc.subtract_bias(raw, CCDData(bias, unit="adu"))
    step = ccdproc.subtract_dark(step, CCDData(dark, unit="adu", meta={"EXPTIME": 60.0}),
                                 exposure_time="EXPTIME", exposure_unit=u.s, scale=True)
    step = ccdproc.flat_correct(step, CCDData(flat, unit="adu"), norm_value=1.0)
    np.testing.assert_allclose(ours.data, step.data, rtol=1e-5, atol=1e-3)
    assert ours.header["OBJECT"] == "M37" and ours.header["BUNIT"] == "adu"
    assert "scaled 60 s -> 30 s" in str(ours.header["HISTORY"])


def test_mini_night_against_its_truth(tmp_path):
    night = make_night(tmp_path / "night")
    before = sha256s(night)
    cal, table, light_log, logs = reduce_mini_night(night, tmp_path / "work")
    assert sha256s(night) == before  # raw data untouched
    assert len(light_log) == 0 and len(table) == 4
    assert not (tmp_path / "work" / "scratch").exists()

    # A clipped average of 7 biases has about 1/sqrt(7) of one frame's read noise.
    assert np.std(cal.bias - true_bias()) < 1.3 * READ_NOISE_ADU / np.sqrt(7)
    assert abs(np.mean(cal.bias - true_bias())) < 0.2
    box = red.central_box(SHAPE)
    for band in ("g", "r"):
        ratio = cal.flats[band][box] / true_flat(band)[box]
        assert np.std(ratio / np.median(ratio) - 1) < 0.005
    dark_rate = cal.darks[60.0] / 60.0
    assert {tuple(p) for p in np.argwhere(red.hot_pixels(dark_rate))} == set(HOT)

    out = tmp_path / "work" / "LIGHT_PRERED" / "M37_r_000.fits"
    with fits.open(out) as hdul:
        assert hdul[0].data.dtype == np.dtype(">f4")
        assert hdul["MASK"].data.dtype == np.uint8
        header = hdul[0].header
        for key in ("OBJECT", "FILTER", "EXPTIME", "DATE-OBS", "AIRMASS", "RA", "DEC",
                    "PIERSIDE", "GAIN"):
            assert key in header
        assert header["BUNIT"] == "adu"
        assert "BZERO" not in header
        calibrated = hdul[0].data.astype(float)
        mask = hdul["MASK"].data.astype(bool)
    assert mask[DEAD] and all(mask[p] for p in HOT)
    raw = fits.getdata(night / "LIGHT" / "M37_r_000.fits").astype(float)
    ideal = (raw - true_bias() - true_dark_rate() * 30.0) / true_flat("r")
    bright = (ideal > 5000) & ~mask
    assert bright.sum() > 5
    np.testing.assert_allclose(calibrated[bright], ideal[bright], rtol=0.01)
    reread = CCDData.read(out)  # other software reads the primary image and the mask
    assert reread.unit == u.adu and reread.mask is not None

    # A rerun overwrites the same files and gives the same result.
    reduce_mini_night(night, tmp_path / "work")
    np.testing.assert_array_equal(fits.getdata(out), calibrated.astype(np.float32))


def test_night_without_darks_still_runs(tmp_path):
    night = make_night(tmp_path / "night", darks=False)
    cal, table, light_log, logs = reduce_mini_night(night, tmp_path / "work")
    assert cal.darks == {}
    assert len(table) == 4 and len(light_log) == 0
    assert all("no dark" in note for note in table["dark"])
    header = fits.getheader(tmp_path / "work" / "LIGHT_PRERED" / "M37_g_000.fits")
    assert "no dark subtracted" in str(header["HISTORY"])


def test_lights_without_flats_are_listed_not_dropped(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g", "r"))
    (night / "LIGHT" / "broken.fits").write_bytes(b"this is not a FITS file")
    cal, table, light_log, logs = reduce_mini_night(night, tmp_path / "work")
    assert sorted(table["file"]) == ["M37_g_000.fits", "M37_g_001.fits"]
    skipped = dict(light_log.skipped)
    assert set(skipped) == {"M37_r_000.fits", "M37_r_001.fits"}
    assert all("no master flat for filter 'r'" in reason for reason in skipped.values())
    assert not (tmp_path / "work" / "LIGHT_PRERED" / "M37_r_000.fits").exists()
    summary = red.summary_table({"light": 4}, frames_done={"light": len(table)},
                                skip_logs={"light": light_log})
    assert list(summary["skipped"]) == [2] and "no master flat" in summary["why skipped"][0]
    assert 'missing_flat = "unflattened"' in skipped["M37_r_000.fits"]  # the fix is named


def test_lights_without_flats_can_be_calibrated_unflattened(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g", "r"))
    cal, table, light_log, _ = reduce_mini_night(night, tmp_path / "work")
    work = tmp_path / "work" / "LIGHT_PRERED"
    table, light_log = red.calibrate_lights(sorted((night / "LIGHT").glob("*.fits")), cal, work,
                                            saturation_adu=60000.0, missing_flat="unflattened")
    assert len(table) == 4 and len(light_log) == 0
    flagged = dict(zip(table["file"], table["flat_fielded"], strict=True))
    assert flagged == {"M37_g_000.fits": True, "M37_g_001.fits": True,
                       "M37_r_000.fits": False, "M37_r_001.fits": False}
    raw = fits.getdata(night / "LIGHT" / "M37_r_000.fits").astype(np.float32)
    header = fits.getheader(work / "M37_r_000.fits")
    assert header["FLATFLD"] is False and "NOT flat-fielded" in str(header["HISTORY"])
    expected = raw - cal.offset(header["EXPTIME"])  # bias and dark only
    np.testing.assert_allclose(fits.getdata(work / "M37_r_000.fits"), expected, rtol=1e-6)
    assert fits.getheader(work / "M37_g_000.fits")["FLATFLD"] is True
    with pytest.raises(ValueError, match="missing_flat = 'maybe'"):
        red.calibrate_lights([], cal, work, missing_flat="maybe")


def test_unreadable_frames_are_skipped_with_a_reason(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    bad = night / "LIGHT" / "M37_g_000.fits"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated download
    cal = red.Calibration(bias=true_bias().astype(np.float32),
                          flats={"g": true_flat("g").astype(np.float32)})
    table, log = red.calibrate_lights(sorted((night / "LIGHT").glob("*.fits")), cal,
                                      tmp_path / "out")
    assert list(table["file"]) == ["M37_g_001.fits"]
    assert [name for name, _ in log.skipped] == ["M37_g_000.fits"]
    # The reason says what is wrong in the user's terms, and what to do.
    reason = log.skipped[0][1]
    assert "the file is truncated" in reason and "of the" in reason and "pixels" in reason
    assert "Copy the file again" in reason and "reshape" not in reason


def test_two_workers_write_the_same_files_and_table(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    lights = sorted((night / "LIGHT").glob("*.fits"))
    bad = night / "LIGHT" / "M37_g_000.fits"
    bad.write_bytes(bad.read_bytes()[:5000])
    cal = red.Calibration(bias=true_bias().astype(np.float32),
                          flats={"g": true_flat("g").astype(np.float32)})
    one, log_one = red.calibrate_lights(lights, cal, tmp_path / "one", workers=1)
    two, log_two = red.calibrate_lights(lights, cal, tmp_path / "two", workers=2)
    assert list(one["file"]) == list(two["file"]) and len(one) >= 1
    assert log_one.skipped == log_two.skipped and len(log_one.skipped) == 1
    for name in one["file"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_overexposed_flats_are_skipped(tmp_path):
    paths = [write_raw(tmp_path / f"flat_{i}.fits", np.full(SHAPE, level), IMAGETYP="FLAT",
                       EXPTIME=1.0, FILTER="g")
             for i, level in enumerate([20000.0, 21000.0, 62000.0])]
    cal = red.Calibration(bias=np.zeros(SHAPE, np.float32))
    master, log = red.build_master_flat(paths, cal, scratch_dir=tmp_path / "scratch",
                                        memory_budget=BIG, saturation_adu=60000.0)
    assert [name for name, _ in log.skipped] == ["flat_2.fits"]
    assert master is not None and abs(np.median(master.data) - 1.0) < 1e-6


def test_frames_of_type_returns_existing_absolute_paths(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g", "r"))
    collection = night_collection(night, ignored_subdirs=config.ignored_data_subdirs)
    flats = red.frames_of_type(collection, "IMAGETYP", "FLAT", FILTER="r")
    assert len(flats) == 7 and all(p.is_absolute() and p.exists() for p in flats)
    assert red.frames_of_type(collection, "IMAGETYP", "DARKFLAT") == []


def test_skiplog_summary_table():
    log = SkipLog("bias")
    log.skip("a.fits", "cannot be used", quiet=True)
    table = red.summary_table({"bias": 3}, frames_done={"bias": 2}, skip_logs={"bias": log})
    assert tuple(table[0]) == ("bias", 3, 2, 1, "cannot be used")


def test_unreadable_files_are_reported(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    (night / "LIGHT" / "broken.fits").write_bytes(b"this is not a FITS file")
    collection = night_collection(night, ignored_subdirs=config.ignored_data_subdirs)
    assert [p.name for p in unreadable_files(collection)] == ["broken.fits"]
    assert len(red.frames_of_type(collection, "IMAGETYP", "LIGHT")) == 2


def test_write_master_darks_names_by_exposure_and_removes_stale_files(tmp_path):
    (tmp_path / "masterdark.fits").write_bytes(b"stale")
    darks = {t: CCDData(np.full(SHAPE, t * 0.1, dtype=np.float32), unit="adu",
                        meta={"NCOMBINE": 3}) for t in (300.0, 60.0)}
    paths = red.write_master_darks(darks, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("masterdark*.fits")) == [
        "masterdark_300s.fits", "masterdark_60s.fits"]
    assert fits.getval(paths[0], "EXPTIME") == 300.0
    assert fits.getdata(paths[1]).dtype == np.dtype(">f4")


# ---------------------------------------------------------------------------------------
# Header keywords, frame errors and reading the masters back
# ---------------------------------------------------------------------------------------

def test_frame_errors_are_the_projects_and_exclude_bugs():
    assert red.FRAME_ERRORS is errors.FRAME_ERRORS
    assert not hasattr(red, "DEFAULT_KEYS")  # one set of default keywords: frame.NINA_KEYS
    for bug in (KeyError("EXPTIME"), TypeError("None * 2")):
        assert not isinstance(bug, red.FRAME_ERRORS)


def strip_keyword(path: Path, key: str) -> Path:
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header[key]
    return path


def test_a_light_without_a_keyword_raises_frame_error_naming_the_file(tmp_path):
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    lights = sorted((night / "LIGHT").glob("*.fits"))
    strip_keyword(lights[0], "FILTER")
    strip_keyword(lights[1], "EXPTIME")
    cal = red.Calibration(bias=true_bias().astype(np.float32),
                          flats={"g": true_flat("g").astype(np.float32)})
    with pytest.raises(FrameError, match=f"{lights[0].name}.*FILTER.*filter_key"):
        red.calibrate_frame(lights[0], cal)
    with pytest.raises(FrameError, match=f"{lights[1].name}.*EXPTIME.*exptime_key"):
        red.calibrate_frame(lights[1], cal)
    table, log = red.calibrate_lights(lights, cal, tmp_path / "out")
    assert len(table) == 0
    reasons = dict(log.skipped)
    assert "FILTER" in reasons[lights[0].name] and "EXPTIME" in reasons[lights[1].name]


def test_keywords_come_from_header_keys(tmp_path):
    """A night whose software writes EXPOSURE and FILT instead of NINA's names."""
    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    keys = HeaderKeys(exptime="EXPOSURE", filter="FILT")
    for path in sorted(night.rglob("*.fits")):
        with fits.open(path, mode="update") as hdul:
            header = hdul[0].header
            header["EXPOSURE"] = header.pop("EXPTIME")
            header["FILT"] = header.pop("FILTER")
    darks = sorted((night / "DARK").glob("*.fits"))
    stats = red.frame_statistics(darks[:2], keys=keys, progress=False)
    assert list(stats["exptime_s"]) == [60.0, 60.0]
    assert np.all(np.isnan(red.frame_statistics(darks[:1], progress=False)["exptime_s"]))
    bias = np.full(SHAPE, BIAS_LEVEL, np.float32)
    masters, log = red.build_master_darks(darks, bias, scratch_dir=tmp_path / "scratch",
                                          memory_budget=BIG, keys=keys)
    assert list(masters) == [60.0] and len(log) == 0
    assert masters[60.0].header["EXPOSURE"] == 60.0
    # With NINA's names the same darks have no exposure time: skipped, each one named.
    masters, log = red.build_master_darks(darks, bias, scratch_dir=tmp_path / "scratch",
                                          memory_budget=BIG)
    assert masters == {} and [name for name, _ in log.skipped] == [p.name for p in darks]
    assert all("EXPTIME" in reason for _, reason in log.skipped)
    cal = red.Calibration(bias=true_bias().astype(np.float32), darks={60.0: masters_rate()},
                          flats={"g": true_flat("g").astype(np.float32)})
    light = sorted((night / "LIGHT").glob("*.fits"))[0]
    ccd = red.calibrate_frame(light, cal, keys=keys)
    assert "scaled 60 s -> 30 s" in str(ccd.header["HISTORY"])
    table, _ = red.calibrate_lights([light], cal, tmp_path / "out", keys=keys)
    assert list(table["filter"]) == ["g"] and list(table["exptime_s"]) == [30.0]
    paths = red.write_master_darks({60.0: CCDData(masters_rate(), unit="adu")}, tmp_path,
                                   keys=keys)
    assert fits.getval(paths[0], "EXPOSURE") == 60.0


def masters_rate() -> np.ndarray:
    return (true_dark_rate() * 60.0).astype(np.float32)


def test_calibration_terms_from_the_work_folder(tmp_path):
    with pytest.raises(MissingInputError, match="02-pre-reduction"):
        red.load_calibration_terms(tmp_path, "r", 60.0)
    fits.PrimaryHDU(np.full((4, 4), 1000.0, np.float32)).writeto(tmp_path / "masterbias.fits")
    with pytest.raises(MissingInputError, match="masterflat_r.fits"):
        red.load_calibration_terms(tmp_path, "r", 60.0)
    fits.PrimaryHDU(np.full((4, 4), 1.1, np.float32)).writeto(tmp_path / "masterflat_r.fits")
    terms = red.load_calibration_terms(tmp_path, "r", 60.0)
    assert isinstance(terms, red.CalibrationTerms)
    assert terms.dark == 0.0 and "no master dark" in terms.note
    assert np.all(terms.bias == 1000.0) and np.all(terms.flat == pytest.approx(1.1))
    assert terms.bias.dtype == np.float64 and terms.flat.dtype == np.float64
    fits.PrimaryHDU(np.full((4, 4), 30.0, np.float32),
                    fits.Header({"EXPTIME": 120.0})).writeto(tmp_path / "masterdark.fits")
    terms = red.load_calibration_terms(tmp_path, "r", 60.0)
    assert np.all(terms.dark == pytest.approx(15.0))  # scaled 120 s -> 60 s
    assert "masterdark.fits" in terms.note


def test_calibration_terms_match_or_scale_the_darks_as_chapter_02(tmp_path):
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(tmp_path / "masterbias.fits")
    fits.PrimaryHDU(np.ones((4, 4), np.float32)).writeto(tmp_path / "masterflat_g.fits")
    darks = {t: CCDData(np.full((4, 4), t * 0.1, np.float32), unit="adu") for t in (300.0, 60.0)}
    red.write_master_darks(darks, tmp_path, keys=HeaderKeys(exptime="EXPOSURE"))
    # The exposure time is read from the keyword named, else from the file name.
    for keys in (HeaderKeys(exptime="EXPOSURE"), HeaderKeys()):
        same = red.load_calibration_terms(tmp_path, "g", 60.0, keys=keys)
        assert np.all(same.dark == pytest.approx(6.0)) and "masterdark_60s.fits" in same.note
        scaled = red.load_calibration_terms(tmp_path, "g", 150.0, keys=keys)
        assert np.all(scaled.dark == pytest.approx(15.0)) and "masterdark_300s.fits x 0.5" in scaled.note
    (tmp_path / "masterdark_300s.fits").rename(tmp_path / "masterdark_long.fits")
    with pytest.raises(FrameError, match="masterdark_long.fits"):
        red.load_calibration_terms(tmp_path, "g", 150.0)


def test_calibration_terms_read_the_masters_with_read_master(tmp_path, monkeypatch):
    """One reader of master frames: bias, flat and the chosen dark all go through read_master."""
    fits.PrimaryHDU(np.full((4, 4), 1000.0, np.float32)).writeto(tmp_path / "masterbias.fits")
    fits.PrimaryHDU(np.full((4, 4), 1.1, np.float32)).writeto(tmp_path / "masterflat_r.fits")
    red.write_master_darks({120.0: CCDData(np.full((4, 4), 30.0, np.float32), unit="adu")},
                           tmp_path)
    read = []
    original = red.read_master
    monkeypatch.setattr(red, "read_master", lambda path: read.append(Path(path).name)
                        or original(path))
    terms = red.load_calibration_terms(tmp_path, "r", 60.0)
    assert sorted(read) == ["masterbias.fits", "masterdark.fits", "masterflat_r.fits"]
    assert np.all(terms.dark == pytest.approx(15.0))


# Settings (thresholds, gains, keywords, budgets) are keyword-only past the data arguments,
# so that a call reads like the settings it uses and a swapped pair cannot pass silently.
KEYWORD_ONLY = {
    "read_raw": ["overscan_section", "trim_section"],
    "central_box": ["fraction"],
    "robust_level_noise": ["step"],
    "frame_statistics": ["keys", "step"],
    "combine_mem_limit": ["memory_budget", "dtype", "in_use", "safety"],
    "combine_files": ["memory_budget", "method"],
    "stage_frames": ["scratch_dir", "skip_log", "check"],
    "master_dark_name": ["n_exptimes"],
    "exposure_time_of": ["keys"],
    "group_by_exptime": ["keys", "decimals"],
    "choose_dark": ["tolerance"],
    "flat_level_problem": ["saturation_adu", "max_fraction", "min_level_adu", "step"],
    "normalise_by_median": ["step"],
    "normalise_master_flat": ["step"],
    "large_scale": ["box"],
    "hot_pixels": ["nsigma"],
    "flat_response_outliers": ["low", "high", "box"],
    "bad_pixel_mask": ["dark_rate", "master_flats", "hot_nsigma"],
    "noise_equation_adu": ["gain_e_per_adu", "read_noise_e"],
    "clean_cosmic_rays": ["gain_e_per_adu", "read_noise_e", "saturation_adu", "sigclip"],
    "calibrate_frame": ["keys", "saturation_adu", "gain_e_per_adu"],
    "write_master": ["header", "history"],
    "summary_table": ["frames_done", "skip_logs"],
    "build_master_bias": ["scratch_dir", "memory_budget"],
    "build_master_darks": ["scratch_dir", "memory_budget", "keys"],
    "build_master_flat": ["scratch_dir", "memory_budget", "saturation_adu", "keys"],
    "calibrate_lights": ["keys", "saturation_adu", "gain_e_per_adu", "read_noise_e"],
    "write_master_darks": ["keys"],
    "load_calibration_terms": ["keys"],
}


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_settings_are_keyword_only(name):
    parameters = inspect.signature(getattr(red, name)).parameters
    for argument in KEYWORD_ONLY[name]:
        assert parameters[argument].kind is inspect.Parameter.KEYWORD_ONLY, (name, argument)


def test_cosmic_ray_settings_cannot_be_passed_in_order():
    ccd = CCDData(np.full((8, 8), 100.0, np.float32), unit="adu", mask=np.zeros((8, 8), bool))
    with pytest.raises(TypeError):
        red.clean_cosmic_rays(ccd, GAIN, 4.5, 60000.0)


def test_a_compressed_light_is_calibrated_under_a_fits_name(tmp_path):
    """A gzip-compressed raw frame keeps its stem; the calibrated copy is `.fits` (not lost)."""
    import gzip
    import shutil

    night = make_night(tmp_path / "night", flat_bands=("g",), light_bands=("g",))
    light = sorted((night / "LIGHT").glob("*.fits"))[0]
    packed = light.with_name(light.name + ".gz")
    with light.open("rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    light.unlink()
    cal = red.Calibration(bias=true_bias().astype(np.float32),
                          flats={"g": true_flat("g").astype(np.float32)})
    table, log = red.calibrate_lights([packed], cal, tmp_path / "out")
    assert len(log) == 0
    assert list(table["file"]) == [light.name] and list(table["raw"]) == [packed.name]
    assert fits.getdata(tmp_path / "out" / light.name).shape == true_bias().shape


def test_check_saturation_level_finds_a_clip_below_the_setting():
    from datared.reduction import check_saturation_level

    peaks, at_peak = [65535, 65535, 41200], [120, 37, 1]
    ok, text = check_saturation_level(peaks, at_peak, 60000)
    assert ok and "2 of 3 frames clip at 65535 ADU" in text
    ok, text = check_saturation_level([50000, 50000], [80, 12], 60000)  # clips at 50000
    assert not ok and "Set saturation_adu below 50000" in text and "e.g. 45000" in text
    ok, text = check_saturation_level([41000, 52000], [1, 2], 60000)  # never clipped
    assert ok and "not tested" in text


def test_calibrated_frames_record_the_raw_peak(tmp_path):
    from datared import reduction as red

    raw = np.full((20, 30), 1000, np.uint16)
    raw[5, 5:12] = 65535  # a clipped star core: 7 pixels at the converter's limit
    header = fits.Header({"IMAGETYP": "LIGHT", "FILTER": "r", "EXPTIME": 10.0})
    fits.writeto(tmp_path / "light.fits", raw, header)
    calibration = red.Calibration(bias=np.zeros((20, 30), np.float32),
                                  flats={"r": np.ones((20, 30), np.float32)})
    ccd = red.calibrate_frame(tmp_path / "light.fits", calibration, saturation_adu=60000)
    assert ccd.header["RAWPEAK"] == 65535 and ccd.header["RAWNPEAK"] == 7
    assert ccd.mask.sum() == 7


def test_stand_in_bias_from_one_dark_exposure_and_from_a_pedestal(tmp_path):
    night = make_night(tmp_path / "night")
    darks = sorted((night / "DARK").glob("*.fits"))
    lights = sorted((night / "LIGHT").glob("*.fits"))
    kwargs = {"scratch_dir": tmp_path / "scratch", "memory_budget": BIG}
    # One dark exposure (60 s): that master dark is the stand-in (bias plus 60 s of dark).
    stand_in, note = red.stand_in_bias(darks, lights, **kwargs)
    assert stand_in.header["BIASSRC"] == "dark-60s" and stand_in.header["NCOMBINE"] == 0
    assert "master dark of 60 s" in note
    expected = true_bias() + true_dark_rate() * 60.0
    assert abs(np.median(stand_in.data - expected)) < 0.5
    # Neither darks nor an overscan: a constant pedestal from the science frames, a warning.
    pedestal, note = red.stand_in_bias([], lights, **kwargs)
    assert pedestal.header["BIASSRC"] == "pedestal" and note.startswith("Warning")
    assert np.ptp(pedestal.data) == 0
    assert np.median(true_bias()) < pedestal.data[0, 0] < np.median(true_bias()) + 300
    # An overscan removes the level already: the stand-in is zero.
    zero, note = red.stand_in_bias(darks, lights, overscan_section="[1:4, :]", **kwargs)
    assert zero.header["BIASSRC"] == "overscan" and not zero.data.any()
    with pytest.raises(MissingInputError, match="no dark or science frame can be read"):
        red.stand_in_bias([], [tmp_path / "missing.fits"], **kwargs)
