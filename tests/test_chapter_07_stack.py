"""Chapter 07 (stack) against the sample night's truth.

Uses the stacks and the colour composite that notebooks/07-stack.ipynb wrote into the book's
work folder (``work_dir/STACK``), the frames of chapter 03 (``work_dir/ASTROMETRY``) and the
truth: ``truth/stars.ecsv`` (true positions and g, r, i magnitudes), ``truth/frames.ecsv``
(airmass, zero points) and the colour terms of ``truth/params.json`` (the night's README).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import config
from datared import stack as st
from datared.frame import read_frame

CLUSTER = next(name for name, target in config.targets.items() if target["kind"] == "cluster")
CLUSTER_FILTERS = list(config.targets[CLUSTER]["filters"])


@pytest.fixture(scope="module")
def stack_dir(book_work):
    path = book_work / "STACK"
    assert path.is_dir(), f"{path} is missing: the stack chapter wrote nothing"
    return path


@pytest.fixture(scope="module")
def stacks(stack_dir):
    found = {}
    for target, settings in config.targets.items():
        for band in settings["filters"]:
            path = stack_dir / st.stack_name(target, band)
            if path.exists():
                found[(target, band)] = st.read_stack(path)
    return found


def _solved_frames(book_work) -> Table:
    """OBJECT and FILTER of every frame that chapter 03 solved."""
    from astropy.io import fits

    from datared.io import read_manifest

    rows = []
    for path in read_manifest(book_work / "ASTROMETRY", chapter="03-astrometry"):
        header = fits.getheader(path)
        rows.append((path.name, str(header[config.object_key]).strip(),
                     str(header[config.filter_key]).strip()))
    return Table(rows=rows, names=("file", "object", "filter"))


def test_a_stack_for_every_target_and_filter(book_work, stacks):
    solved = _solved_frames(book_work)
    for target, settings in config.targets.items():
        for band in settings["filters"]:
            n = int(np.sum((solved["object"] == target) & (solved["filter"] == band)))
            if n == 0:
                continue
            assert (target, band) in stacks, f"no stack {st.stack_name(target, band)}"
            stack = stacks[(target, band)]
            assert stack.header["NCOMBINE"] == n, f"{target} {band}: not every frame combined"
            assert len(stack.frames) == n


def test_stack_files(stacks):
    assert stacks, "no stack was written"
    for (target, band), stack in stacks.items():
        header = stack.header
        assert stack.image.dtype == np.float32
        assert stack.wcs.has_celestial
        assert header["OBJECT"] == target and header["FILTER"] == band
        assert header["EXPTIME"] > 0
        # EFFEXPT: the reference frame's exposure time times its noise variance over the
        # stack's (the depth in units of the reference frame's exposure).
        table = stack.frames
        reference = list(table["file"]).index(header["REFFRAME"])
        noise = np.asarray(table["noise_adu"] * table["scale"])
        weight = np.asarray(table["weight"])
        variance = np.sum(weight ** 2 * noise ** 2) / np.sum(weight) ** 2
        assert header["EFFEXPT"] == pytest.approx(
            header["EXPTIME"] * noise[reference] ** 2 / variance, rel=1e-6)
        assert 0.5 * header["EXPTOTAL"] < header["EFFEXPT"] < 1.5 * header["EXPTOTAL"]
        assert header["EXPTOTAL"] == pytest.approx(float(np.sum(stack.frames["exptime"])))
        # Coverage: its maximum is the number of frames; uncovered pixels are NaN, not zero.
        assert stack.coverage.max() == header["NCOMBINE"], f"{target} {band}"
        uncovered = stack.coverage == 0
        assert np.all(np.isnan(stack.image[uncovered])), f"{target} {band}"
        assert np.all(stack.weight[uncovered] == 0)
        covered = np.isfinite(stack.image)
        assert np.all(stack.weight[covered] > 0)
        assert np.mean(stack.image[covered] == 0.0) < 1e-4


def test_photometric_scales_follow_the_true_transmission(stacks, truth):
    frames = truth.frames
    zeropoint = dict(zip(frames["file"], frames["zeropoint"], strict=True))
    for (target, band), stack in stacks.items():
        table = stack.frames
        zp = np.array([zeropoint[name] for name in table["file"]])
        reference = list(table["file"]).index(stack.header["REFFRAME"])
        true_t = 10 ** (0.4 * (zp - zp[reference]))
        error = np.asarray(table["T"]) / true_t - 1
        assert np.max(np.abs(error)) < 0.01, f"{target} {band}: transmission off by {error}"
        np.testing.assert_allclose(np.asarray(table["scale"]) * np.asarray(table["T"]), 1.0)


def _bright_isolated(stack, true_stars, band, *, fwhm_px):
    """True stars of the cluster field that are bright, unsaturated, isolated and covered
    by every frame: positions on the stack, true magnitudes, and flux in 2.5 FWHM minus
    the median of an annulus from 4 to 6 FWHM."""
    x, y = stack.wcs.world_to_pixel(true_stars["sky"])
    x, y = np.asarray(x, float), np.asarray(y, float)
    mag = np.asarray(true_stars[band], float)
    ny, nx = stack.image.shape
    r_ap, r_in, r_out = 2.5 * fwhm_px, 4 * fwhm_px, 6 * fwhm_px
    inside = (x > r_out + 1) & (x < nx - r_out - 2) & (y > r_out + 1) & (y < ny - r_out - 2)
    alone = st.isolated(x, y, mag, radius_px=r_out, delta_mag=4.0)
    candidate = inside & alone & (mag < 16.5) & ~np.asarray(true_stars["variable"])
    n = int(stack.header["NCOMBINE"])
    full = np.zeros(len(x), bool)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    full[inside] = stack.coverage[iy[inside], ix[inside]] == n
    candidate &= full
    flux, _ = st.aperture_fluxes(stack.image, x, y, r_ap, max_peak_adu=0.5 * config.saturation_adu)
    yy, xx = np.mgrid[:ny, :nx]
    for k in np.flatnonzero(candidate & np.isfinite(flux)):
        x0, x1 = int(x[k] - r_out), int(x[k] + r_out) + 2
        y0, y1 = int(y[k] - r_out), int(y[k] + r_out) + 2
        d = np.hypot(xx[y0:y1, x0:x1] - x[k], yy[y0:y1, x0:x1] - y[k])
        cut = stack.image[y0:y1, x0:x1]
        ring = (d > r_in) & (d < r_out) & np.isfinite(cut)
        flux[k] -= np.median(cut[ring]) * np.pi * r_ap ** 2
    sky_noise = 1.0 / np.sqrt(np.median(stack.weight[stack.coverage == n]))
    noise = np.sqrt(np.pi * r_ap ** 2 * sky_noise ** 2
                    + np.maximum(flux, 0) / config.gain_e_per_adu / n)
    with np.errstate(invalid="ignore"):
        chosen = candidate & np.isfinite(flux) & (flux > 150 * noise)
    return x[chosen], y[chosen], chosen, flux[chosen]


@pytest.mark.parametrize("band", CLUSTER_FILTERS)
def test_cluster_stars_at_their_true_positions(stacks, true_stars, band):
    import sep

    stack = stacks[(CLUSTER, band)]
    fwhm = float(np.median(stack.frames["fwhm_px"]))
    x, y, _, _ = _bright_isolated(stack, true_stars, band, fwhm_px=fwhm)
    assert len(x) >= 15, f"{band}: only {len(x)} bright isolated stars"
    image = np.where(np.isfinite(stack.image), stack.image, 0).astype(np.float32)
    xw, yw, flag = sep.winpos(image, x, y, np.full(len(x), fwhm / 2.3548))
    dx, dy = xw - x, yw - y
    rms = float(np.sqrt(np.mean(dx ** 2 + dy ** 2)))
    assert rms < 0.08, f"{band}: positions off by {rms:.3f} px RMS"
    assert abs(np.mean(dx)) < 0.05 and abs(np.mean(dy)) < 0.05, (
        f"{band}: bulk offset ({np.mean(dx):+.3f}, {np.mean(dy):+.3f}) px")


@pytest.mark.parametrize("band", CLUSTER_FILTERS)
def test_cluster_relative_fluxes_preserved(stacks, true_stars, truth, band):
    from datared.sim import star_flux_adu

    stack = stacks[(CLUSTER, band)]
    fwhm = float(np.median(stack.frames["fwhm_px"]))
    _, _, chosen, flux = _bright_isolated(stack, true_stars, band, fwhm_px=fwhm)
    assert len(flux) >= 15, f"{band}: only {len(flux)} bright isolated stars"
    # The truth's colour term (README): it depends on the airmass, here the frames' mean.
    airmass = float(np.mean(stack.frames["airmass"]))
    expected = star_flux_adu(true_stars[chosen], band, 0.0, 1.0, airmass,
                             truth.params["atmosphere"])
    ratio = flux / expected
    ratio = ratio / np.median(ratio)
    rms = float(np.sqrt(np.mean((ratio - 1) ** 2)))
    assert rms < 0.02, f"{band}: relative fluxes scatter by {rms:.2%} RMS"


@pytest.mark.parametrize("band", CLUSTER_FILTERS)
def test_cluster_depth_gain_from_empty_apertures(book_work, stacks, true_stars, band):
    stack = stacks[(CLUSTER, band)]
    n = int(stack.header["NCOMBINE"])
    fwhm = float(np.median(stack.frames["fwhm_px"]))
    x, y = stack.wcs.world_to_pixel(true_stars["sky"])
    known = np.asarray(true_stars[band]) < 23.0
    avoid = np.column_stack([x, y])[known & np.isfinite(x)]
    full = (stack.coverage == n) & np.isfinite(stack.image)
    positions = st.empty_positions(full, avoid, radius_px=fwhm, clearance_px=fwhm + 8,
                                   n=1500, seed=11)
    assert len(positions) >= 1000
    noise_stack, _ = st.aperture_noise(stack.image, positions, fwhm)
    frame = read_frame(book_work / "ASTROMETRY" / stack.header["REFFRAME"])
    reference = list(stack.frames["file"]).index(stack.header["REFFRAME"])
    sub, _ = st.subtract_background(frame.data, frame.mask)
    single = st.fill_small_gaps(sub) * float(stack.frames["scale"][reference])
    fx, fy = frame.wcs.world_to_pixel(stack.wcs.pixel_to_world(positions[:, 0],
                                                               positions[:, 1]))
    noise_single, _ = st.aperture_noise(single, np.column_stack([fx, fy]), fwhm)
    gain = noise_single / noise_stack
    assert 0.8 * np.sqrt(n) <= gain <= 1.15 * np.sqrt(n), (
        f"{band}: depth gain {gain:.2f} for {n} frames (sqrt(N) = {np.sqrt(n):.2f})")


def test_colour_composite(stack_dir):
    from PIL import Image

    path = stack_dir / st.rgb_name(CLUSTER)
    assert path.exists(), f"{path.name} is missing"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        rgb = np.asarray(picture.convert("RGB"))
    assert min(rgb.shape[:2]) >= 300
    brightest = rgb.max(axis=2)
    assert np.mean(brightest < 8) < 0.5, "the composite is mostly black"
    assert np.median(brightest) >= 5, "the sky is clipped to black"
    assert np.mean(rgb.min(axis=2) == 255) < 0.01, "the composite is clipped white"
    # A colour picture: the channels differ (blue and red stars).
    assert np.mean(np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 20) > 1e-3
