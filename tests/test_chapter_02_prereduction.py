"""Chapter 02 (pre-reduction) against the sample night's truth (needs the built book)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std

import config
from datared import reduction as red
from datared.frame import read_frame
from datared.io import night_collection
from tests.conftest import checksums


def raw_lights(night_dir):
    collection = night_collection(night_dir, ignored_subdirs=config.ignored_data_subdirs)
    return red.frames_of_type(collection, config.imagetyp_key, config.imagetyp["light"])


def master_dark_rate(book_work) -> np.ndarray:
    """Dark current (ADU/s) from the longest master dark the chapter wrote."""
    darks = sorted(book_work.glob("masterdark*.fits"))
    assert darks, "the chapter wrote no masterdark*.fits"
    best = max(darks, key=lambda p: fits.getval(p, config.exptime_key))
    master = red.read_master(best)
    return master.data.astype(np.float64) / float(master.header[config.exptime_key])


def true_hot_threshold(truth) -> float:
    """Lowest dark current of a true hot pixel (ADU/s), from the camera parameters if given."""
    camera = truth.params.get("camera", {})
    bounds = camera.get("hot_pixel_adu_per_s")
    return float(bounds[0]) if bounds else 1.0


def test_raw_data_byte_identical(book_run, book_work, night_dir):
    if book_run.raw_checksums_before is None:
        pytest.skip("DATARED_TEST_WORK_DIR reuses a work folder: no build to check")
    assert checksums(night_dir) == book_run.raw_checksums_before


def test_masters_written_as_float32(book_work):
    for name in ["masterbias.fits", *[p.name for p in book_work.glob("masterdark*.fits")],
                 *[p.name for p in book_work.glob("masterflat_*.fits")]]:
        with fits.open(book_work / name) as hdul:
            assert hdul[0].data.dtype.kind == "f" and hdul[0].data.dtype.itemsize == 4, name
    assert fits.getdata(book_work / "badpixels.fits").dtype == np.uint8
    for band in config.filters:
        flat = fits.getdata(book_work / f"masterflat_{band}.fits")
        assert abs(np.median(flat) - 1.0) < 1e-3


def test_every_raw_light_has_a_calibrated_counterpart(book_work, night_dir):
    lights = raw_lights(night_dir)
    assert lights
    missing = [p.name for p in lights if not (book_work / "LIGHT_PRERED" / p.name).exists()]
    assert not missing
    for path in lights[:: max(1, len(lights) // 5)]:
        raw_header = fits.getheader(path)
        with fits.open(book_work / "LIGHT_PRERED" / path.name) as hdul:
            assert hdul[0].data.dtype == np.dtype(">f4")
            assert hdul["MASK"].data.dtype == np.uint8
            header = hdul[0].header
        assert header["BUNIT"] == "adu"
        for key in (config.object_key, config.filter_key, config.exptime_key, config.date_key,
                    config.airmass_key, config.ra_key, config.dec_key, config.pierside_key):
            assert header[key] == raw_header[key], key


def test_master_flats_match_the_true_flats(book_work, truth):
    box = None
    for band in config.filters:
        true_flat = truth.image(f"flat_{band}.fits")
        master = red.read_master(book_work / f"masterflat_{band}.fits").data.astype(np.float64)
        box = box or red.central_box(true_flat.shape, fraction=0.8)
        ratio = master[box] / true_flat[box]
        rms = np.std(ratio / np.median(ratio) - 1)
        assert rms < 0.005, f"filter {band}: master/true flat RMS {rms:.4f}"


def test_master_dark_recovers_the_true_hot_pixels(book_work, truth):
    true_rate = truth.image("dark_current.fits")
    rate = master_dark_rate(book_work)
    true_hot = true_rate >= true_hot_threshold(truth)
    assert true_hot.sum() > 0
    flagged = (fits.getdata(book_work / "badpixels.fits") & red.BAD_HOT) > 0
    recovered = np.count_nonzero(flagged & true_hot) / np.count_nonzero(true_hot)
    assert recovered >= 0.99, f"only {recovered:.1%} of the true hot pixels flagged"
    relative = np.abs(rate[true_hot] / true_rate[true_hot] - 1)
    assert np.median(relative) < 0.05
    # Flagged pixels are really hot or warm: well above the typical dark current.
    genuine = true_rate[flagged] > 3 * np.median(true_rate)
    assert genuine.mean() > 0.95


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_calibrated_frames_equal_a_true_calibration(book_work, night_dir, truth, which):
    lights = raw_lights(night_dir)
    path = {"first": lights[0], "middle": lights[len(lights) // 2], "last": lights[-1]}[which]
    header = fits.getheader(path)
    raw = fits.getdata(path).astype(np.float64)
    ideal = ((raw - truth.image("bias.fits")
              - truth.image("dark_current.fits") * float(header[config.exptime_key]))
             / truth.image(f"flat_{str(header[config.filter_key]).strip()}.fits"))
    frame = read_frame(book_work / "LIGHT_PRERED" / path.name)
    ours, mask = frame.data.astype(np.float64), frame.bad_pixels()
    # Bright: stars well above the sky (100 robust standard deviations), not masked.
    sky, noise = np.median(ideal), mad_std(ideal[::2, ::2])
    bright = (ideal > sky + 100 * noise) & ~mask & (raw < config.saturation_adu)
    assert bright.sum() > 20, f"{path.name}: too few bright pixels to compare"
    relative = np.abs(ours[bright] / ideal[bright] - 1)
    worst = np.percentile(relative, 99)
    assert worst < 0.01, f"{path.name}: 99th percentile of the relative difference {worst:.4f}"
