"""Chapter 03 (astrometry) against the sample night's true WCS.

Uses the work folder of a full book build (``book_work``) and the truth (``truth``); set
DATARED_TEST_WORK_DIR to an executed work folder to skip the build while developing.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

import config
from datared import catalogs, wcsfit
from datared import solve as slv
from datared.frame import HeaderKeys


def _wcs(header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _truth_wcs(truth, name: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return truth.wcs(name)


@pytest.fixture(scope="module")
def solved(book_work, truth):
    """Per solved frame: (name, pierside, grid errors in pixels)."""
    out = book_work / "ASTROMETRY"
    rows = []
    for path in sorted(out.glob("*.fits")):
        header = fits.getheader(path)
        shape = (header["NAXIS2"], header["NAXIS1"])
        err = wcsfit.grid_errors(_wcs(header), _truth_wcs(truth, path.name), shape, n=20)
        rows.append((path.name, str(header.get("PIERSIDE", "")).strip(), err))
    return rows


def test_at_least_95_percent_of_frames_solve(book_work, solved):
    prered = sorted(p.name for p in (book_work / "LIGHT_PRERED").glob("*.fits"))
    assert prered, "no calibrated frames in the book's work folder"
    assert len(solved) >= 0.95 * len(prered)
    summary = Table.read(book_work / "ASTROMETRY" / "summary.ecsv")
    assert set(summary["frame"]) == set(prered)  # every frame listed, solved or not
    assert {"n_matched", "rms_px", "rms_arcsec", "sip_degree", "backend", "success"} <= set(summary.colnames)
    assert summary["success"].sum() == len(solved)


def test_wcs_accuracy_against_the_truth(solved):
    rms = np.array([np.sqrt(np.mean(err**2)) for _, _, err in solved])
    worst = np.array([err.max() for _, _, err in solved])
    assert np.median(rms) <= 0.05, f"median grid RMS {np.median(rms):.4f} px"
    assert np.percentile(worst, 95) <= 0.2, f"95th percentile worst {np.percentile(worst, 95):.4f} px"


def test_frames_after_the_meridian_flip_solve(solved):
    sides = {side for _, side, _ in solved}
    assert len(sides) == 2, f"expected frames from both pier sides, got {sides}"
    for side in sides:
        rms = [np.sqrt(np.mean(err**2)) for _, s, err in solved if s == side]
        assert np.median(rms) <= 0.05


def test_outputs_keep_header_mask_and_float32(book_work):
    out = book_work / "ASTROMETRY"
    path = sorted(out.glob("*.fits"))[0]
    with fits.open(path) as hdul, fits.open(book_work / "LIGHT_PRERED" / path.name) as src:
        assert hdul[0].data.dtype.kind == "f" and hdul[0].data.dtype.itemsize == 4
        for key in ("OBJECT", "FILTER", "EXPTIME", "DATE-OBS", "PIERSIDE"):
            assert hdul[0].header[key] == src[0].header[key]
        assert hdul[0].header["CTYPE1"].startswith("RA---TAN")
        assert "MASK" in src and "MASK" in hdul, f"{path.name}: the bad-pixel mask is lost"
        assert np.array_equal(hdul["MASK"].data, src["MASK"].data)
        assert np.array_equal(hdul[0].data, src[0].data.astype(np.float32))
    assert any((book_work / "figures" / "astrometry").glob("*.png"))


def _one_frame(book_work, pierside: str | None = None):
    for path in sorted((book_work / "LIGHT_PRERED").glob("*.fits")):
        with fits.open(path) as hdul:
            header = hdul[0].header.copy()
            if pierside and str(header.get("PIERSIDE", "")).strip() != pierside:
                continue
            data = np.asarray(hdul[0].data, float)
            mask = np.asarray(hdul["MASK"].data) != 0 if "MASK" in hdul else None
        return path.name, data, mask, header
    pytest.skip(f"no calibrated frame with PIERSIDE {pierside}")


def _solve(data, mask, header):
    target = config.targets[str(header["OBJECT"]).strip()]
    cat = catalogs.load_gaia(target["ra_deg"], target["dec_deg"], 0.33, source="sample",
                             data_dir=config.data_dir)
    settings = slv.SolverSettings(scale_arcsec=config.pixel_scale_arcsec,
                                  keys=HeaderKeys.from_settings(config),
                                  gain_e_per_adu=config.gain_e_per_adu)
    return slv.solve_python(data, header, cat, settings=settings, mask=mask,
                            saturation_adu=0.9 * config.saturation_adu - float(np.nanmedian(data)))


def test_mirrored_copy_solves(book_work, truth):
    name, data, mask, header = _one_frame(book_work, "East")
    ny, nx = data.shape
    sol = _solve(data[:, ::-1], None if mask is None else mask[:, ::-1], header)
    assert sol.success, sol.reason
    # Pixel (x', y) of the mirrored copy is pixel (nx - 1 - x', y) of the original.
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 20), np.linspace(0, ny - 1, 20))
    sky = sol.wcs.pixel_to_world(gx.ravel(), gy.ravel())
    tx, ty = _truth_wcs(truth, name).world_to_pixel(sky)
    err = np.hypot(tx - (nx - 1 - gx.ravel()), ty - gy.ravel())
    assert np.sqrt(np.mean(err**2)) <= 0.05  # the per-frame targets hold for the copy too
    assert err.max() <= 0.2
    assert np.linalg.det(sol.wcs.pixel_scale_matrix) > 0  # the other parity


def test_pure_noise_fails_cleanly(book_work):
    _, data, _, header = _one_frame(book_work)
    rng = np.random.default_rng(1)
    noise = rng.normal(np.nanmedian(data), 20.0, data.shape)
    sol = _solve(noise, None, header)
    assert not sol.success
    assert sol.wcs is None
    assert sol.reason


def test_manifests_list_exactly_the_frames_of_this_run(book_work):
    """Chapter 02's manifest names every calibrated frame; chapter 03's every solved one."""
    from datared.io import read_manifest

    prered = book_work / "LIGHT_PRERED"
    calibrated = read_manifest(prered, chapter="02-pre-reduction")
    assert sorted(calibrated) == sorted(prered.glob("*.fits"))
    solved = read_manifest(book_work / "ASTROMETRY", chapter="03-astrometry")
    summary = Table.read(book_work / "ASTROMETRY" / "summary.ecsv")
    assert sorted(p.name for p in solved) == sorted(summary["frame"][summary["success"]])
    assert sorted(solved) == sorted((book_work / "ASTROMETRY").glob("*.fits"))
