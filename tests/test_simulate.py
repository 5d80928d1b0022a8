"""Tests of the simulated night: the physics is measured from the frames themselves.

Most tests generate the hidden ``tiny`` preset once (a few seconds). Tests marked with the
``night_dir`` / ``truth`` fixtures check the real sample night and skip if it is absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import config
from datared.io import night_collection
from datared.sim import (
    PRESETS,
    frame_wcs,
    is_current_sample_night,
    is_sample_night,
    simulate_night,
    sky,
    star_flux_adu,
)
from datared.sim.__main__ import main
from datared.sim.instrument import Camera

CAM = Camera()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny simulated night (hidden preset), generated once for this module."""
    return simulate_night(tmp_path_factory.mktemp("night") / "tiny", preset="tiny", seed=7,
                          progress=False)


def _frames(night: Path) -> Table:
    """truth/frames.ecsv with empty strings (masked on reading) filled with ''."""
    return Table.read(night / "truth" / "frames.ecsv").filled("")


def _raw(night: Path, row) -> np.ndarray:
    return fits.getdata(night / row["path"]).astype(np.float64)


def _calibrated(night: Path, row) -> np.ndarray:
    """(raw - bias - dark_current * exptime) / flat, with the truth calibration images."""
    truth = night / "truth"
    bias = fits.getdata(truth / "bias.fits").astype(np.float64)
    dark = fits.getdata(truth / "dark_current.fits").astype(np.float64)
    flat = fits.getdata(truth / f"flat_{row['filter']}.fits").astype(np.float64)
    return (_raw(night, row) - bias - dark * row["exptime"]) / flat


def _true_wcs(night: Path, file: str):
    """The true WCS of a LIGHT frame (its header-only file has NAXIS = 0: no warning)."""
    from astropy.wcs import WCS

    header = fits.getheader(night / "truth" / "wcs" / file)
    header["NAXIS"] = 2
    return WCS(header)


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _isolated_star_fluxes(night: Path, row, stars: Table, max_peak_adu: float = 40000.0,
                          min_flux_adu: float = 1e5):
    """Measured and expected total flux of isolated, unsaturated stars in one LIGHT frame."""

    params = json.loads((night / "truth" / "params.json").read_text())
    cal = _calibrated(night, row)
    ny, nx = cal.shape
    wcs = _true_wcs(night, row["file"])
    x, y = wcs.all_world2pix(np.asarray(stars["ra"]), np.asarray(stars["dec"]), 0)
    expected = star_flux_adu(stars, row["filter"], row["zeropoint"], row["exptime"],
                             row["airmass"], params["atmosphere"])
    if (night / "truth" / "lightcurves.ecsv").exists():
        lc = Table.read(night / "truth" / "lightcurves.ecsv")
        match = lc[lc["file"] == row["file"]]
        if len(match):
            expected = np.where(stars["name"] == "WASP-104", expected * match["host_flux"][0],
                                expected)
            expected = np.where(stars["name"] == "V1", expected * match["variable_flux"][0],
                                expected)
    psf = sky.Moffat(row["fwhm_arcsec"] / params["pixel_scale_arcsec"],
                     params["atmosphere"]["psf_beta"])
    r_ap = np.ceil(psf.radius_enclosing(0.995)) * np.sqrt(2) + 1.5
    r_in, r_out = r_ap + 3, r_ap + 12
    inside = (x > r_out) & (x < nx - r_out) & (y > r_out) & (y < ny - r_out)
    peak = expected * 2 * (psf.beta - 1) / (2 * np.pi * psf.alpha**2)  # Moffat peak, ADU
    yy, xx = np.mgrid[0:ny, 0:nx]
    measured, wanted = [], []
    for k in np.flatnonzero(inside & (expected > min_flux_adu) & (peak < max_peak_adu)):
        d = np.hypot(x - x[k], y - y[k])
        neighbours = (d > 0) & (d < r_out + r_ap) & (expected > 1e-3 * expected[k])
        if neighbours.any():
            continue
        y0, y1 = int(y[k] - r_out - 1), int(y[k] + r_out + 2)
        x0, x1 = int(x[k] - r_out - 1), int(x[k] + r_out + 2)
        cut = cal[y0:y1, x0:x1]
        rr = np.hypot(xx[y0:y1, x0:x1] - x[k], yy[y0:y1, x0:x1] - y[k])
        ann = cut[(rr >= r_in) & (rr < r_out)]
        med, sd = np.median(ann), np.std(ann)
        sky_level = ann[np.abs(ann - med) < 3 * sd].mean()
        ap = rr < r_ap
        measured.append((cut[ap] - sky_level).sum())
        wanted.append(expected[k])
    return np.array(measured), np.array(wanted)


