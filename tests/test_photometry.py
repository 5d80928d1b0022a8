"""Unit tests of datared.photometry on small synthetic star fields (tests/synthetic.py).

The background (``estimate_background``) and the separable smoothing now live in
datared.detection; the photometry depends on them, so their checks stay here.
"""

from __future__ import annotations

import math
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import QTable, Table
from astropy.wcs import WCS
from photutils.aperture import ApertureStats, CircularAperture
from scipy.spatial import cKDTree

from datared import photometry as ph
from datared.detection import BackgroundModel, convolve_for_detection, estimate_background
from datared.errors import FrameError
from datared.frame import Frame, HeaderKeys, has_celestial_wcs, read_frame
from datared.reduction import CalibrationTerms
from tests.synthetic import synthetic_star_field


def simple_wcs(shape, scale_arcsec=0.6, ra=88.0, dec=32.5, rotation_deg=0.0):
    """A TAN WCS centred on the image."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    scale = scale_arcsec / 3600.0
    wcs.wcs.cd = [[-scale * c, scale * s], [scale * s, scale * c]]
    return wcs


def isolated(stars, distance_pix):
    """True for stars without a neighbour closer than ``distance_pix``."""
    xy = np.column_stack([stars["x"], stars["y"]])
    distance, _ = cKDTree(xy).query(xy, k=2)
    return distance[:, 1] > distance_pix


@pytest.fixture(scope="module")
def field():
    image, stars = synthetic_star_field((300, 320), 40, fwhm_pix=3.5, sky_adu=300.0,
                                        gain_e_per_adu=1.0, read_noise_e=5.0,
                                        flux_range_adu=(3e3, 1e5), margin=12, seed=7)
    return image, stars


# --- column names --------------------------------------------------------------------------

def test_radius_tags_and_column_names():
    assert ph.radius_tag(3) == "3p0"
    assert ph.radius_tag(2.25) == "2p25"
    assert ph.radius_tag(6.0) == "6p0"
    assert ph.column_name("sum_err", 4) == "sum_err_4p0"
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            ph.radius_tag(bad)
    with pytest.raises(ValueError, match="unknown column kind"):
        ph.column_name("flux", 3)


def test_columns_survive_a_fits_round_trip(tmp_path, field):
    image, stars = field
    background = estimate_background(image, box_size=32)
    table = ph.forced_photometry(image, stars["x"], stars["y"], [2, 3.5], pixel_scale_arcsec=0.6,
                                 background=background, gain_e_per_adu=1.0, read_noise_e=5.0)
    table.meta["DATE-OBS"] = "2024-02-15T20:00:00"
    path = ph.write_catalog(table, tmp_path / "frame.fits")
    back = Table.read(path)
    for name in ("sum_2p0", "sum_err_3p5", "max_3p5", "back_sum_2p0", "saturated", "flags",
                 "flags_2p0", "flags_3p5"):
        assert name in back.colnames
    np.testing.assert_array_equal(back["sum_3p5"], table["sum_3p5"])
    assert back.meta["DATE-OBS"] == "2024-02-15T20:00:00"
    assert back.meta["APRADII"] == "2,3.5"
    assert ph.write_catalog(table, tmp_path / "frame.fits") == path  # reruns overwrite


# --- fast sums against photutils --------------------------------------------------------

def test_fast_sums_equal_photutils_aperture_stats(field):
    image, stars = field
    rng = np.random.default_rng(3)
    background = 300.0 + rng.normal(0, 2.0, image.shape)
    mask = np.zeros(image.shape, bool)
    mask[100:103, 50:200] = True
    mask[243:258, 23:38] = True  # a block that covers the small apertures of the last star
    x = np.append(np.asarray(stars["x"]), [1.2, 318.4, 160.3, 30.0])  # two cut by the edges
    y = np.append(np.asarray(stars["y"]), [150.0, 298.9, 101.4, 250.0])  # one on the masked
    radii = [2.0, 3.3, 5.0, 8.5]  # rows, one inside the masked block
    fast = ph.aperture_photometry_fast(image, x, y, radii, background=background, mask=mask)
    for k, radius in enumerate(radii):
        aperture = CircularAperture(np.column_stack([x, y]), r=radius)
        on_data = ApertureStats(image, aperture, mask=mask)
        on_background = ApertureStats(background, aperture, mask=mask)
        # NaN equals NaN here (assert_allclose's default): a fully masked aperture is NaN
        np.testing.assert_allclose(fast["data_sum"][:, k], on_data.sum, rtol=1e-10)
        np.testing.assert_allclose(fast["back_sum"][:, k], on_background.sum, rtol=1e-10)
        np.testing.assert_allclose(fast["sum"][:, k], on_data.sum - on_background.sum,
                                   rtol=1e-9, atol=1e-6)
        np.testing.assert_array_equal(fast["max"][:, k], on_data.max)
    assert fast["edge"][-4, -1] and fast["edge"][-3, -1] and not fast["edge"][-2].any()
    assert fast["bad_pixels"][-2, -1]
    # radii 2, 3.3, 5 px lie inside the 20 x 20 masked block, 8.5 px reaches out of it
    assert np.isnan(fast["sum"][-1, :3]).all() and np.isnan(fast["sum_err"][-1, :3]).all()
    assert np.isnan(fast["max"][-1, :3]).all() and np.isfinite(fast["sum"][-1, 3])
    assert fast["bad_pixels"][-1].all() and not fast["off_frame"][-1]


def test_off_frame_positions_give_nan_and_a_flag(field):
    image, _ = field
    fast = ph.aperture_photometry_fast(image, [-5.0, 50.0, np.nan], [10.0, 50.0, 3.0], [3.0],
                                       background=300.0)
    assert fast["off_frame"].tolist() == [True, False, True]
    assert np.isnan(fast["sum"][0, 0]) and np.isnan(fast["sum"][2, 0])
    assert np.isfinite(fast["sum"][1, 0])


# --- noise model --------------------------------------------------------------------------

def test_ccd_variance_terms():
    variance = ph.ccd_variance(2.0, 4.0, flat=0.5, dark_adu=10.0)
    cut = np.array([[[300.0]]])
    back = np.array([[[100.0]]])
    index = np.zeros((1, 1), int)
    # raw electrons: g*F*S = 2*0.5*300 = 300, dark 20, read 16 -> 336 e-; in calibrated ADU
    # divide by (g*F)**2 = 1.
    assert variance(cut, back, index, index)[0, 0, 0] == pytest.approx(336.0)
    # negative source signal does not reduce the variance below sky + dark + read noise
    assert variance(np.array([[[50.0]]]), back, index, index)[0, 0, 0] == pytest.approx(136.0)


def test_predicted_errors_match_the_scatter_of_repeated_measurements():
    """Many noise realisations of the same stars: normalised residuals have std ~ 1."""
    normalised = []
    for seed in range(4):
        image, stars = synthetic_star_field((256, 256), 25, fwhm_pix=3.0, sky_adu=500.0,
                                            gain_e_per_adu=1.5, read_noise_e=6.0,
                                            flux_range_adu=(2e3, 2e5), margin=15,
                                            seed=100 + seed)
        background = estimate_background(image, box_size=32)
        table = ph.forced_photometry(image, stars["x"], stars["y"], [6.0], pixel_scale_arcsec=1.0,
                                     background=background, gain_e_per_adu=1.5, read_noise_e=6.0)
        keep = isolated(stars, 16)
        normalised.append(((table["sum_6p0"] - stars["flux"]) / table["sum_err_6p0"])[keep])
    normalised = np.concatenate(normalised)
    assert len(normalised) > 60
    assert 0.8 < np.std(normalised) < 1.2
    assert abs(np.mean(normalised)) < 0.35


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_background_is_unbiased_and_its_error_is_honest(method):
    rng = np.random.default_rng(11)
    maps, errors = [], []
    for _ in range(40):
        image = rng.normal(100.0, 10.0, (192, 192))
        background = estimate_background(image, box_size=32, filter_size=3, method=method)
        maps.append(background.background[96, 96])
        errors.append(background.error[96, 96])
    scatter = np.std(maps)
    assert abs(np.mean(maps) - 100.0) < 3 * scatter / math.sqrt(len(maps)) + 0.02
    assert 0.7 < np.mean(errors) / scatter < 1.5


@pytest.mark.parametrize("method", ["sep", "photutils"])
def test_background_ignores_stars(field, method):
    image, _ = field
    background = estimate_background(image, box_size=32, method=method)
    assert background.median == pytest.approx(300.0, abs=1.0)
    assert background.rms_median == pytest.approx(math.sqrt(300.0 + 25.0), rel=0.1)


def test_sep_and_photutils_backgrounds_agree(field):
    """The default (sep) map against photutils' on a star field: within a few hundredths of
    the noise per pixel (chapter 04 checks the same tolerance on its reference frame)."""
    image, _ = field
    fast = estimate_background(image, box_size=32)
    slow = estimate_background(image, box_size=32, method="photutils")
    difference = np.abs(fast.background - slow.background) / slow.rms
    assert np.median(difference) < 0.03
    assert np.percentile(difference, 99) < 0.15
    assert np.max(difference) < 0.35  # the frame's edges, where the two extrapolate differently
    assert np.median(fast.rms / slow.rms) == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_background(image, method="mean")


# --- flags --------------------------------------------------------------------------------

def test_saturation_is_judged_in_raw_adu_even_when_masked():
    image = np.full((60, 60), 100.0)
    image[30, 30] = 30000.0  # calibrated value of the brightest pixel
    flat = np.full(image.shape, 1.0)
    bias, dark = 1000.0, 50.0
    mask = np.zeros(image.shape, bool)
    mask[30, 30] = True  # chapter 02 masks saturated pixels
    # raw = 30000 * flat + bias + dark = 31050 < 40000: not saturated
    level = ph.saturation_level(40000.0, bias_adu=bias, dark_adu=dark, flat=flat)
    fast = ph.aperture_photometry_fast(image, [30.0], [30.0], [3.0], background=100.0,
                                       saturation=level,
                                       mask=mask)
    assert not fast["saturated"][0, 0]
    # a flat of 1.4 at that pixel: raw = 42050 > 40000 -> saturated although calibrated is lower
    flat[30, 30] = 1.4
    level = ph.saturation_level(40000.0, bias_adu=bias, dark_adu=dark, flat=flat)
    fast = ph.aperture_photometry_fast(image, [30.0], [30.0], [3.0], background=100.0,
                                       saturation=level,
                                       mask=mask)
    assert fast["saturated"][0, 0]
    assert fast["bad_pixels"][0, 0]


def test_forced_photometry_flags_and_bits(field):
    image, stars = field
    background = estimate_background(image, box_size=32)
    x = np.append(np.asarray(stars["x"]), [2.0, -40.0])
    y = np.append(np.asarray(stars["y"]), [150.0, 10.0])
    crowded = np.zeros(len(x), bool)
    crowded[0] = True
    table = ph.forced_photometry(image, x, y, [3.0], pixel_scale_arcsec=1.0, background=background,
                                 gain_e_per_adu=1.0, read_noise_e=5.0,
                                 saturation_adu=float(np.max(image)) - 1.0, crowded=crowded)
    brightest = int(np.argmax(stars["flux"]))
    assert table["saturated"][brightest]
    assert table["edge"][-2] and table["off_frame"][-1]
    assert table["flags"][0] & ph.FLAG_BITS["crowded"]
    assert table["flags"][-1] == ph.FLAG_BITS["off_frame"]
    expected = sum(np.where(table[name], bit, 0) for name, bit in ph.FLAG_BITS.items())
    np.testing.assert_array_equal(table["flags"], expected)
    np.testing.assert_array_equal(table["flags_3p0"], table["flags"])  # one radius


def test_flags_are_given_per_aperture_radius():
    image = np.full((80, 80), 100.0)
    mask = np.zeros(image.shape, bool)
    mask[40, 45] = True  # 5 pixels right of the star
    background = BackgroundModel(np.full(image.shape, 100.0), np.full(image.shape, 10.0),
                                    np.full(image.shape, 0.1), 32, 3)
    table = ph.forced_photometry(image, [40.0, 76.0], [40.0, 40.0], [2.0, 6.0],
                                 pixel_scale_arcsec=1.0, background=background,
                                 gain_e_per_adu=1.0, read_noise_e=5.0, mask=mask,
                                 fill_masked=False)
    assert table["flags_2p0"][0] == 0
    assert table["flags_6p0"][0] == ph.FLAG_BITS["bad_pixels"] == table["flags"][0]
    assert table["flags_2p0"][1] == 0 and table["flags_6p0"][1] == ph.FLAG_BITS["edge"]
    assert ph.column_name("flags", 6) == "flags_6p0"


def test_contamination_grows_with_neighbour_brightness_and_proximity():
    x = np.array([0.0, 100.0, 4.0, 300.0, 310.0])
    y = np.zeros(5)
    flux = np.array([1000.0, 1000.0, 1000.0, 1000.0, 10.0])
    result = ph.contamination(x, y, flux, radius_pix=5.0, fwhm_pix=3.0)
    assert result[1] == 0.0  # alone
    assert result[0] > 0.2 and result[2] > 0.2  # an equal star 4 px away
    assert 0 < result[3] < 1e-3 and result[4] > result[3]  # faint far neighbour / bright one


# --- the reference catalogue ---------------------------------------------------------------

def frame_of(image, wcs=None, mask=None, name="ref.fits", **cards):
    """A :class:`Frame` in memory with a NINA-like header."""
    header = wcs.to_header() if wcs is not None else fits.Header()
    header.update({"OBJECT": "TEST", "FILTER": "r", "EXPTIME": 60.0, "AIRMASS": 1.2,
                   "DATE-OBS": "2024-02-15T20:00:00", "PIERSIDE": "East", **cards})
    return Frame(Path(name), np.asarray(image, np.float32), header, wcs, mask)


@pytest.fixture(scope="module")
def reference_of_field(field):
    image, stars = field
    wcs = simple_wcs(image.shape, rotation_deg=30.0)
    frame = frame_of(image, wcs)
    return frame, ph.reference_catalog(frame, fwhm_pix=3.5, max_radius_arcsec=3.0,
                                       gain_e_per_adu=1.0, min_snr=10)


def test_reference_catalog_has_the_detection_columns(reference_of_field):
    _, table = reference_of_field
    for name in ("id", "x", "y", "sky", "flux", "flux_err", "snr", "sigma_xy", "peak", "fwhm",
                 "ellipticity", "contamination", "crowded"):
        assert name in table.colnames, name
    for old in ("x_centroid_win", "y_centroid_win", "sky_centroid_win", "segment_flux",
                "max_value", "segment_label", "saturated"):
        assert old not in table.colnames, old
    assert np.all(np.diff(table["flux"]) <= 0)  # brightest first
    assert np.all(table["snr"] >= 10) and list(table["id"]) == list(range(1, len(table) + 1))
    assert table.meta["FWHMPIX"] == 3.5 and table.meta["PIXSCALE"] == pytest.approx(0.6)
    assert table.meta["SKYRMS"] == pytest.approx(math.sqrt(300.0 + 25.0), rel=0.1)
    assert "fwhm_px" not in table.meta and "sky_rms" not in table.meta  # FITS-friendly names


def test_reference_catalog_finds_the_stars_at_their_positions(field, reference_of_field):
    image, stars = field
    frame, table = reference_of_field
    xy = np.column_stack([stars["x"], stars["y"]])
    distance, _ = cKDTree(xy).query(np.column_stack([table["x"], table["y"]]))
    assert np.mean(distance < 0.2) > 0.9
    assert len(table) >= 0.9 * len(stars)
    true_sky = frame.wcs.pixel_to_world(stars["x"], stars["y"])
    index, matched, separation = ph.match_to_catalog(table["sky"], true_sky, max_sep_arcsec=0.3)
    assert matched.mean() > 0.9


def test_reference_catalog_flux_cut_removes_faint_sources(field):
    image, _ = field
    frame = frame_of(image, simple_wcs(image.shape))
    loose = ph.reference_catalog(frame, fwhm_pix=3.5, max_radius_arcsec=3.0, gain_e_per_adu=1.0,
                                 min_snr=5)
    strict = ph.reference_catalog(frame, fwhm_pix=3.5, max_radius_arcsec=3.0, gain_e_per_adu=1.0,
                                  min_snr=200)
    assert 0 < len(strict) < len(loose)
    assert np.all(strict["snr"] >= 200)
    assert strict.meta["MINSNR"] == 200


def test_reference_catalog_uses_the_photometric_background_and_the_given_settings(field,
                                                                                  monkeypatch):
    """reference_catalog calls datared.detection.detect_stars with estimate_background's map
    and passes every setting through under the detection's names."""
    image, _ = field
    frame = frame_of(image, simple_wcs(image.shape), mask=np.zeros(image.shape, bool))
    seen = {}
    real = ph.detect_stars

    def spy(data, **kwargs):
        seen.update(kwargs)
        return real(data, **kwargs)

    monkeypatch.setattr(ph, "detect_stars", spy)
    ph.reference_catalog(frame, fwhm_pix=3.2, max_radius_arcsec=3.0, gain_e_per_adu=1.7,
                         nsigma=4.0, n_pixels=7, min_snr=12.0, box_size=32, filter_size=3)
    assert isinstance(seen["background"], BackgroundModel) and seen["background"].box_size == 32
    expected = estimate_background(image, box_size=32, filter_size=3, mask=frame.mask)
    np.testing.assert_array_equal(seen["background"].background, expected.background)
    assert seen["mask"] is frame.mask and seen["wcs"] is frame.wcs
    assert (seen["fwhm_px"], seen["nsigma"], seen["min_pixels"], seen["min_snr"],
            seen["gain_e_per_adu"]) == (3.2, 4.0, 7, 12.0, 1.7)


