"""Chapter 05 (CMD) against the sample night's truth.

Uses what notebooks/05-cmd.ipynb wrote into the book's work folder
(``CMD/<object>_photometry.ecsv``, ``_zeropoints.ecsv``, ``_isochrone_fit.json``) and the
truth of the night (``truth/stars.ecsv``, ``truth/params.json``). The reference catalogue of
the sample night is on a Pan-STARRS1-like system with terms the chapter's transformation does
not model (see ``datared.sim.sky.REFCAT2_MODEL``), so these tests are not against a catalogue
drawn in the truth's own bands.
"""

from __future__ import annotations

import json

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

import config
from datared.io import read_manifest

CLUSTERS = [name for name, info in config.targets.items() if info.get("kind") == "cluster"]
ZP_COLUMNS = ("file", "filter", "airmass", "zeropoint", "zeropoint_err", "colour_term",
              "colour_index", "n_stars", "rms")
FIT_KEYS = ("log_age", "log_age_err", "mh", "mh_err", "distance_modulus",
            "distance_modulus_err", "ebv", "ebv_err", "isochrones")


@pytest.fixture(scope="module")
def cmd_dir(book_work):
    path = book_work / "CMD"
    assert (path / "manifest.ecsv").exists(), f"{path}: the CMD chapter wrote nothing"
    return path


@pytest.fixture(scope="module", params=CLUSTERS)
def cluster(request):
    return request.param


@pytest.fixture(scope="module")
def photometry(cmd_dir, cluster):
    return Table.read(cmd_dir / f"{cluster}_photometry.ecsv")


@pytest.fixture(scope="module")
def matched(photometry, truth):
    """Our stars with their true counterparts, blends (a true neighbour within 3 arcsec
    less than 3 mag fainter) left out."""
    stars = truth.stars
    true_sky = SkyCoord(stars["ra"], stars["dec"], unit="deg")
    sky = SkyCoord(photometry["ra"], photometry["dec"], unit="deg")
    index, sep, _ = sky.match_to_catalog_sky(true_sky)
    near_ours, near_true, _, _ = true_sky.search_around_sky(sky, 3 * u.arcsec)
    r_true = np.asarray(stars["r"], float)
    other = near_true != index[near_ours]
    blended = np.zeros(len(sky), bool)
    np.logical_or.at(blended, near_ours[other],
                     r_true[near_true[other]] < r_true[index[near_ours[other]]] + 3)
    good = (sep.arcsec < 1.0) & ~blended
    return index, good, stars


def test_outputs_have_the_promised_columns(cmd_dir, cluster, photometry):
    filters = config.targets[cluster]["filters"]
    for name in ("ra", "dec", "member", *filters, *[f"{f}_err" for f in filters]):
        assert name in photometry.colnames, f"{cluster}_photometry.ecsv lacks {name}"
    zps = Table.read(cmd_dir / f"{cluster}_zeropoints.ecsv")
    for name in ZP_COLUMNS:
        assert name in zps.colnames, f"{cluster}_zeropoints.ecsv lacks {name}"
    fit = json.loads((cmd_dir / f"{cluster}_isochrone_fit.json").read_text())
    for key in FIT_KEYS:
        assert key in fit, f"{cluster}_isochrone_fit.json lacks {key}"
    listed = {p.name for p in read_manifest(cmd_dir, chapter="05-cmd")}
    assert {f"{cluster}_photometry.ecsv", f"{cluster}_zeropoints.ecsv",
            f"{cluster}_isochrone_fit.json"} <= listed


def test_zero_points_are_fitted_on_every_frame(cmd_dir, cluster, book_work):
    zps = Table.read(cmd_dir / f"{cluster}_zeropoints.ecsv")
    quality = Table.read(book_work / "PHOTOMETRY" / "frame_quality.ecsv")
    ok = {str(f) for f, q, o in zip(quality["catalog"], quality["quality"], quality["object"],
                                    strict=True) if q == "ok" and o == cluster}
    assert set(zps["file"]) == ok, "every good frame of the cluster gets a zero point"
    assert np.all(zps["n_stars"] >= config.cmd_settings["min_calibration_stars"])
    assert np.all(np.isfinite(zps["zeropoint"])) and np.all(zps["zeropoint_err"] < 0.02)


def test_calibrated_magnitudes_match_the_truth(cluster, photometry, matched):
    index, good, stars = matched
    gi = np.asarray(stars["g"] - stars["i"], float)[index]
    for band in config.targets[cluster]["filters"]:
        mag = np.asarray(photometry[band], float)
        err = np.asarray(photometry[f"{band}_err"], float)
        diff = mag - np.asarray(stars[band], float)[index]
        use = good & np.isfinite(diff)
        assert use.sum() > 100, f"{band}: only {use.sum()} stars to compare"
        assert abs(np.median(diff[use])) < 0.02, f"{band}: median offset {np.median(diff[use])}"
        slope = np.polyfit(gi[use], diff[use], 1)[0]
        assert abs(slope) < 0.015, f"{band}: colour trend {slope:+.4f} mag per mag of g - i"
        sel = use & (err > 0.005) & (err < 0.05)
        z = diff[sel] / err[sel]
        width = 0.7413 * np.subtract(*np.percentile(z, [75, 25]))
        assert 0.8 <= width <= 1.25, f"{band}: normalised residual width {width:.2f}"


def test_members_are_found(photometry, matched):
    index, _, stars = matched
    sep_ok = np.isfinite(np.asarray(photometry["r"], float))
    bright = np.asarray(stars["r"], float)[index] < 18
    true_member = np.asarray(stars["member"], bool)[index]
    ours = np.asarray(photometry["member"], bool) & bright & sep_ok
    precision = (ours & true_member).sum() / max(ours.sum(), 1)
    recall = (ours & true_member).sum() / max((true_member & bright & sep_ok).sum(), 1)
    assert precision >= 0.8, f"precision {precision:.3f}"
    assert recall >= 0.7, f"recall {recall:.3f}"


def test_isochrone_fit_recovers_the_cluster(cmd_dir, cluster, truth):
    fit = json.loads((cmd_dir / f"{cluster}_isochrone_fit.json").read_text())
    true = truth.params["cluster"]
    true_mu = 5 * np.log10(true["distance_pc"]) - 5
    for key, value, limit in (("log_age", true["log_age"], 0.15),
                              ("distance_modulus", true_mu, 0.25), ("ebv", true["ebv"], 0.05)):
        off = fit[key] - value
        assert abs(off) < limit, f"{key}: {fit[key]:.3f} vs truth {value:.3f}"
        assert abs(off) < 3 * fit[f"{key}_err"], (
            f"{key}: {off:+.3f} is {off / fit[f'{key}_err']:+.1f} sigma from the truth")
    assert abs(fit["mh"] - true["mh"]) < 0.25