# ---------------------------------------------------------------------------------------
# Layout, API and safety
# ---------------------------------------------------------------------------------------

def test_layout_and_truth_files(tiny):
    for sub in ("BIAS", "DARK", "FLAT", "LIGHT", "catalogs", "truth", "truth/wcs"):
        assert (tiny / sub).is_dir(), sub
    for name in ("params.json", "stars.ecsv", "frames.ecsv", "lightcurves.ecsv", "README.md",
                 "bias.fits", "dark_current.fits", "flat_g.fits", "flat_r.fits", "flat_i.fits"):
        assert (tiny / "truth" / name).is_file(), name
    assert (tiny / "datared.toml").is_file()  # the night's settings (tests/test_settings_file.py)
    params = json.loads((tiny / "truth" / "params.json").read_text())
    for key in ("gain_e_per_adu", "read_noise_e", "saturation_adu", "pixel_scale_arcsec",
                "seed", "cluster", "planet"):
        assert key in params
    assert params["gain_e_per_adu"] == config.gain_e_per_adu
    assert params["read_noise_e"] == config.read_noise_e
    assert params["pixel_scale_arcsec"] == config.pixel_scale_arcsec
    assert params["saturation_adu"] == 65535
    assert params["seed"] == 7
    frames = _frames(tiny)
    on_disk = sorted(str(p.relative_to(tiny)) for d in ("BIAS", "DARK", "FLAT", "LIGHT")
                     for p in (tiny / d).glob("*.fits"))
    assert sorted(frames["path"]) == on_disk
    lights = frames[frames["imagetyp"] == "LIGHT"]
    assert sorted(p.name for p in (tiny / "truth" / "wcs").iterdir()) == sorted(lights["file"])
    stars = Table.read(tiny / "truth" / "stars.ecsv")
    for col in ("id", "ra", "dec", "g", "r", "i", "member", "variable"):
        assert col in stars.colnames
    assert stars["member"].any() and stars["variable"].any()


def test_raw_frames_are_uint16_without_wcs(tiny):
    row = _frames(tiny)[-1]
    with fits.open(tiny / row["path"]) as hdul:
        assert hdul[0].data.dtype == np.dtype(">u2") or hdul[0].data.dtype == np.uint16
        header = hdul[0].header
    assert "CTYPE1" not in header and "CRVAL1" not in header
    for key in ("IMAGETYP", "FILTER", "EXPTIME", "OBJECT", "DATE-OBS", "AIRMASS", "RA", "DEC",
                "XBINNING", "YBINNING", "GAIN", "OFFSET", "SET-TEMP", "CCD-TEMP", "PIERSIDE",
                "FOCUSPOS", "FOCTEMP", "INSTRUME", "TELESCOP"):
        assert key in header, key
    assert "DATE" not in header and "CHECKSUM" not in header


def test_same_seed_gives_identical_bytes(tmp_path):
    a = simulate_night(tmp_path / "a", preset="tiny", seed=11, max_per_group=1, progress=False)
    b = simulate_night(tmp_path / "b", preset="tiny", seed=11, max_per_group=1, progress=False)
    c = simulate_night(tmp_path / "c", preset="tiny", seed=12, max_per_group=1, progress=False)
    sums_a, sums_b, sums_c = _checksums(a), _checksums(b), _checksums(c)
    assert sums_a == sums_b
    assert sums_a.keys() == sums_c.keys()
    assert sums_a["truth/bias.fits"] != sums_c["truth/bias.fits"]