def test_cosmic_rays_are_not_in_the_reference_catalog(field):
    image, stars = field
    image = image.copy()
    hits = [(40, 250), (200, 60), (150, 151)]  # (y, x) single-pixel hits and a short track
    for y, x in hits:
        image[y, x] += 3000.0
    image[150, 152] += 2000.0
    cleaned = ph.reference_catalog(frame_of(image, simple_wcs(image.shape)), fwhm_pix=3.5,
                                   max_radius_arcsec=3.0, gain_e_per_adu=1.0, min_snr=5)
    xy = np.column_stack([cleaned["x"], cleaned["y"]])
    distance, _ = cKDTree(xy).query([(x, y) for y, x in hits])
    assert np.all(distance > 3), "a cosmic ray survived as a star"
    true_xy = np.column_stack([stars["x"], stars["y"]])
    kept, _ = cKDTree(true_xy).query(xy)
    assert np.all(kept < 1.0) and len(cleaned) >= 0.9 * len(stars)


def test_reference_catalog_refuses_frames_without_wcs_or_stars():
    noise = np.random.default_rng(4).normal(100.0, 5.0, (128, 128))
    with pytest.raises(FrameError, match="needs a WCS"):
        ph.reference_catalog(frame_of(noise), fwhm_pix=3.5, max_radius_arcsec=3.0,
                             gain_e_per_adu=1.0)
    with pytest.raises(FrameError, match="no star with S/N >= 10"):
        ph.reference_catalog(frame_of(noise, simple_wcs(noise.shape)), fwhm_pix=3.5,
                             max_radius_arcsec=3.0, gain_e_per_adu=1.0)


