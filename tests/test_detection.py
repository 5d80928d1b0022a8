"""Unit tests of datared.detection (sep-based detection, backgrounds) on synthetic frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.special import erf

from datared import detection as det

SIGMA_TO_FWHM = det.SIGMA_TO_FWHM


def gaussian_stars(shape, x, y, flux, fwhm_px=3.4, sky=800.0, read_noise=4.0, rng=None,
                   half=12):
    """Pixel-integrated Gaussian stars on a flat sky with Poisson and read noise (gain 1)."""
    sig = fwhm_px / SIGMA_TO_FWHM
    image = np.full(shape, sky, float)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        xs = np.arange(max(0, int(xi) - half), min(shape[1], int(xi) + half + 1))
        ys = np.arange(max(0, int(yi) - half), min(shape[0], int(yi) + half + 1))
        px = 0.5 * (erf((xs + 0.5 - xi) / (math.sqrt(2) * sig))
                    - erf((xs - 0.5 - xi) / (math.sqrt(2) * sig)))
        py = 0.5 * (erf((ys + 0.5 - yi) / (math.sqrt(2) * sig))
                    - erf((ys - 0.5 - yi) / (math.sqrt(2) * sig)))
        image[np.ix_(ys, xs)] += fi * np.outer(py, px)
    if rng is None:
        return image.astype(np.float32)
    return (rng.poisson(image) + rng.normal(0, read_noise, shape)).astype(np.float32)


def random_field(rng, shape, n, flux_range=(3.3, 5.3), margin=30):
    ny, nx = shape
    return (rng.uniform(margin, nx - margin, n), rng.uniform(margin, ny - margin, n),
            10 ** rng.uniform(*flux_range, n))


def test_windowed_centroids_are_unbiased_to_a_few_thousandths():
    rng = np.random.default_rng(1)
    errs = []
    for _ in range(20):
        xt, yt = rng.uniform(25, 35, 2)
        image = gaussian_stars((60, 60), [xt], [yt], [50000.0], sky=0.0)
        stars = det.detect_stars(image, fwhm_px=3.4, background=det.BackgroundModel(
            np.zeros((60, 60)), np.ones((60, 60)), np.zeros((1, 1)), 64, 3))
        assert len(stars) == 1
        errs.append(math.hypot(stars["x"][0] - xt, stars["y"][0] - yt))
    assert max(errs) < 0.01


def test_detect_stars_finds_stars_and_measures_fwhm():
    rng = np.random.default_rng(2)
    shape = (500, 700)
    x, y, flux = random_field(rng, shape, 150)
    image = gaussian_stars(shape, x, y, flux, rng=rng)
    stars = det.detect_stars(image)
    assert len(stars) > 100
    assert abs(stars.meta["fwhm_px"] - 3.4) < 0.3
    assert np.all(np.diff(stars["flux"]) <= 0)  # brightest first
    assert set(det.DETECTION_COLUMNS) <= set(stars.colnames)
    assert np.nanmedian(stars["fwhm"][:30]) == pytest.approx(3.4, abs=0.3)


def test_detect_stars_on_pure_noise_finds_almost_nothing():
    rng = np.random.default_rng(3)
    noise = rng.normal(1000, 10, (500, 700)).astype(np.float32)
    stars = det.detect_stars(noise, nsigma=5, fwhm_px=3.4)
    assert len(stars) < 5
    blank = det.detect_stars(np.full((200, 200), 100.0, np.float32))
    assert len(blank) == 0 and np.isnan(blank.meta["fwhm_px"])


def test_the_quick_background_follows_a_gradient_and_measures_the_noise():
    # What detect_stars subtracts when it is given no background (sep's mesh).
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[0:400, 0:600]
    sky = 500.0 + 0.03 * xx + 0.02 * yy + 5.0 * np.sin(xx / 150.0)
    image = (sky + rng.normal(0, 10, sky.shape)).astype(np.float32)
    bkg = det._sep_background(image, None)
    assert bkg.globalrms == pytest.approx(10, rel=0.05)
    inner = (slice(32, -32), slice(32, -32))
    assert np.abs(bkg.back() - sky)[inner].max() < 2.0


def test_masked_pixels_are_never_detected():
    rng = np.random.default_rng(4)
    shape = (300, 300)
    image = gaussian_stars(shape, [100.0, 200.0], [150.0, 150.0], [1e5, 1e5], rng=rng)
    mask = np.zeros(shape, bool)
    mask[140:161, 190:211] = True  # hides the second star
    stars = det.detect_stars(image, mask=mask, fwhm_px=3.4, nsigma=5)
    assert np.min(np.hypot(stars["x"] - 100.0, stars["y"] - 150.0)) < 0.1
    assert np.all(np.hypot(stars["x"] - 200.0, stars["y"] - 150.0) > 12)


def test_detect_stars_on_a_large_frame_is_accurate_and_skips_cosmic_rays():
    # Above 4 Mpx detection runs on a 2 x 2 binned copy; the centroids must still be
    # full-resolution ones. Single-pixel cosmic rays must not count as stars.
    rng = np.random.default_rng(13)
    shape = (2048, 2100)
    ny, nx = shape
    n = 300
    xt, yt, flux = random_field(rng, shape, n)
    image = gaussian_stars(shape, xt, yt, flux, rng=rng, half=10)
    cx = rng.integers(20, nx - 20, 40)
    cy = rng.integers(20, ny - 20, 40)
    image[cy, cx] += 3000.0  # cosmic rays
    stars = det.detect_stars(image)
    assert abs(stars.meta["fwhm_px"] - 3.4) < 0.2
    xy = np.column_stack([stars["x"], stars["y"]])
    assert cKDTree(np.column_stack([cx, cy])).query(xy)[0].min() > 2  # no cosmic ray
    dist, j = cKDTree(np.column_stack([xt, yt])).query(xy)
    real = np.asarray(stars["snr"]) >= 5  # fainter detections may be noise peaks
    assert np.all(dist[real] < 0.5)
    found = np.zeros(n, bool)
    found[j[real]] = True
    isolated = cKDTree(np.column_stack([xt, yt])).query(np.column_stack([xt, yt]), k=2)[0][:, 1] > 8
    assert found[isolated].mean() > 0.97
    # Centroid errors as expected from the noise: dist / sigma_xy follows a Rayleigh law
    # (median 1.18) for unbiased centroids.
    z = dist[real] / np.asarray(stars["sigma_xy"])[real]
    assert np.median(z) < 1.4 and z.max() < 5
    assert np.median(dist[np.asarray(stars["snr"]) > 100]) < 0.02


def test_max_stars_keeps_the_brightest():
    rng = np.random.default_rng(5)
    shape = (400, 400)
    x, y, flux = random_field(rng, shape, 80)
    image = gaussian_stars(shape, x, y, flux, rng=rng)
    every = det.detect_stars(image, fwhm_px=3.4)
    top = det.detect_stars(image, fwhm_px=3.4, max_stars=10)
    assert len(top) == 10
    assert np.allclose(np.sort(top["flux"]), np.sort(every["flux"][:10]))


def test_matched_filter_threshold_does_not_depend_on_the_kernel_width():
    # nsigma is the significance of the smoothed image: a star of S/N ~ 30 is found with a
    # narrow or a wide kernel alike.
    rng = np.random.default_rng(6)
    shape = (200, 200)
    image = gaussian_stars(shape, [100.3], [99.6], [6000.0], fwhm_px=6.0, sky=500, rng=rng)
    for fwhm in (3.0, 6.0, 9.0):
        stars = det.detect_stars(image, fwhm_px=fwhm, nsigma=5)
        assert np.any(np.hypot(stars["x"] - 100.3, stars["y"] - 99.6) < 0.5), fwhm


def test_too_sharp_flags_a_cosmic_ray_not_a_star():
    flux = np.array([1e4, 1e4])
    peak = np.array([0.88 * 1e4 / 3.4**2, 0.9e4])
    assert list(det.too_sharp(peak, flux, 3.4, 10.0)) == [False, True]


def test_a_masked_pixel_near_a_star_keeps_its_centroid_and_size():
    # sep flags a window that touches a masked pixel; the measurement is still good and must
    # not fall back to the rough detection position or lose the star's FWHM.
    rng = np.random.default_rng(7)
    shape = (120, 120)
    image = gaussian_stars(shape, [60.3], [59.8], [2e5], fwhm_px=3.4, sky=500.0, rng=rng)
    mask = np.zeros(shape, bool)
    mask[62, 57] = True
    stars = det.detect_stars(image, mask=mask, fwhm_px=3.4, nsigma=5)
    assert len(stars) == 1
    assert math.hypot(stars["x"][0] - 60.3, stars["y"][0] - 59.8) < 0.03
    assert stars["fwhm"][0] == pytest.approx(3.4, abs=0.3)


def moffat_stars(shape, x, y, flux, fwhm_px, beta=2.5, sky=500.0, rng=None, half=25):
    """Moffat stars (sampled at pixel centres, normalised on the stamp) with noise."""
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    image = np.full(shape, sky, float)
    offs = np.arange(-half, half + 1)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        ix, iy = int(round(xi)), int(round(yi))
        dx = offs[None, :] + ix - xi
        dy = offs[:, None] + iy - yi
        profile = (1.0 + (dx**2 + dy**2) / alpha**2) ** (-beta)
        image[iy - half:iy + half + 1, ix - half:ix + half + 1] += fi * profile / profile.sum()
    if rng is None:
        return image.astype(np.float32)
    return (rng.poisson(image) + rng.normal(0, 4.0, shape)).astype(np.float32)


@pytest.mark.parametrize("fwhm_true", [3.0, 4.5, 7.0])
def test_fwhm_is_the_width_at_half_maximum_for_stars_with_wings(fwhm_true):
    # Moffat stars have wings: a half-light radius overestimates the FWHM, the width at half
    # the peak does not.
    rng = np.random.default_rng(int(fwhm_true * 10))
    shape = (600, 600)
    x, y, flux = random_field(rng, shape, 60, flux_range=(4.5, 5.5), margin=40)
    image = moffat_stars(shape, x, y, flux, fwhm_true, rng=rng)
    stars = det.detect_stars(image)
    assert stars.meta["fwhm_px"] == pytest.approx(fwhm_true, rel=0.08)
    assert np.nanmedian(stars["fwhm"][:20]) == pytest.approx(fwhm_true, rel=0.08)


def test_a_saturated_star_with_a_masked_core_is_one_star_at_its_centre():
    # Calibration masks the saturated core of a bright star; detection must still see one
    # round star there (not a ring of fragments) and centre it.
    rng = np.random.default_rng(8)
    shape = (200, 200)
    image = moffat_stars(shape, [100.4], [99.7], [3e7], 4.0, rng=rng)
    level = 60000.0
    saturated = image >= level
    image[saturated] = level
    assert saturated.sum() > 9  # a real masked core
    stars = det.detect_stars(image, mask=saturated, nsigma=5, saturation_adu=0.9 * level - 500)
    near = np.hypot(stars["x"] - 100.4, stars["y"] - 99.7) < 15
    assert near.sum() == 1
    assert math.hypot(stars["x"][near][0] - 100.4, stars["y"][near][0] - 99.7) < 0.1
    assert stars["saturated"][near][0]


def test_fill_masked_removes_hot_pixels_and_keeps_sky_patches_masked():
    rng = np.random.default_rng(9)
    image = rng.normal(0, 10, (100, 100)).astype(np.float32)
    bad = np.zeros(image.shape, bool)
    image[20, 20] = 5000.0  # a hot pixel
    bad[20, 20] = True
    bad[50:70, 50:70] = True  # a masked patch of sky
    filled, still_bad = det.fill_masked(image, bad, bright=200.0)
    assert abs(filled[20, 20]) < 30
    assert still_bad is not None and still_bad[60, 60] and not still_bad[20, 20]
    assert np.abs(filled[bad]).max() < 60


def test_an_overflowing_detection_is_a_frame_error():
    from datared.errors import FrameError

    rng = np.random.default_rng(10)
    noise = rng.normal(0, 1, (600, 600)).astype(np.float32)
    import sep

    old = sep.get_extract_pixstack()
    try:
        with pytest.raises(FrameError, match="star detection failed"):
            det._extract(det._DetectionImage.of(noise, None, 1.0), -5.0, 3.0, 1, True, None)
    finally:
        sep.set_extract_pixstack(old)


@pytest.mark.parametrize("shape", [(300, 257), (130, 64), (64, 200)])
def test_zoom_mesh_is_photutils_interpolation(shape):
    """The separable spline gives Background2D's own full-resolution maps, to rounding."""
    from photutils.background import Background2D, MedianBackground

    from datared.detection import zoom_mesh
    from tests.synthetic import synthetic_star_field

    image, _ = synthetic_star_field(shape, n_stars=20, seed=4)
    image = (image + np.linspace(0.0, 40.0, shape[1])[None, :]
             + np.linspace(0.0, 9.0, shape[0])[:, None])
    background = Background2D(image, 32, filter_size=3, bkg_estimator=MedianBackground())
    for mesh, full in ((background.background_mesh, background.background),
                       (background.background_rms_mesh, background.background_rms)):
        mine = zoom_mesh(mesh, 32, shape)
        assert mine.shape == shape
        assert np.max(np.abs(mine - full)) < 1e-9 * max(1.0, float(np.max(np.abs(full))))
    flat = zoom_mesh(np.full((3, 4), 7.5), 32, (90, 120))
    assert flat.shape == (90, 120) and np.all(flat == 7.5)


def test_median_filter_mesh_is_photutils_mesh_filter():
    """The vectorised 3 x 3 mesh filter gives Background2D's filtered mesh exactly."""
    from photutils.background import Background2D, MedianBackground
    from scipy.ndimage import generic_filter

    from datared.detection import median_filter_mesh
    from tests.synthetic import synthetic_star_field

    image, _ = synthetic_star_field((260, 330), n_stars=40, seed=6)
    image = image + np.linspace(0.0, 60.0, 330)[None, :]
    plain = Background2D(image, 32, filter_size=1, bkg_estimator=MedianBackground())
    filtered = Background2D(image, 32, filter_size=3, bkg_estimator=MedianBackground())
    assert np.array_equal(median_filter_mesh(plain.background_mesh, 3), filtered.background_mesh)
    holes = np.array(plain.background_mesh, dtype=float)
    holes[2, 3] = holes[0, 0] = np.nan
    expected = generic_filter(holes, np.nanmedian, size=5, mode="constant", cval=np.nan)
    assert np.allclose(median_filter_mesh(holes, 5), expected, equal_nan=True)
    with pytest.raises(ValueError, match="odd"):
        median_filter_mesh(holes, 2)