def test_max_per_group_caps_each_group(tmp_path):
    night = simulate_night(tmp_path / "n", preset="tiny", seed=3, max_per_group=1,
                           progress=False)
    frames = _frames(night)
    keys = [(r["imagetyp"], r["object"], r["filter"], r["exptime"]) for r in frames]
    assert len(keys) == len(set(keys))
    assert json.loads((night / "truth" / "params.json").read_text())["max_per_group"] == 1


def test_refuses_foreign_folder_and_replaces_previous_night(tmp_path):
    foreign = tmp_path / "real-night"
    foreign.mkdir()
    (foreign / "precious.fits").write_bytes(b"data")
    with pytest.raises(FileExistsError, match="refusing"):
        simulate_night(foreign, preset="tiny", max_per_group=1, progress=False)
    assert (foreign / "precious.fits").read_bytes() == b"data"
    night = simulate_night(tmp_path / "n", preset="tiny", seed=1, max_per_group=1,
                           progress=False)
    (night / "stray.txt").write_text("left over")
    simulate_night(night, preset="tiny", seed=2, max_per_group=1, progress=False)
    assert is_sample_night(night) and not (night / "stray.txt").exists()
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*old"))


def test_cli_if_missing_skips_a_real_night(tmp_path, capsys):
    real = tmp_path / "real"
    (real / "LIGHT").mkdir(parents=True)
    (real / "LIGHT" / "frame.fits").write_bytes(b"")
    assert main(["--if-missing", "--out", str(real), "--preset", "tiny", "--seed", "1"]) == 0
    assert "real night" in capsys.readouterr().out
    assert sorted(p.name for p in real.rglob("*")) == ["LIGHT", "frame.fits"]


def test_cli_if_missing_generates_once(tmp_path, capsys):
    out = tmp_path / "night"
    args = ["--if-missing", "--out", str(out), "--preset", "tiny", "--seed", "5",
            "--max-per-group", "1", "--no-progress"]
    assert main(args) == 0
    assert "Generating" in capsys.readouterr().out
    assert is_current_sample_night(out, "tiny", 5, max_per_group=1)
    assert not is_current_sample_night(out, "tiny", 6, max_per_group=1)
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_night_of_the_former_module_is_a_sample_night_but_not_current(tmp_path):
    night = simulate_night(tmp_path / "n", preset="tiny", seed=1, max_per_group=1,
                           progress=False)
    params_path = night / "truth" / "params.json"
    params = json.loads(params_path.read_text())
    assert params["generator"] == "datared.sim"
    params["generator"] = "datared.simulate"
    params_path.write_text(json.dumps(params))
    assert is_sample_night(night)
    assert not is_current_sample_night(night, "tiny", 1, max_per_group=1)


def test_unknown_preset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        simulate_night(tmp_path / "x", preset="huge")


# ---------------------------------------------------------------------------------------
# Detector physics measured from the frames
# ---------------------------------------------------------------------------------------

def test_bias_noise_is_read_noise_over_gain(tiny):
    frames = _frames(tiny)
    bias = [_raw(tiny, r) for r in frames[frames["imagetyp"] == "BIAS"]]
    noise = np.std(bias[0] - bias[1]) / np.sqrt(2)
    expected = np.sqrt((CAM.read_noise_e / CAM.gain_e_per_adu) ** 2 + 1 / 12)  # + rounding
    assert noise == pytest.approx(expected, rel=0.03)
    truth_bias = fits.getdata(tiny / "truth" / "bias.fits")
    assert np.mean(bias) == pytest.approx(truth_bias.mean(), abs=0.5)
    # The fixed column pattern is in every frame: column means correlate with the truth.
    cols = np.mean(bias, axis=(0, 1))
    assert np.corrcoef(cols, truth_bias.mean(axis=0))[0, 1] > 0.9