def test_metadata_use_nina_names_whatever_the_camera_wrote(field):
    """keys (HeaderKeys.from_settings(config) in the chapter) say where the values are."""
    image, stars = field
    wcs = simple_wcs(image.shape)
    header = wcs.to_header()
    header.update({"DATE-LOC": "2024-02-15T20:00:00", "EXPOSURE": 30.0, "FILTER": "r",
                   "OBJECT": "TEST", "ALT-AIRM": 1.3})
    frame = Frame(Path("other.fits"), image, header, wcs, None)
    keys = HeaderKeys(date="DATE-LOC", exptime="EXPOSURE", airmass="ALT-AIRM")
    reference = ph.reference_catalog(frame, fwhm_pix=3.5, max_radius_arcsec=3.0,
                                     gain_e_per_adu=1.0, keys=keys)
    assert reference.meta["DATE-OBS"] == "2024-02-15T20:00:00"
    assert reference.meta["EXPTIME"] == 30.0 and "EXPOSURE" not in reference.meta
    table = ph.measure_frame(frame, reference, [3.0], calibration=CalibrationTerms(0.0, 0.0, 1.0),
                             gain_e_per_adu=1.0, read_noise_e=5.0, saturation_adu=6e4,
                             keys=keys, aperture_mm=350.0)
    assert table.meta["EXPTIME"] == 30.0 and table.meta["AIRMASS"] == 1.3
    assert table.meta["SCINT"] == pytest.approx(ph.scintillation_sigma(1.3, 30.0, aperture_mm=350.0))
    # with NINA's names the camera's keywords are not found: no metadata, no SCINT
    plain = ph.measure_frame(frame, reference, [3.0], calibration=CalibrationTerms(0.0, 0.0, 1.0),
                             gain_e_per_adu=1.0, read_noise_e=5.0, saturation_adu=6e4,
                             aperture_mm=350.0)
    assert "EXPTIME" not in plain.meta and "SCINT" not in plain.meta


