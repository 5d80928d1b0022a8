"""Unit tests of datared.stack on small synthetic images (no sample night needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from datared import stack as st
from datared.frame import pixel_scale_of
from tests.synthetic import synthetic_star_field

SCALE_ARCSEC = 0.6


def tan_wcs(shape, *, ra=150.0, dec=20.0, scale_arcsec=SCALE_ARCSEC, angle_deg=0.0,
            crpix=None, sip=False):
    """A TAN (optionally TAN-SIP) WCS centred on the image."""
    from astropy.wcs import Sip

    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = crpix if crpix is not None else [(nx + 1) / 2, (ny + 1) / 2]
    w.wcs.crval = [ra, dec]
    s = scale_arcsec / 3600
    th = math.radians(angle_deg)
    w.wcs.cd = s * np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2] = 2e-6, -1e-6
        b[1, 1], b[0, 2] = 1.5e-6, 1e-6
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.pixel_shape = (nx, ny)
    return w


@pytest.fixture(scope="module")
def field():
    """A noise-free star field with its stars and a TAN-SIP WCS."""
    shape = (160, 200)
    image, stars = synthetic_star_field(shape, 25, fwhm_pix=4.0, sky_adu=0.0,
                                        flux_range_adu=(2e4, 2e5), margin=20, seed=3,
                                        noise=False)
    return image.astype(np.float64), stars, tan_wcs(shape, sip=True)


def _fluxes_on(image, wcs, stars, wcs_in, radius_px):
    sky = wcs_in.pixel_to_world(stars["x"], stars["y"])
    x, y = wcs.world_to_pixel(sky)
    flux, _ = st.aperture_fluxes(image, x, y, radius_px)
    return flux


# ---------------------------------------------------------------------------------------
# Grid and resampling
# ---------------------------------------------------------------------------------------

def test_output_grid_covers_every_frame():
    shape = (100, 120)
    frames = [(shape, tan_wcs(shape, ra=150.0 + dx / 3600, dec=20.0 + dy / 3600))
              for dx, dy in [(0, 0), (20, 0), (0, -15), (-10, 12)]]
    wcs, grid_shape = st.output_grid(frames, pixel_scale_arcsec=SCALE_ARCSEC)
    assert grid_shape[0] > shape[0] and grid_shape[1] > shape[1]
    assert pixel_scale_of(wcs) == pytest.approx(SCALE_ARCSEC, rel=1e-6)
    for frame_shape, frame_wcs in frames:
        ny, nx = frame_shape
        corners = frame_wcs.pixel_to_world([-0.5, nx - 0.5, nx - 0.5, -0.5],
                                           [-0.5, -0.5, ny - 0.5, ny - 0.5])
        gx, gy = wcs.world_to_pixel(corners)
        assert np.all(gx >= -1.0) and np.all(gx <= grid_shape[1])
        assert np.all(gy >= -1.0) and np.all(gy <= grid_shape[0])


def test_resample_conserves_flux_on_finer_rotated_grid(field):
    image, stars, wcs_in = field
    wcs_out = tan_wcs((320, 400), scale_arcsec=SCALE_ARCSEC / 2, angle_deg=30.0,
                      ra=150.0, dec=20.0)
    flux_in = _fluxes_on(image, wcs_in, stars, wcs_in, 12.0)
    kept = st.resample_frame(image, wcs_in, wcs_out, (320, 400))
    flux_out = _fluxes_on(kept, wcs_out, stars, wcs_in, 24.0)
    # Isolated stars: where a neighbour's core crosses the circle, interpolation splits its
    # light differently from the pixels (per cent of the neighbour).
    distance = np.hypot(stars["x"][:, None] - stars["x"][None], stars["y"][:, None]
                        - stars["y"][None])
    np.fill_diagonal(distance, np.inf)
    ok = np.isfinite(flux_in) & np.isfinite(flux_out) & (distance.min(axis=1) > 20)
    assert ok.sum() >= 5
    np.testing.assert_allclose(flux_out[ok] / flux_in[ok], 1.0, atol=0.003)
    # Without the pixel-area factor the result keeps surface brightness: 4 times the flux.
    brightness = st.resample_frame(image, wcs_in, wcs_out, (320, 400), conserve_flux=False)
    flux_sb = _fluxes_on(brightness, wcs_out, stars, wcs_in, 24.0)
    np.testing.assert_allclose(np.median(flux_sb[ok] / flux_in[ok]), 4.0, rtol=0.01)


def test_pixel_area_ratio_is_the_scale_ratio_squared(field):
    _, _, wcs_in = field
    wcs_out = tan_wcs((50, 60), scale_arcsec=SCALE_ARCSEC * 1.5)
    area = st.pixel_area_ratio(wcs_in, wcs_out, (50, 60))
    np.testing.assert_allclose(np.median(area), 2.25, rtol=2e-3)


def test_resample_matches_reproject_interp(field):
    from reproject import reproject_interp

    image, _, wcs_in = field
    wcs_out = tan_wcs((170, 210), angle_deg=3.0, crpix=[108.3, 86.1])
    mine = st.resample_frame(image, wcs_in, wcs_out, (170, 210))
    library, _ = reproject_interp((image, wcs_in), wcs_out, shape_out=(170, 210),
                                  order="bilinear")
    library = library * st.pixel_area_ratio(wcs_in, wcs_out, (170, 210))
    both = np.isfinite(mine) & np.isfinite(library)
    assert np.mean(np.isfinite(mine) != np.isfinite(library)) < 1e-3
    np.testing.assert_allclose(mine[both], library[both], rtol=0, atol=1e-3 * image.max())


def test_nan_outside_coverage_and_next_to_masked_pixels(field):
    image, _, wcs_in = field
    image = image + 10.0  # no pixel of the frame is zero
    image[80, 100] = np.nan  # one masked pixel
    wcs_out = tan_wcs((260, 300), crpix=[150.5, 130.5])  # larger than the frame
    out = st.resample_frame(image, wcs_in, wcs_out, (260, 300))
    assert not np.any(out == 0.0), "uncovered pixels must be NaN, never zero"
    assert np.isnan(out[:20]).all() and np.isnan(out[-20:]).all()
    assert np.isnan(out[:, :30]).all() and np.isnan(out[:, -30:]).all()
    centre = out[60:200, 70:230]
    # The masked pixel spoils at most the few output pixels around it.
    assert 1 <= np.isnan(centre).sum() <= 9


# ---------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------

def test_relative_transmission_recovers_clouds_with_missing_stars_and_a_variable():
    rng = np.random.default_rng(1)
    true_t = np.array([1.0, 0.8, 0.95, 0.6, 1.02])
    stars = 10 ** rng.uniform(3, 5, 40)
    flux = true_t[:, None] * stars[None, :] * (1 + 0.002 * rng.standard_normal((5, 40)))
    flux[2, :10] = np.nan  # dithered off
    flux[:, 5] *= np.array([1.0, 1.3, 0.7, 1.2, 0.9])  # a variable star
    t, n_used, scatter = st.relative_transmission(flux, reference=0)
    np.testing.assert_allclose(t, true_t, rtol=3e-3)
    assert n_used[2] == 30
    assert np.all(scatter < 0.01)


def test_relative_transmission_needs_enough_stars():
    flux = np.full((3, 10), np.nan)
    flux[:, :3] = 1e4
    with pytest.raises(ValueError, match="usable stars"):
        st.relative_transmission(flux)


def test_combine_weights():
    t = np.array([1.0, 0.5, 1.0])
    noise = np.array([10.0, 10.0, 20.0])
    np.testing.assert_allclose(st.combine_weights(t, noise), [1.0, 0.25, 0.25])
    np.testing.assert_allclose(st.combine_weights(t, noise, np.array([4.0, 4.0, 2.0])),
                               [1.0, 0.25, 1.0])
    with pytest.raises(ValueError):
        st.combine_weights(t, np.array([10.0, 0.0, 1.0]))


def test_subtract_background_removes_a_gradient_and_masks():
    image, _ = synthetic_star_field((200, 240), 30, sky_adu=500.0, seed=2)
    yy, xx = np.mgrid[:200, :240]
    image = image + (0.2 * xx).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[50, 60] = True
    sub, level = st.subtract_background(image, mask)
    assert np.isnan(sub[50, 60])
    assert np.median(np.abs(level.background - (500.0 + 0.2 * xx))) < 1.5
    assert level.rms == pytest.approx(math.sqrt(500.0 + 25.0), rel=0.1)


def test_isolated_and_aperture_fluxes():
    x = np.array([50.0, 55.0, 100.0, 3.0])
    y = np.array([50.0, 50.0, 100.0, 50.0])
    mag = np.array([12.0, 16.0, 12.0, 12.0])
    alone = st.isolated(x, y, mag, radius_px=10, delta_mag=3)
    # The neighbour 4 mag fainter does not spoil the bright star; the bright one spoils it.
    assert list(alone) == [True, False, True, True]
    image = np.zeros((120, 120), np.float32)
    image[50, 50] = 100.0
    image[100, 100] = np.nan
    flux, _ = st.aperture_fluxes(image, x, y, 4.0)
    assert flux[0] == pytest.approx(100.0)
    assert np.isnan(flux[2])  # touches a NaN pixel
    assert np.isnan(flux[3])  # reaches past the edge
    filled = st.fill_small_gaps(image)
    assert np.isfinite(filled[100, 100])


# ---------------------------------------------------------------------------------------
# Combining
# ---------------------------------------------------------------------------------------

def _frames(n=5, shape=(60, 80), noise=5.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    truth[shape[0] // 2, shape[1] // 2] = 500.0
    values = truth[None] + rng.normal(0, noise, (n,) + shape).astype(np.float32)
    return truth, values


def test_clipping_rejects_a_cosmic_ray_and_a_satellite_trail():
    truth, values = _frames()
    values[1, 10, 10] += 3000.0  # cosmic ray
    values[1, 10, 11] += 800.0
    values[3, 45, 5:75] += 400.0  # satellite trail
    kwargs = dict(noise=np.full(5, 5.0), weights=np.ones(5), scales=np.ones(5),
                  gain_e_per_adu=1.0)
    clipped = st.clip_and_combine(values, **kwargs)
    plain = st.clip_and_combine(values, clip=False, **kwargs)
    assert plain.image[10, 10] > 500
    assert abs(clipped.image[10, 10]) < 15
    assert np.all(np.abs(clipped.image[45, 5:75]) < 15)
    assert np.all(plain.image[45, 5:75] > 50)
    assert clipped.coverage[10, 10] == 4 and clipped.coverage.max() == 5
    assert clipped.rejected[1] >= 2 and clipped.rejected[3] >= 70
    # Good values are kept: almost nothing of the pure noise is rejected (grown by 1 px).
    assert clipped.rejected[[0, 2, 4]].sum() < 0.005 * 3 * values[0].size


def test_clipping_of_two_frames_keeps_the_lower_value():
    truth, values = _frames(n=2)
    values[0, 20, 20] += 2000.0
    result = st.clip_and_combine(values, noise=np.full(2, 5.0), weights=np.ones(2),
                                 scales=np.ones(2), gain_e_per_adu=1.0)
    assert result.image[20, 20] == pytest.approx(values[1, 20, 20])
    assert result.coverage[20, 20] == 1


def test_bright_stars_are_not_clipped_by_seeing_differences():
    from tests.synthetic import synthetic_star_field as field

    # A bright star (peak about 150 times the noise) in four frames whose seeing differs
    # as much as on the sample night: its core must not be clipped.
    rng = np.random.default_rng(2)
    star = [field((60, 60), 1, fwhm_pix=f, sky_adu=0.0, flux_range_adu=(2e5, 2e5),
                  margin=29, seed=5, noise=False)[0] for f in (4.0, 4.05, 4.15, 4.3)]
    values = np.array(star, dtype=np.float32) + rng.normal(0, 15.0, (4, 60, 60))
    result = st.clip_and_combine(values.astype(np.float32), noise=np.full(4, 15.0),
                                 weights=np.ones(4), scales=np.ones(4), gain_e_per_adu=1.0,
                                 grow=0)
    core = np.hypot(*np.mgrid[-30:30, -30:30]) < 4
    assert result.rejected.sum() < 0.002 * values.size  # a few noise values, no more
    assert result.coverage[core].min() == 4
    np.testing.assert_allclose(np.sum(result.image[core]), np.mean(values[:, core].sum(axis=1)),
                               rtol=1e-3)


def test_weighted_mean_and_inverse_variance():
    rng = np.random.default_rng(4)
    noise = np.array([2.0, 4.0, 8.0])
    values = (rng.normal(0, 1, (3, 200, 200)) * noise[:, None, None]).astype(np.float32)
    weights = 1 / noise ** 2
    result = st.clip_and_combine(values, noise=noise, weights=weights, scales=np.ones(3),
                                 gain_e_per_adu=1.0, clip=False)
    expected = np.sum(weights[:, None, None] * values, axis=0) / weights.sum()
    np.testing.assert_allclose(result.image, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.inverse_variance, weights.sum(), rtol=1e-6)
    assert np.std(result.image) == pytest.approx(1 / math.sqrt(weights.sum()), rel=0.02)
    # Equal weights on unequal frames give a larger variance, and the map says so.
    equal = st.clip_and_combine(values, noise=noise, weights=np.ones(3), scales=np.ones(3),
                                gain_e_per_adu=1.0, clip=False)
    assert equal.inverse_variance[0, 0] == pytest.approx(9 / np.sum(noise ** 2))


def test_strip_combine_equals_one_shot_combine(tmp_path):
    truth, values = _frames(n=6, shape=(53, 40), seed=9)
    values[2, 20:23, 5] += 900.0  # a cosmic ray across a strip border
    values[4, 0:53, 30] += 300.0  # a trail along the columns
    values[1, :10, :] = np.nan  # not covered
    scales = np.array([1.0, 1.1, 0.9, 1.0, 1.2, 0.95])
    paths = []
    for k, frame in enumerate(values):
        path = tmp_path / f"frame{k}.npy"
        np.save(path, (frame / scales[k]).astype(np.float32))
        paths.append(path)
    kwargs = dict(scales=scales, noise=np.full(6, 5.0) / scales, weights=np.ones(6) / scales,
                  gain_e_per_adu=1.0)
    whole, n_whole = st.combine_in_strips(paths, shape=(53, 40), memory_budget=1e9, in_use=0,
                                          **kwargs)
    per_row = 40 * (6 * st.BYTES_PER_STACKED_VALUE + st.BYTES_PER_OUTPUT_PIXEL)
    strips, n_strips = st.combine_in_strips(paths, shape=(53, 40),
                                            memory_budget=per_row * 7 + 53 * 40 * 10,
                                            in_use=0, **kwargs)
    assert n_whole == 1 and n_strips > 5
    np.testing.assert_array_equal(strips.image, whole.image)
    np.testing.assert_array_equal(strips.coverage, whole.coverage)
    np.testing.assert_array_equal(strips.inverse_variance, whole.inverse_variance)
    np.testing.assert_array_equal(strips.rejected, whole.rejected)
    in_memory = st.clip_and_combine(np.array([np.load(p) * s for p, s in zip(paths, scales, strict=True)]),
                                    noise=kwargs["noise"] * scales, weights=kwargs["weights"],
                                    scales=scales, gain_e_per_adu=1.0)
    np.testing.assert_allclose(whole.image, in_memory.image, rtol=1e-6, atol=1e-6)
    assert np.isnan(whole.image).sum() == 0  # every pixel has some frame
    assert whole.coverage[:10].max() == 5 and whole.coverage.max() == 6


def test_strip_rows_respects_the_budget():
    per_row = 100 * (10 * st.BYTES_PER_STACKED_VALUE + st.BYTES_PER_OUTPUT_PIXEL)
    assert st.strip_rows(10, 100, memory_budget=per_row * 50) == 50
    assert st.strip_rows(10, 100, memory_budget=per_row * 50, halo=1) == 48
    assert st.strip_rows(10, 100, memory_budget=per_row * 50, in_use=per_row * 20) == 30
    with pytest.raises(MemoryError, match="combine_memory_budget"):
        st.strip_rows(100, 5000, memory_budget=1e5)


def test_combine_in_strips_counts_the_memory_in_use(tmp_path):
    _, values = _frames(n=3, shape=(40, 30))
    paths = []
    for k, frame in enumerate(values):
        np.save(tmp_path / f"f{k}.npy", frame)
        paths.append(tmp_path / f"f{k}.npy")
    kwargs = dict(shape=(40, 30), scales=np.ones(3), noise=np.full(3, 5.0),
                  weights=np.ones(3), gain_e_per_adu=1.0)
    with pytest.raises(MemoryError):  # this process alone needs more than 1 MB
        st.combine_in_strips(paths, memory_budget=1e6, **kwargs)
    result, n_strips = st.combine_in_strips(paths, memory_budget=1e6, in_use=0, **kwargs)
    assert n_strips == 1 and result.coverage.max() == 3
    with pytest.raises(ValueError, match="expected float32"):
        st.combine_in_strips(paths, memory_budget=1e9, in_use=0,
                             **{**kwargs, "shape": (30, 40)})


# ---------------------------------------------------------------------------------------
# Files, checks and colour
# ---------------------------------------------------------------------------------------

def test_write_and_read_stack(tmp_path):
    truth, values = _frames(n=3)
    result = st.clip_and_combine(values, noise=np.full(3, 5.0), weights=np.ones(3),
                                 scales=np.ones(3), gain_e_per_adu=1.0)
    result.image[0, 0] = np.nan
    wcs = tan_wcs(truth.shape)
    from astropy.io import fits

    header = fits.Header()
    header["NCOMBINE"] = 3
    frames = Table({"file": ["a.fits", "b.fits", "c.fits"], "scale": [1.0, 1.0, 1.0]})
    path = st.write_stack(tmp_path / st.stack_name("M37", "r"), result, wcs, header=header,
                          frames=frames)
    assert path.name == "M37_r.fits"
    stack = st.read_stack(path)
    assert stack.image.dtype == np.float32 and np.isnan(stack.image[0, 0])
    assert stack.header["NCOMBINE"] == 3 and stack.header["BUNIT"] == "adu"
    assert stack.coverage.max() == 3
    np.testing.assert_array_equal(stack.weight, result.inverse_variance)
    assert list(stack.frames["file"]) == ["a.fits", "b.fits", "c.fits"]
    np.testing.assert_allclose(stack.wcs.wcs.crval, wcs.wcs.crval)


def test_aperture_noise_of_white_noise():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 3.0, (400, 400)).astype(np.float32)
    valid = np.ones(image.shape, bool)
    positions = st.empty_positions(valid, np.array([[200.0, 200.0]]), radius_px=4.0,
                                   clearance_px=20.0, n=800, seed=1)
    assert len(positions) == 800
    assert np.min(np.hypot(positions[:, 0] - 200, positions[:, 1] - 200)) > 20
    noise, n = st.aperture_noise(image, positions, 4.0)
    assert n == 800
    assert noise == pytest.approx(3.0 * math.sqrt(math.pi * 16), rel=0.08)


def test_zero_point_and_channel_factors():
    mag = np.array([14.0, 15.0, 16.0, 17.0])
    flux = 60.0 * 10 ** (-0.4 * (mag - 21.5))
    zp, scatter, n = st.zero_point(flux, mag, 60.0)
    assert zp == pytest.approx(21.5) and scatter == pytest.approx(0.0, abs=1e-9) and n == 4
    zps = {"g": 21.6, "r": 21.5, "i": 21.1}
    factors = st.channel_factors(zps, {"g": 60.0, "r": 60.0, "i": 120.0},
                                 white_mags={"g": 0.44, "r": 0.0, "i": -0.11}, reference="r")
    assert factors["r"] == 1.0
    # A star with the white point's colours gives equal channels.
    star = {"g": 15.44, "r": 15.0, "i": 14.89}
    exptime = {"g": 60.0, "r": 60.0, "i": 120.0}
    channels = {b: exptime[b] * 10 ** (-0.4 * (star[b] - zps[b])) * factors[b] for b in zps}
    np.testing.assert_allclose(list(channels.values()), channels["r"], rtol=1e-12)


def test_common_region():
    a = np.ones((50, 60))
    b = np.ones((50, 60))
    a[:5] = 0
    b[:, -7:] = 0
    rows, cols = st.common_region([a, b])
    assert (rows.start, rows.stop, cols.start, cols.stop) == (5, 50, 0, 53)