def test_dark_signal_scales_with_exposure_time(tiny):
    frames = _frames(tiny)
    darks = frames[frames["imagetyp"] == "DARK"]
    truth = tiny / "truth"
    bias = fits.getdata(truth / "bias.fits").astype(np.float64)
    rate = fits.getdata(truth / "dark_current.fits").astype(np.float64)
    stacks = {t: np.median([_raw(tiny, r) for r in darks[darks["exptime"] == t]], axis=0) - bias
              for t in sorted(set(darks["exptime"]))}
    (t1, d1), (t2, d2) = stacks.items()
    hot = rate > 1.0  # ADU/s
    assert hot.sum() >= 3
    measured_rate = (d2[hot] - d1[hot]) / (t2 - t1)
    assert np.median(measured_rate / rate[hot]) == pytest.approx(1.0, abs=0.05)
    # Hot pixels grow in proportion to the exposure time.
    assert np.median(d2[hot] / d1[hot]) == pytest.approx(t2 / t1, rel=0.1)


def test_flat_levels_and_photon_noise(tiny):
    frames = _frames(tiny)
    bias = fits.getdata(tiny / "truth" / "bias.fits").astype(np.float64)
    for filt in ("g", "r", "i"):
        rows = frames[(frames["imagetyp"] == "FLAT") & (frames["filter"] == filt)]
        assert len(rows) >= 2
        raws = [_raw(tiny, r) for r in rows]
        for raw in raws:
            assert 30000 <= np.median(raw) <= 45000
        # Photon transfer: with s2 scaled by k to the level S1 of s1,
        # var(s1 - k s2) = (1 + k) S1 / gain + (1 + k^2) read_noise^2 (ADU).
        s1, s2 = raws[0] - bias, raws[1] - bias
        k = np.median(s1) / np.median(s2)
        var = np.var(s1 - k * s2) - (1 + k**2) * CAM.read_noise_adu**2
        gain = (1 + k) * np.median(s1) / var
        assert gain == pytest.approx(CAM.gain_e_per_adu, rel=0.05)
        # The flat's structure (vignetting, dust, PRNU) is in the frames.
        flat = fits.getdata(tiny / "truth" / f"flat_{filt}.fits")
        assert np.median(flat) == pytest.approx(1.0, abs=1e-6)
        assert np.corrcoef((s1 / np.median(s1)).ravel(), flat.ravel())[0, 1] > 0.5


def _assert_fluxes_match(measured, wanted, min_stars: int) -> None:
    """Measured star fluxes equal the zero-point prediction: median within 1 %, 90 % within 3 %."""
    ratio = np.array(measured) / np.array(wanted)
    assert ratio.size >= min_stars
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(ratio - 1) < 0.03) >= 0.9


def test_star_fluxes_follow_the_zero_point_convention(tiny):
    frames = _frames(tiny)
    stars = Table.read(tiny / "truth" / "stars.ecsv")
    measured, wanted = [], []
    for row in frames[frames["imagetyp"] == "LIGHT"]:
        m, w = _isolated_star_fluxes(tiny, row, stars[stars["field"] == row["object"]])
        measured.extend(m)
        wanted.extend(w)
    _assert_fluxes_match(measured, wanted, min_stars=3)


def test_stars_are_where_the_true_wcs_puts_them(tiny):
    from scipy import ndimage

    frames = _frames(tiny)
    row = frames[frames["object"] == "WASP-104"][0]
    wcs = _true_wcs(tiny, row["file"])
    x, y = wcs.all_world2pix(sky.TRANSIT_HOST["ra_deg"], sky.TRANSIT_HOST["dec_deg"], 0)
    cal = _calibrated(tiny, row)
    yi, xi = int(round(float(y))), int(round(float(x)))
    cut = cal[yi - 8:yi + 9, xi - 8:xi + 9]
    cut = cut - np.median(cal)
    cy, cx = ndimage.center_of_mass(np.clip(cut, 0, None))
    assert cx + xi - 8 == pytest.approx(float(x), abs=0.1)
    assert cy + yi - 8 == pytest.approx(float(y), abs=0.1)