# --- star sizes and the reference frame ---------------------------------------------------

def test_frame_quality_counts_sources_and_measures_the_seeing(field):
    image, stars = field
    quality = ph.frame_quality(frame_of(image), saturation_adu=float(np.max(image)))
    assert set(quality) == {"n_sources", "fwhm_pix", "ellipticity", "sky_adu", "sky_rms_adu"}
    assert 0.8 * len(stars) <= quality["n_sources"] <= 1.1 * len(stars)
    assert quality["fwhm_pix"] == pytest.approx(3.5, rel=0.1)
    assert quality["sky_adu"] == pytest.approx(300.0, abs=2.0)
    blurred, _ = synthetic_star_field((300, 320), 40, fwhm_pix=5.0, sky_adu=300.0,
                                      flux_range_adu=(3e3, 1e5), margin=12, seed=7)
    worse = ph.frame_quality(frame_of(blurred))
    assert worse["fwhm_pix"] > quality["fwhm_pix"] + 1.0


def test_frame_quality_is_the_detection_with_the_frames_mask(field, monkeypatch):
    """frame_quality counts detect_stars' stars above min_snr, takes its FWHM (meta) and
    passes the frame's mask and the saturation level above the sky."""
    image, _ = field
    mask = np.zeros(image.shape, bool)
    mask[100:104, 40:60] = True
    seen = {}
    real = ph.detect_stars

    def spy(data, **kwargs):
        seen.update(kwargs)
        seen["result"] = real(data, **kwargs)
        return seen["result"]

    monkeypatch.setattr(ph, "detect_stars", spy)
    quality = ph.frame_quality(frame_of(image, mask=mask), saturation_adu=6e4, min_snr=20.0)
    assert seen["mask"] is mask and seen["min_snr"] == 20.0
    assert seen["saturation_adu"] == pytest.approx(6e4 - quality["sky_adu"])
    assert quality["n_sources"] == len(seen["result"])
    assert np.all(seen["result"]["snr"] >= 20.0)
    assert quality["fwhm_pix"] == seen["result"].meta["fwhm_px"]


