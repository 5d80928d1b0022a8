"""Chapter 06 (light curve) against the sample night's truth.

Uses what notebooks/06-lightcurve.ipynb wrote into the book's work folder
(``LIGHTCURVE/<object>_lightcurve.ecsv``, ``_comparison_stars.ecsv``, ``_transit_fit.json``,
``_AAVSO.txt``) and the truth of the night (``truth/lightcurves.ecsv``, ``truth/params.json``,
``truth/stars.ecsv``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

import config
from datared.io import read_manifest

TRANSIT_TARGETS = [name for name, info in config.targets.items()
                   if info.get("kind") == "transit"]
CURVE_COLUMNS = ("file", "bjd_tdb", "flux", "flux_err", "flux_detrended", "model", "airmass",
                 "fwhm_arcsec", "sky_adu", "pierside")
FIT_KEYS = ("t0_bjd_tdb", "t0_err_d", "rp_rs", "rp_rs_err", "a_rs", "a_rs_err", "b", "b_err",
            "depth_ppt", "t14_h", "residual_rms_ppt", "expected_rms_ppt", "beta",
            "aperture_arcsec", "o_minus_c_min", "comparison_stars")


@pytest.fixture(scope="module")
def lc_dir(book_work):
    path = book_work / "LIGHTCURVE"
    assert (path / "manifest.ecsv").exists(), f"{path}: the light-curve chapter wrote nothing"
    return path


@pytest.fixture(scope="module", params=TRANSIT_TARGETS)
def target(request):
    return request.param


@pytest.fixture(scope="module")
def curve(lc_dir, target):
    return Table.read(lc_dir / f"{target}_lightcurve.ecsv")


@pytest.fixture(scope="module")
def fit(lc_dir, target):
    return json.loads((lc_dir / f"{target}_transit_fit.json").read_text())


@pytest.fixture(scope="module")
def true_curve(truth, curve):
    table = Table.read(truth.root / "lightcurves.ecsv")
    row_of = {str(name): k for k, name in enumerate(table["file"])}
    missing = [str(f) for f in curve["file"] if str(f) not in row_of]
    assert not missing, f"frames of the light curve not in the truth: {missing[:3]}"
    return table[[row_of[str(f)] for f in curve["file"]]]


def test_outputs_are_listed_in_the_manifest(lc_dir, target, curve, fit):
    names = {path.name for path in read_manifest(lc_dir, chapter="06-lightcurve")}
    for suffix in ("_lightcurve.ecsv", "_comparison_stars.ecsv", "_transit_fit.json",
                   "_AAVSO.txt"):
        assert f"{target}{suffix}" in names
    for column in CURVE_COLUMNS:
        assert column in curve.colnames, f"{column} missing from the light curve"
    for key in FIT_KEYS:
        assert key in fit, f"{key} missing from the fit"
    assert len(curve) >= 100, f"only {len(curve)} frames in the light curve"


def test_every_frame_has_its_bjd_tdb_within_2_s(curve, true_curve):
    difference = (np.asarray(curve["bjd_tdb"]) - np.asarray(true_curve["bjd_tdb"])) * 86400
    assert np.max(np.abs(difference)) < 2.0, f"largest BJD_TDB error {np.max(np.abs(difference))} s"


def test_mid_transit_time_within_3_sigma_and_sigma_at_most_2_min(fit, truth):
    planet = truth.params["planet"]
    sigma_min = fit["t0_err_d"] * 1440
    offset = (fit["t0_bjd_tdb"] - planet["t0_bjd_tdb"]) / fit["t0_err_d"]
    assert 0 < sigma_min <= 2.0, f"mid-time uncertainty {sigma_min:.2f} min"
    assert abs(offset) < 3.0, f"mid-time {offset:+.1f} sigma from the truth"


def test_radius_ratio_within_3_sigma_and_sigma_at_most_001(fit, truth):
    planet = truth.params["planet"]
    assert 0 < fit["rp_rs_err"] <= 0.01, f"Rp/R* uncertainty {fit['rp_rs_err']:.4f}"
    offset = (fit["rp_rs"] - planet["rp_rs"]) / fit["rp_rs_err"]
    assert abs(offset) < 3.0, f"Rp/R* {offset:+.1f} sigma from the truth"


def test_residual_rms_matches_the_expected_rms(fit, curve):
    ratio = fit["residual_rms_ppt"] / fit["expected_rms_ppt"]
    assert 0.8 <= ratio <= 1.3, f"residual RMS / expected RMS = {ratio:.2f}"
    # the numbers in the json are those of the light curve written
    residual = np.asarray(curve["flux"]) - np.asarray(curve["model"])
    assert np.std(residual, ddof=1) * 1e3 == pytest.approx(fit["residual_rms_ppt"], rel=0.02)
    expected = np.sqrt(np.mean(np.asarray(curve["flux_err"]) ** 2)) * 1e3
    assert expected == pytest.approx(fit["expected_rms_ppt"], rel=1e-6)


def test_detrended_light_curve_follows_the_true_one(fit, curve, true_curve):
    difference = np.asarray(curve["flux_detrended"]) - np.asarray(true_curve["host_flux"])
    rms = np.sqrt(np.mean(difference ** 2)) * 1e3
    assert rms <= 1.5 * fit["expected_rms_ppt"], (
        f"detrended - true flux: RMS {rms:.2f} ppt, expected RMS {fit['expected_rms_ppt']:.2f}")
    # and the transit is really there: the true flux dips by the planet's depth
    assert np.min(np.asarray(true_curve["host_flux"])) < 1 - 0.5 * fit["depth_ppt"] / 1e3


def test_variable_star_is_never_a_comparison_star(lc_dir, target, truth, fit):
    stars = Table.read(lc_dir / f"{target}_comparison_stars.ecsv")
    true_stars = truth.stars
    variable = true_stars[true_stars["name"] == "V1"]
    assert len(variable) == 1
    v1 = SkyCoord(variable["ra"], variable["dec"], unit="deg")
    used = stars[stars["used"]]
    assert len(used) >= 2, "fewer than two comparison stars"
    separation = SkyCoord(used["ra"], used["dec"], unit="deg").separation(v1[0]).arcsec
    assert np.all(separation > 3.0), "the variable V1 is among the comparison stars used"
    # the variable was measured and rejected by the variability check, not missed
    all_stars = SkyCoord(stars["ra"], stars["dec"], unit="deg")
    nearest = int(np.argmin(all_stars.separation(v1[0]).arcsec))
    assert "variable" in str(stars["reason"][nearest])
    assert sorted(fit["comparison_stars"]) == sorted(int(i) for i in used["id"])
    assert np.sum(used["weight"]) == pytest.approx(1.0)
    for row in stars[~stars["used"]]:
        assert str(row["reason"]).strip(), f"star {row['id']} not used without a reason"


def test_o_minus_c_is_the_fit_minus_the_ephemeris(fit, target):
    info = config.targets[target]
    predicted = info["ephemeris_t0_bjd_tdb"] + fit["epoch"] * info["period_d"]
    assert fit["o_minus_c_min"] == pytest.approx((fit["t0_bjd_tdb"] - predicted) * 1440,
                                                 abs=1e-6)


def test_aavso_export_holds_the_light_curve(lc_dir, target, curve):
    lines = (lc_dir / f"{target}_AAVSO.txt").read_text().splitlines()
    header = dict(line[1:].split("=", 1) for line in lines if line.startswith("#") and "=" in line)
    assert header["TYPE"] == "EXOPLANET" and header["DATE_TYPE"] == "BJD_TDB"
    assert header["STAR_NAME"] == target
    start = lines.index("#DATE,DIFF,ERR,DETREND_1")
    rows = [line.split(",") for line in lines[start + 1:]]
    assert len(rows) == len(curve)
    dates = np.array([float(row[0]) for row in rows])
    assert np.allclose(dates, curve["bjd_tdb"], atol=1e-8)
    assert np.allclose([float(row[1]) for row in rows], curve["flux"], atol=1e-7)



def test_frames_flagged_for_a_comparison_star_only_stay_in_the_curve(book_work, lc_dir, target,
                                                                    curve, fit):
    from datared import photometry as ph

    phot_dir = book_work / "PHOTOMETRY"
    bad_quality = ph.bad_quality_frames(phot_dir)
    in_curve = {str(f) for f in curve["file"]}
    assert not in_curve & set(bad_quality), "a frame of bad quality is in the light curve"
    tag = ph.radius_tag(fit["aperture_arcsec"])
    reference = Table.read(phot_dir / ph.reference_catalog_name(target))
    row_of = {int(i): k for k, i in enumerate(reference["id"])}
    used = [row_of[int(i)] for i in fit["comparison_stars"]]
    # the comparison-star table lists every star but the target
    others = {int(i) for i in Table.read(lc_dir / f"{target}_comparison_stars.ecsv")["id"]}
    (target_row,) = [k for i, k in row_of.items() if i not in others]
    kept_back = []
    for path in ph.frame_catalog_paths(phot_dir):
        table = Table.read(path)
        frame = str(table.meta.get("FRAME", ""))
        if str(table.meta.get("OBJECT", "")).strip() != target or frame in bad_quality:
            continue
        flags = np.asarray(table[f"flags_{tag}"])
        comparison_flagged = flags[used] != 0
        if flags[target_row] == 0 and comparison_flagged.any() and not comparison_flagged.all():
            kept_back.append(frame)
    # frames on which some, not all, comparison stars are flagged (and the target is not)
    # belong in the curve: only the flagged star leaves the ensemble of that frame (a frame
    # may still go as an outlier of the fit or for want of a FWHM, a few at most)
    missing = [frame for frame in kept_back if frame not in in_curve]
    assert len(missing) <= max(1, len(kept_back) // 5), (
        f"{len(missing)} of {len(kept_back)} frames with a flagged comparison star were "
        f"dropped: {missing[:3]}")