def test_cosmic_rays_hot_pixels_and_saturation_clip(tiny):
    frames = _frames(tiny)
    assert frames["n_cosmic"].sum() > 0
    dark = fits.getdata(tiny / "truth" / "dark_current.fits")
    assert (dark > 1.0).sum() >= 3  # hot pixels, ADU/s
    for row in frames:
        assert _raw(tiny, row).max() <= 65535


# ---------------------------------------------------------------------------------------
# Sky, atmosphere and geometry
# ---------------------------------------------------------------------------------------

def test_header_airmass_and_pointing_are_consistent(tiny):
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    frames = _frames(tiny)
    loc = EarthLocation(lat=config.site["lat_deg"] * u.deg, lon=config.site["lon_deg"] * u.deg,
                        height=config.site["height_m"] * u.m)
    for row in frames[frames["imagetyp"] == "LIGHT"]:
        h = fits.getheader(tiny / row["path"])
        with iers.conf.set_temp("auto_download", False):
            alt = SkyCoord(h["RA"] * u.deg, h["DEC"] * u.deg).transform_to(
                AltAz(obstime=Time(h["DATE-OBS"], scale="utc"), location=loc)).alt
        assert h["AIRMASS"] == pytest.approx(1 / np.sin(alt.radian), rel=0.01)
        # The mount's pointing is off by up to a few arcmin, not more.
        sep = SkyCoord(h["RA"] * u.deg, h["DEC"] * u.deg).separation(
            SkyCoord(row["ra_center"] * u.deg, row["dec_center"] * u.deg)).arcmin
        assert 0.3 < sep < 4.0


def test_meridian_flip_rotates_the_field(tiny):

    frames = _frames(tiny)
    series = frames[frames["object"] == "WASP-104"]
    assert set(series["pierside"]) == {"West", "East"}
    angle = {}
    for side in ("West", "East"):
        row = series[series["pierside"] == side][0]
        cd = _true_wcs(tiny, row["file"]).pixel_scale_matrix
        angle[side] = np.degrees(np.arctan2(cd[1, 0], cd[1, 1]))
    turn = (angle["East"] - angle["West"]) % 360
    assert turn == pytest.approx(180, abs=0.5)  # 180 degrees plus a slow field rotation


def test_truth_light_curve_shows_the_transit(tiny):
    lc = Table.read(tiny / "truth" / "lightcurves.ecsv")
    params = json.loads((tiny / "truth" / "params.json").read_text())
    depth = params["planet"]["rp_rs"] ** 2
    assert lc["host_flux"].min() < 1 - 0.8 * depth
    assert lc["host_flux"][0] == 1.0 and lc["host_flux"][-1] == 1.0
    in_transit = lc[lc["host_flux"] < 1]
    assert len(set(in_transit["pierside"])) == 1  # the flip is not during the transit
    assert np.ptp(lc["variable_flux"]) > 0.05


def test_transit_model_depth_and_duration():
    t0 = 2460356.5
    t14 = sky.transit_duration_days()
    assert 1.4 < t14 * 24 < 1.9
    t = t0 + np.array([-t14, -0.45 * t14, 0.0, 0.45 * t14, t14])
    f = sky.transit_flux(t, t0)
    assert f[0] == 1.0 and f[-1] == 1.0
    assert 1 - f[2] == pytest.approx(sky.PLANET["rp_rs"] ** 2, rel=0.25)
    assert f[1] < 1 and f[3] < 1


def test_scintillation_is_the_pipelines_formula(tiny):
    """The simulator scatters star fluxes by photometry's scintillation_sigma (35 cm, 60 m)."""
    from datared.photometry import scintillation_sigma
    from datared.sim.night import SITE, TELESCOPE

    lights = _frames(tiny)
    lights = lights[lights["imagetyp"] == "LIGHT"]
    assert len(lights) > 0
    for row in lights:
        expected = scintillation_sigma(float(row["airmass"]), float(row["exptime"]),
                                       aperture_mm=TELESCOPE["aperture_mm"],
                                       height_m=SITE["height_m"])
        assert float(row["scintillation"]) == pytest.approx(expected, abs=2e-6)


