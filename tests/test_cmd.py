"""Unit tests of datared.cmd (chapter 05's machinery)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from datared import cmd


def test_ps1_to_sdss_applies_tonry_and_adds_the_scatter():
    mags = {"g": np.array([15.6]), "r": np.array([15.0]), "i": np.array([14.8])}
    errs = {b: np.array([0.01]) for b in mags}
    sdss, err = cmd.ps1_to_sdss(mags, errs)
    x = 0.6
    assert sdss["g"][0] == pytest.approx(15.6 + 0.013 + 0.145 * x + 0.019 * x**2)
    assert sdss["r"][0] == pytest.approx(15.0 - 0.001 + 0.004 * x + 0.007 * x**2)
    assert err["g"][0] == pytest.approx(np.hypot(0.01, cmd.SDSS_MINUS_PS1_SCATTER["g"]))


def _refcat(n=6):
    return Table({
        "gmag": np.full(n, 15.5), "e_gmag": np.full(n, 0.01), "rmag": np.full(n, 15.0),
        "e_rmag": np.full(n, 0.01), "dupvar": np.array([0, 1, 4, 2, 0, 0]),
        "rp1": np.array([10.0, 10.0, 10.0, 10.0, 1.0, 10.0]),
        "Gmag": np.array([15.0, 15.0, 15.0, 15.0, 15.0, np.nan])})


def test_calibration_stars_cut_variables_duplicates_neighbours_and_spurious():
    use, steps = cmd.calibration_stars(_refcat(), bands=["g", "r"], mag_range=(12, 18),
                                       min_isolation_arcsec=4.0)
    # 1 variable, 2 duplicated, 4 has a close neighbour, 5 has no Gaia counterpart;
    # 3 has dupvar = 2 (no Gaia variability information) and is kept
    assert use.tolist() == [True, False, False, True, False, False]
    assert steps["left"][-1] == 2


def test_calibration_stars_without_the_optional_columns():
    ref = _refcat()
    ref.remove_columns(["dupvar", "rp1", "Gmag"])
    use, steps = cmd.calibration_stars(ref, bands=["g", "r"], mag_range=(12, 18),
                                       min_isolation_arcsec=4.0)
    assert use.all() and len(steps) == 3


def test_fit_zeropoint_recovers_zp_and_colour_term_and_clips_outliers():
    rng = np.random.default_rng(1)
    n = 200
    colour = rng.uniform(0.0, 1.5, n)
    err = rng.uniform(0.005, 0.03, n)
    inst = rng.uniform(-10, -5, n)
    ref = inst + 21.3 + 0.05 * (colour - 0.6) + rng.normal(0, 1, n) * err
    ref[:10] -= 0.5  # blends: brighter in the catalogue
    zp = cmd.fit_zeropoint(ref, inst, colour, err, colour_ref=0.6)
    assert zp.zeropoint == pytest.approx(21.3, abs=4 * zp.zeropoint_err)
    assert zp.colour_term == pytest.approx(0.05, abs=4 * zp.colour_term_err)
    assert not zp.used[:10].any() and zp.n_stars >= 180
    # the same stars with numpy's weighted polyfit
    keep = zp.used
    slope, intercept = np.polyfit(colour[keep] - 0.6, (ref - inst)[keep], 1, w=1 / err[keep])
    assert zp.zeropoint == pytest.approx(intercept, abs=1e-10)
    assert zp.colour_term == pytest.approx(slope, abs=1e-10)
    calibrated = zp.apply(inst[keep], colour[keep])
    assert np.std((calibrated - ref[keep]) / err[keep]) == pytest.approx(1, abs=0.15)


def test_fit_zeropoint_widens_errors_when_the_scatter_exceeds_them():
    rng = np.random.default_rng(2)
    colour = rng.uniform(0, 1, 100)
    ref = 20 + rng.normal(0, 0.05, 100)
    small = cmd.fit_zeropoint(ref, np.zeros(100), colour, np.full(100, 0.01), nsigma=10)
    assert small.zeropoint_err == pytest.approx(0.05 / np.sqrt(100), rel=0.3)


def test_fit_zeropoint_with_too_few_stars_names_the_problem():
    with pytest.raises(cmd.CalibrationError, match="only 3 calibration stars"):
        cmd.fit_zeropoint(np.ones(3), np.zeros(3), np.zeros(3), np.full(3, 0.01))


def test_combine_magnitudes_weighted_mean_and_scatter():
    mags = np.array([[10.0, 12.0], [10.2, np.nan], [10.1, 12.2]])
    errs = np.array([[0.01, 0.1], [0.01, 0.1], [0.02, 0.1]])
    mean, err, red, n = cmd.combine_magnitudes(mags, errs)
    w = 1 / errs[:, 0] ** 2
    assert mean[0] == pytest.approx(np.sum(w * mags[:, 0]) / w.sum())
    assert n.tolist() == [3, 2]
    assert red[0] > 1 and err[0] > np.sqrt(1 / w.sum())  # scatter >> errors: widened
    # two frames 2 sigma apart: reduced chi2 = 2 widens the error of the mean by sqrt(2)
    assert mean[1] == pytest.approx(12.1) and err[1] == pytest.approx(0.1)


def test_pm_membership_separates_a_cluster_from_the_field():
    rng = np.random.default_rng(3)
    nc, nf = 300, 200
    pmra = np.concatenate([rng.normal(1.9, 0.15, nc), rng.normal(0, 8, nf)])
    pmdec = np.concatenate([rng.normal(-5.6, 0.15, nc), rng.normal(-3, 8, nf)])
    err = np.full(nc + nf, 0.1)
    fit = cmd.pm_membership(pmra, pmdec, err, err)
    member = fit.probability > 0.5
    truth = np.arange(nc + nf) < nc
    assert (member & truth).sum() / member.sum() > 0.97
    assert (member & truth).sum() / nc > 0.95
    assert fit.cluster_pm[0] == pytest.approx(1.9, abs=0.05)
    assert fit.cluster_dispersion == pytest.approx(np.hypot(0.15, 0) , abs=0.05)


def test_read_isochrones_parses_a_parsec_table(tmp_path):
    header = "Zini MH logAge Mini label gmag rmag imag"
    lines = ["# a comment", header,
             "0.015 0.0 8.60 0.5 1 10.0 9.5 9.3",
             "0.015 0.0 8.60 1.0 1 5.0 4.8 4.7",
             "# " + header,
             "0.015 0.0 8.65 0.5 1 10.1 9.6 9.4",
             "0.015 0.0 8.65 3.0 9 1.0 1.0 1.0"]
    path = tmp_path / "iso.dat"
    path.write_text("\n".join(lines) + "\n")
    tab = cmd.read_isochrones(path, ["g", "r"])
    assert len(tab) == 3  # the post-AGB row (label 9) is dropped
    one = cmd.isochrone(tab, 8.6, 0.0)
    assert one["Mini"].tolist() == [0.5, 1.0] and one["g"].tolist() == [10.0, 5.0]
    with pytest.raises(Exception, match="no column zmag"):
        cmd.read_isochrones(path, ["z"])
    with pytest.raises(Exception, match="no isochrone with log age 9"):
        cmd.isochrone(tab, 9.0, 0.0)


def test_profile_estimate_of_a_parabola():
    x = np.arange(8.0, 9.01, 0.05)
    loglike = -0.5 * ((x - 8.62) / 0.03) ** 2
    best, err = cmd.profile_estimate(x, loglike)
    assert best == pytest.approx(8.62, abs=1e-6) and err == pytest.approx(0.03, rel=1e-6)
    edge, edge_err = cmd.profile_estimate(x, -x)  # maximum at the edge: one grid step
    assert edge == 8.0 and edge_err == pytest.approx(0.05)


@pytest.fixture(scope="module")
def isochrones():
    try:
        path = cmd.isochrone_file("sdss")
    except Exception as err:  # noqa: BLE001 - the package is an install-time dependency
        pytest.skip(str(err))
    return cmd.read_isochrones(path, ["g", "r", "i"], log_age_range=(8.4, 8.9))


def _synthetic_cluster(isochrones, rng, age=8.65, mh=0.0, mu=10.8, ebv=0.25, n=600):
    iso = cmd.isochrone(isochrones, age, mh)
    mass = rng.uniform(0.6, float(iso["Mini"].max()), n)
    mags = np.column_stack([np.interp(mass, iso["Mini"], iso[b]) for b in "gri"])
    binary = rng.random(n) < 0.3
    q = rng.uniform(0.3, 1.0, n)
    comp = np.column_stack([np.interp(q * mass, iso["Mini"], iso[b]) for b in "gri"])
    mags = np.where(binary[:, None], -2.5 * np.log10(10 ** (-0.4 * mags) + 10 ** (-0.4 * comp)),
                    mags)
    mags = mags + mu + np.array([cmd.EXTINCTION_PER_EBV[b] for b in "gri"]) * ebv
    keep = (mags[:, 0] > 11.0) & (mags[:, 0] < 18.0)
    errs = np.full((keep.sum(), 3), 0.01)
    return mags[keep] + rng.normal(0, 0.01, errs.shape), errs


def test_isochrone_fit_recovers_a_synthetic_cluster(isochrones):
    rng = np.random.default_rng(4)
    mags, errs = _synthetic_cluster(isochrones, rng)
    model = cmd.IsochroneModel(bands=["g", "r", "i"], mags=mags, errors=errs,
                               extinction=[cmd.EXTINCTION_PER_EBV[b] for b in "gri"])
    grid = cmd.fit_isochrone_grid(model, isochrones, log_ages=[8.55, 8.6, 8.65, 8.7, 8.75],
                                  mhs=[-0.5, 0.0], start=(10.5, 0.2), coarse_step=1)
    best = grid.best
    assert best["log_age"] == pytest.approx(8.65) and best["mh"] == 0.0
    assert best["distance_modulus"] == pytest.approx(10.8, abs=0.05)
    assert best["ebv"] == pytest.approx(0.25, abs=0.02)


def test_the_window_normalisation_matters(isochrones):
    """Without normalising the mass function inside the observed range, a model that puts
    more stars into it is favoured; with it, the true distance wins over a closer one."""
    rng = np.random.default_rng(5)
    mags, errs = _synthetic_cluster(isochrones, rng)
    model = cmd.IsochroneModel(bands=["g", "r", "i"], mags=mags, errors=errs,
                               extinction=[cmd.EXTINCTION_PER_EBV[b] for b in "gri"])
    pts = model.model_points(cmd.isochrone(isochrones, 8.65, 0.0))
    true = model.log_likelihood(pts, 10.8, 0.25, 0.05)
    assert true > model.log_likelihood(pts, 10.5, 0.25, 0.05) + 10
    assert true > model.log_likelihood(pts, 11.1, 0.25, 0.05) + 10