def test_choose_reference_prefers_sharp_frames_among_deep_ones():
    quality = Table({"n_sources": [100, 95, 40, 99], "fwhm_pix": [4.0, 3.5, 2.0, np.nan]})
    assert ph.choose_reference(quality) == 1
    assert ph.choose_reference(quality, depth_fraction=0.99) == 0
    with pytest.raises(ValueError, match="no frame"):
        ph.choose_reference(Table({"n_sources": [0], "fwhm_pix": [3.0]}))


# --- frames on disk -----------------------------------------------------------------------

def write_frame(path, image, wcs=None, mask=None, **cards):
    header = wcs.to_header() if wcs is not None else fits.Header()
    header.update({"OBJECT": "TEST", "FILTER": "r", "EXPTIME": 60.0, "AIRMASS": 1.2,
                   "DATE-OBS": "2024-02-15T20:00:00", "PIERSIDE": "East", **cards})
    hdus = [fits.PrimaryHDU(image.astype(np.float32), header)]
    if mask is not None:
        hdus.append(fits.ImageHDU(mask.astype(np.uint8), name="MASK"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def test_reference_and_forced_photometry_across_a_rotated_frame(tmp_path):
    shape = (240, 260)
    image, stars = synthetic_star_field(shape, 30, fwhm_pix=3.5, sky_adu=200.0, margin=15,
                                        flux_range_adu=(5e3, 1e5), seed=21)
    wcs = simple_wcs(shape)
    ref_frame = read_frame(write_frame(tmp_path / "ref.fits", image, wcs))
    assert ref_frame.pixel_scale_arcsec == pytest.approx(0.6)
    reference = ph.reference_catalog(ref_frame, fwhm_pix=3.5, max_radius_arcsec=3.0,
                                     gain_e_per_adu=1.0)
    assert {"sky", "crowded", "contamination"} <= set(reference.colnames)
    path = ph.write_catalog(reference, tmp_path / "ref_catalog_TEST.fits")
    reference = QTable.read(path)
    assert reference["sky"].ra.unit == u.deg
    assert reference.meta["OBJECT"] == "TEST" and reference.meta["FRAME"] == "ref.fits"

    # The same sky after a meridian flip: image rotated by 180 degrees, WCS rotated with it.
    flipped = image[::-1, ::-1]
    flipped_wcs = simple_wcs(shape, rotation_deg=180.0)
    # crpix stays at the centre, so pixel (i, j) -> (n-1-i, m-1-j): the same stars
    mask = np.zeros(shape, bool)
    mask[5, 5] = True
    frame = read_frame(write_frame(tmp_path / "flip.fits", flipped, flipped_wcs, mask,
                                   PIERSIDE="West"))
    assert frame.mask is not None and frame.mask[5, 5]
    calibration = CalibrationTerms(bias=0.0, dark=0.0, flat=1.0)
    table_ref = ph.measure_frame(ref_frame, reference, [3.0], calibration=calibration,
                                 gain_e_per_adu=1.0, read_noise_e=5.0, saturation_adu=6e4,
                                 measure_fwhm=True, aperture_mm=350.0)
    table_flip = ph.measure_frame(frame, reference, [3.0], calibration=calibration,
                                  gain_e_per_adu=1.0, read_noise_e=5.0, saturation_adu=6e4)
    np.testing.assert_allclose(table_flip["x"], shape[1] - 1 - table_ref["x"], atol=1e-6)
    np.testing.assert_allclose(table_flip["sum_3p0"], table_ref["sum_3p0"], rtol=0.02)
    assert table_flip.meta["PIERSIDE"] == "West" and table_ref.meta["PIERSIDE"] == "East"
    assert table_ref.meta["FWHM"] == pytest.approx(3.5 * 0.6, rel=0.1)
    assert 0 < table_ref.meta["SCINT"] < 0.01
    assert list(table_flip["id"]) == list(reference["id"])


def test_measure_file_gives_the_same_catalogues_with_two_workers(tmp_path):
    from datared.parallel import map_frames

    shape = (200, 220)
    image, _ = synthetic_star_field(shape, 25, fwhm_pix=3.5, sky_adu=200.0, margin=15,
                                    flux_range_adu=(5e3, 1e5), seed=4)
    wcs = simple_wcs(shape)
    paths = [write_frame(tmp_path / f"f{i}.fits", image + i, wcs, OBJECT="Test field")
             for i in range(3)]
    broken = tmp_path / "broken.fits"
    broken.write_bytes(paths[0].read_bytes()[:4000])
    reference = ph.reference_catalog(read_frame(paths[0]), fwhm_pix=3.5, max_radius_arcsec=3.0,
                                     gain_e_per_adu=1.0)
    key = ("r", 60.0)
    written = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        tasks = [(p, out / p.name, key) for p in [*paths, broken]]
        shared = {"target": "TEST", "reference": reference, "work_dir": tmp_path,
                  "calibrations": {key: CalibrationTerms(bias=0.0, dark=0.0, flat=1.0)},
                  "options": {"radii_arcsec": [3.0], "gain_e_per_adu": 1.0,
                              "read_noise_e": 5.0, "saturation_adu": 6e4,
                              "measure_fwhm": True}}
        outcomes = list(map_frames(ph.measure_file, tasks, shared=shared, workers=workers,
                                   show_progress=False))
        assert [o.error is None for o in outcomes] == [True, True, True, False]
        written[workers] = [o.value.read_bytes() for o in outcomes[:3]]
        table = QTable.read(outcomes[0].value)
        assert table.meta["OBJECT"] == "TEST" and table.meta["HDROBJ"] == "Test field"
        assert table.meta["REFCAT"] == "ref_catalog_TEST.fits"
    assert written[1] == written[2]


def test_frames_without_wcs_or_overlap_are_refused(tmp_path):
    image, _ = synthetic_star_field((100, 100), 5, seed=1)
    reference = QTable()
    reference["id"] = [1]
    reference["sky"] = simple_wcs((100, 100)).pixel_to_world([50.0], [50.0])
    calibration = CalibrationTerms(bias=0.0, dark=0.0, flat=1.0)
    no_wcs = read_frame(write_frame(tmp_path / "a.fits", image))
    assert no_wcs.wcs is None
    with pytest.raises(FrameError, match="no WCS"):
        ph.measure_frame(no_wcs, reference, [3.0], calibration=calibration, gain_e_per_adu=1.0,
                         read_noise_e=5.0, saturation_adu=6e4)
    elsewhere = read_frame(write_frame(tmp_path / "b.fits", image,
                                       simple_wcs((100, 100), ra=120.0)))
    with pytest.raises(FrameError, match="none of the reference positions"):
        ph.measure_frame(elsewhere, reference, [3.0], calibration=calibration,
                         gain_e_per_adu=1.0, read_noise_e=5.0, saturation_adu=6e4)


def test_scintillation_follows_youngs_formula():
    sigma = ph.scintillation_sigma(1.0, 60.0, aperture_mm=350.0, height_m=0.0)
    assert sigma == pytest.approx(0.09 * 35 ** (-2 / 3) / math.sqrt(120.0))
    assert ph.scintillation_sigma(2.0, 60.0, aperture_mm=350.0) / sigma == pytest.approx(2**1.75)
    assert ph.scintillation_sigma(1.0, 240.0, aperture_mm=350.0) / sigma == pytest.approx(0.5)
    assert ph.scintillation_sigma(1.0, 60.0, aperture_mm=175.0) / sigma == pytest.approx(
        2 ** (2 / 3))
    assert ph.scintillation_sigma(1.0, 60.0, aperture_mm=350.0, height_m=8000.0) == pytest.approx(
        sigma / math.e)


def test_separable_smoothing_equals_the_2d_kernel_convolution(field):
    from photutils.segmentation import make_2dgaussian_kernel
    from scipy import ndimage

    image, _ = field
    fast = convolve_for_detection(image - 300.0, 3.5)
    kernel = make_2dgaussian_kernel(3.5, size=2 * math.ceil(1.5 * 3.5) + 1).array
    slow = ndimage.convolve(image - 300.0, kernel, mode="constant", cval=0.0)
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-3)


def test_has_celestial_wcs():
    assert has_celestial_wcs(simple_wcs((10, 10)).to_header())
    assert not has_celestial_wcs(fits.Header({"OBJECT": "M37"}))


def test_masked_pixels_are_filled_from_their_mirror_image():
    image, stars = synthetic_star_field((60, 60), 1, fwhm_pix=4.0, sky_adu=100.0,
                                        flux_range_adu=(1e5, 1e5), margin=25, seed=2,
                                        noise=False)
    x, y = float(stars["x"][0]), float(stars["y"][0])
    mask = np.zeros(image.shape, bool)
    mask[int(round(y)) + 1, int(round(x)) - 2: int(round(x)) + 1] = True  # three core pixels
    mask[int(round(y)) - 5, int(round(x)) + 4] = True  # one in the wings
    clean = ph.aperture_photometry_fast(image, [x], [y], [3.0, 8.0], background=100.0)
    holes = ph.aperture_photometry_fast(image, [x], [y], [3.0, 8.0], background=100.0, mask=mask)
    filled = ph.aperture_photometry_fast(image, [x], [y], [3.0, 8.0], background=100.0, mask=mask,
                                         fill_masked=True)
    assert np.all(holes["sum"] < 0.95 * clean["sum"]) and holes["bad_pixels"].all()
    np.testing.assert_allclose(filled["sum"], clean["sum"], rtol=0.01)
    assert not filled["bad_pixels"].any()
    # a masked mirror pixel cannot fill: the flag stays
    mask[int(round(2 * y - (y + 1))), int(round(2 * x - x))] = True
    mask[int(round(y)) - 1, int(round(x)) - 1: int(round(x)) + 3] = True
    partly = ph.aperture_photometry_fast(image, [x], [y], [3.0], background=100.0, mask=mask,
                                         fill_masked=True)
    assert partly["bad_pixels"].all()


def test_synthetic_star_field_puts_the_exact_flux_in_each_star():
    image, stars = synthetic_star_field((80, 80), 1, fwhm_pix=3.0, sky_adu=10.0,
                                        flux_range_adu=(1e4, 1e4), margin=30, noise=False)
    assert float(np.sum(image - 10.0)) == pytest.approx(1e4, rel=1e-4)
    assert image.dtype == np.float32 and len(stars) == 1


# ---------------------------------------------------------------------------------------
# Frame quality over the night
# ---------------------------------------------------------------------------------------

def test_relative_transparency_finds_a_cloudy_frame():
    rng = np.random.default_rng(3)
    flux = rng.uniform(1e3, 1e5, 40)[None, :] * rng.normal(1.0, 0.01, (12, 40))
    flux[4] *= 0.4
    flux[7, :5] = np.nan  # some stars not measured on one frame
    transparency = ph.relative_transparency(flux)
    assert transparency[4] == pytest.approx(0.4, rel=0.02)
    assert np.all(np.abs(np.delete(transparency, 4) - 1) < 0.02)


def test_median_ellipticity_tells_a_trailed_frame_from_a_round_one():
    from scipy.ndimage import convolve

    from datared.detection import detect_stars

    image, _ = synthetic_star_field((300, 300), n_stars=60, fwhm_pix=3.0, seed=5,
                                    flux_range_adu=(2e4, 2e5))
    round_stars = detect_stars(image, fwhm_px=3.0)
    trail = np.zeros((1, 13))
    trail[0, :] = 1 / 13  # 13 px trail along x: the mount stopped tracking for a moment
    trailed = convolve(image.astype(float), trail, mode="nearest")
    trailed_stars = detect_stars(trailed, fwhm_px=3.0)
    assert ph.median_ellipticity(round_stars) < 0.15
    assert ph.median_ellipticity(trailed_stars) > 0.5
    assert np.isnan(ph.median_ellipticity(round_stars[:2]))


def _quality_catalog(path, *, scale=1.0, fwhm=1.5, ellip=0.05, sky=100.0, n=30, seed=0):
    rng = np.random.default_rng(seed)
    flux = np.geomspace(2e4, 2e6, n) * scale * rng.normal(1, 0.005, n)
    table = Table({"id": np.arange(1, n + 1), "sum_3p0": flux,
                   "sum_err_3p0": np.sqrt(np.abs(flux)) + 10.0,
                   "flags_3p0": np.zeros(n, dtype=int)})
    table.meta.update({"FRAME": path.name, "OBJECT": "M37", "FILTER": "r", "EXPTIME": 60.0,
                       "AIRMASS": 1.2, "DATE-OBS": f"2024-02-15T20:{seed:02d}:00",
                       "FWHM": fwhm, "ELLIP": ellip, "SKY": sky})
    table.write(path, overwrite=True)
    return path


def test_frame_quality_table_flags_each_fault_with_its_reason(tmp_path):
    paths = [_quality_catalog(tmp_path / f"f{k:02d}.fits", seed=k) for k in range(8)]
    paths += [_quality_catalog(tmp_path / "cloudy.fits", scale=0.1, seed=8),
              _quality_catalog(tmp_path / "defocused.fits", fwhm=4.0, seed=9),
              _quality_catalog(tmp_path / "trailed.fits", ellip=0.6, seed=10),
              _quality_catalog(tmp_path / "twilight.fits", sky=2000.0, seed=11)]
    quality = ph.frame_quality_table(paths, radius_arcsec=3.0)
    verdict = dict(zip(quality["catalog"], quality["quality"], strict=True))
    assert all(verdict[f"f{k:02d}.fits"] == "ok" for k in range(8))
    assert "transparency 0.10" in verdict["cloudy.fits"]
    assert "FWHM 2.7 x the median" in verdict["defocused.fits"]
    assert "elongated" in verdict["trailed.fits"]
    assert "sky" in verdict["twilight.fits"]
    assert list(quality["good"]) == [True] * 8 + [False] * 4
    ph.mark_quality(quality, tmp_path)
    assert fits.getheader(tmp_path / "cloudy.fits", 1)["QUALITY"].startswith("transparency")
    assert fits.getheader(tmp_path / "f00.fits", 1)["QUALITY"] == "ok"


def test_bad_quality_frames_lists_the_bad_frames_by_frame_name(tmp_path):
    assert ph.bad_quality_frames(tmp_path) == {}  # chapter 04 has not judged the frames
    paths = [_quality_catalog(tmp_path / f"f{k:02d}.fits", seed=k) for k in range(6)]
    paths.append(_quality_catalog(tmp_path / "cloudy.fits", scale=0.1, seed=8))
    quality = ph.frame_quality_table(paths, radius_arcsec=3.0)
    quality["frame"] = [f"raw_{name}" for name in quality["catalog"]]
    quality.write(tmp_path / ph.FRAME_QUALITY_FILE, format="ascii.ecsv")
    bad = ph.bad_quality_frames(tmp_path)
    assert list(bad) == ["raw_cloudy.fits"]
    assert bad["raw_cloudy.fits"].startswith("transparency 0.10")
    quality.remove_column("good")
    quality.write(tmp_path / ph.FRAME_QUALITY_FILE, format="ascii.ecsv", overwrite=True)
    with pytest.raises(FrameError, match="frame_quality.ecsv: no column good.*04-photometry"):
        ph.bad_quality_frames(tmp_path)
    (tmp_path / ph.FRAME_QUALITY_FILE).write_text("not a table")
    with pytest.raises(FrameError, match="frame_quality.ecsv: cannot be read"):
        ph.bad_quality_frames(tmp_path)


def test_choose_reference_never_picks_a_trailed_frame():
    quality = Table({"n_sources": [100, 120, 95], "fwhm_pix": [3.0, 2.5, 3.2],
                     "ellipticity": [0.05, 0.5, 0.06]})
    assert ph.choose_reference(quality) == 1
    assert ph.choose_reference(quality, max_ellipticity=0.3) == 0