def test_render_stars_conserves_flux_and_fwhm():
    psf = sky.Moffat(5.0, 3.0)
    img = sky.render_stars((151, 171), np.array([60.3, 100.0]), np.array([50.6, 80.0]),
                           np.array([1e4, 5e5]), psf)
    assert img.sum() == pytest.approx(1e4 + 5e5, rel=1e-9)
    # Profile: the Moffat is half its peak at r = FWHM/2.
    r_half = psf.fwhm_px / 2
    assert (1 + r_half**2 / psf.alpha**2) ** -psf.beta == pytest.approx(0.5)
    # A star at the edge loses the flux that falls outside the frame.
    edge = sky.render_stars((50, 50), np.array([0.0]), np.array([25.0]), np.array([1e4]), psf)
    assert 4000 < edge.sum() < 6500


def test_frame_wcs_has_mild_distortion():
    w = frame_wcs((88.0, 32.5), 0.3, (3194, 4788), 0.605)
    corner = np.array([[0.0, 0.0]])
    linear = w.wcs_pix2world(corner, 0)
    full = w.all_pix2world(corner, 0)
    shift_px = np.hypot(*(full - linear)[0] * [np.cos(np.radians(32.5)), 1]) * 3600 / 0.605
    assert 0.5 < shift_px < 6
    x, y = w.all_world2pix(full[:, 0], full[:, 1], 0)
    assert float(x[0]) == pytest.approx(0.0, abs=1e-3)


def test_isochrone_and_cluster_members():
    iso = sky.load_isochrone(8.65, 0.0)
    assert np.all(np.diff(iso["Mini"]) > 0)
    assert 2.5 < iso["Mini"].max() < 4.0  # turn-off/giants of a ~450 Myr cluster
    members = sky.cluster_members(np.random.default_rng(1), 0.2)
    dm = 5 * np.log10(sky.CLUSTER["distance_pc"]) - 5
    a_r = sky.EXTINCTION_COEFF["r"] * sky.CLUSTER["ebv"]
    # The brightest members are giants/turn-off stars near M_r ~ -1 .. 0.5.
    assert dm + a_r - 2 < members["r"].min() < dm + a_r + 1.5
    assert members["binary"].any() and not members["binary"].all()
    with pytest.raises(ValueError, match="no isochrone"):
        sky.load_isochrone(8.63, 0.0)


def test_catalogues_have_the_expected_columns_and_cover_the_frames(tiny):
    ref = Table.read(tiny / "catalogs" / "refcat2.ecsv")
    gaia = Table.read(tiny / "catalogs" / "gaia.ecsv")
    for col in ("RA_ICRS", "DE_ICRS", "gmag", "e_gmag", "rmag", "e_rmag", "imag", "e_imag"):
        assert col in ref.colnames
    for col in ("source_id", "ra", "dec", "phot_g_mean_mag", "pmra", "pmdec", "parallax",
                "ref_epoch"):
        assert col in gaia.colnames
    assert ref["rmag"].max() < 19.5 and ref["e_rmag"].max() < 0.1
    stars = Table.read(tiny / "truth" / "stars.ecsv")
    host = stars[stars["name"] == "WASP-104"][0]
    near = np.hypot((ref["RA_ICRS"] - host["ra"]) * np.cos(np.radians(host["dec"])),
                    ref["DE_ICRS"] - host["dec"])
    assert near.min() < 1e-4  # the host is in the catalogue, within 0.4"
    margin = PRESETS["tiny"].catalog_margin_arcmin / 60
    assert near.max() > margin


# ---------------------------------------------------------------------------------------
# Classification with the book's own tools
# ---------------------------------------------------------------------------------------

def test_headers_classify_with_image_file_collection(tiny):
    frames = _frames(tiny)
    coll = night_collection(tiny, keywords=[config.imagetyp_key, config.filter_key,
                                            config.exptime_key, config.object_key,
                                            config.xbinning_key, config.pierside_key])
    summary = coll.summary
    assert len(summary) == len(frames)
    for kind, value in config.imagetyp.items():
        files = coll.files_filtered(**{config.imagetyp_key: value})
        assert len(files) == np.sum(frames["imagetyp"] == value), kind
        assert len(files) > 0
    for filt in config.filters:
        flats = coll.files_filtered(**{config.imagetyp_key: config.imagetyp["flat"],
                                       config.filter_key: filt})
        assert len(flats) == PRESETS["tiny"].n_flat
    assert set(summary[config.xbinning_key]) == {config.binning}
    for name in config.targets:
        files = coll.files_filtered(**{config.imagetyp_key: config.imagetyp["light"],
                                       config.object_key: name})
        assert len(files) > 0, name


# ---------------------------------------------------------------------------------------
# The sample night itself (skipped if it has not been generated)
# ---------------------------------------------------------------------------------------

def test_sample_night_frame_counts(night_dir, truth):
    frames = truth.frames
    params = truth.params
    if params["preset"] == "tiny" or params["max_per_group"] is not None:
        pytest.skip("not a complete small/full night")
    count = {k: np.sum(frames["imagetyp"] == k) for k in ("BIAS", "DARK", "FLAT", "LIGHT")}
    assert count["BIAS"] >= 10 and count["DARK"] >= 13
    darks = frames[frames["imagetyp"] == "DARK"]
    assert np.sum(darks["exptime"] == 60) >= 10 and len(set(darks["exptime"])) == 2
    for filt in ("g", "r", "i"):
        assert np.sum((frames["imagetyp"] == "FLAT") & (frames["filter"] == filt)) >= 5
        assert np.sum((frames["object"] == "M37") & (frames["filter"] == filt)) >= 3
    series = frames[frames["object"] == "WASP-104"]
    assert len(series) >= 80
    lc = Table.read(night_dir / "truth" / "lightcurves.ecsv")
    in_tr = lc["host_flux"] < 1
    t_in, t_out = lc["bjd_tdb"][in_tr].min(), lc["bjd_tdb"][in_tr].max()
    assert (t_in - lc["bjd_tdb"].min()) * 24 * 60 > 40  # baseline before ingress, minutes
    assert (lc["bjd_tdb"].max() - t_out) * 24 * 60 > 40  # and after egress
    assert len(set(lc["pierside"][in_tr])) == 1
    cadence = np.median(np.diff(lc["bjd_tdb"])) * 86400
    assert 55 < cadence < 100


def test_sample_night_star_fluxes(night_dir, truth):
    frames = truth.frames
    stars = truth.stars
    measured, wanted = [], []
    lights = frames[frames["imagetyp"] == "LIGHT"]
    for obj, step in (("M37", 1), ("WASP-104", 15)):
        for row in lights[lights["object"] == obj][::step]:
            m, w = _isolated_star_fluxes(night_dir, row, stars[stars["field"] == obj])
            measured.extend(m)
            wanted.extend(w)
    _assert_fluxes_match(measured, wanted, min_stars=20)


def test_sample_night_has_saturated_stars_and_physical_ranges(night_dir, truth):
    frames = truth.frames
    lights = frames[frames["imagetyp"] == "LIGHT"]
    assert lights["fwhm_arcsec"].min() >= 2.0 and lights["fwhm_arcsec"].max() <= 4.0
    assert np.ptp(lights["sky_adu"][lights["object"] == "WASP-104"]) > 10
    assert lights["transparency"].min() < 0.9  # a cloud passes
    m37 = lights[lights["object"] == "M37"]
    row = m37[m37["filter"] == "i"][0]
    assert (fits.getdata(night_dir / row["path"]) >= 65535).sum() > 0
    for filt in ("g", "r", "i"):
        fw = m37["fwhm_arcsec"][m37["filter"] == filt]
        assert fw.size >= 3
    assert np.mean(m37["fwhm_arcsec"][m37["filter"] == "g"]) > np.mean(
        m37["fwhm_arcsec"][m37["filter"] == "i"])
