"""Unit tests of datared.frame: the calibrated-frame model and the header helpers."""

from __future__ import annotations

import types

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.wcs import WCS

from datared.errors import FrameError
from datared.frame import (
    NINA_KEYS,
    HeaderKeys,
    frame_epoch,
    frame_time,
    has_celestial_wcs,
    header_meta,
    header_pointing,
    header_without_wcs,
    number_value,
    read_frame,
    text_value,
    write_frame,
)


def simple_wcs(shape=(40, 50)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [88.0, 32.5]
    w.wcs.crpix = [25.5, 20.5]
    w.wcs.cdelt = [-0.605 / 3600, 0.605 / 3600]
    return w


def test_header_keys_from_settings_takes_the_key_settings():
    settings = types.SimpleNamespace(filter_key="FILTNAME", exptime_key="EXPOSURE", other=1)
    keys = HeaderKeys.from_settings(settings)
    assert keys.filter == "FILTNAME" and keys.exptime == "EXPOSURE"
    assert keys.date == NINA_KEYS.date  # not in the settings: NINA's name
    assert keys.setting("filter") == "filter_key"


def test_write_then_read_keeps_image_mask_uncertainty_header_and_wcs(tmp_path):
    data = np.arange(2000, dtype=np.float64).reshape(40, 50)
    mask = np.zeros(data.shape, bool)
    mask[3, 4] = True
    header = fits.Header({"FILTER": "r", "OBJECT": "M37"})
    header.extend(simple_wcs().to_header())
    ccd = CCDData(data, unit="adu", meta=header, mask=mask,
                  uncertainty=StdDevUncertainty(np.full(data.shape, 2.0)))
    path = write_frame(ccd, tmp_path / "out" / "frame.fits")
    write_frame(ccd, path)  # a rerun overwrites
    frame = read_frame(path)
    assert frame.data.dtype == np.float32 and np.array_equal(frame.data, data)
    assert frame.mask[3, 4] and frame.mask.sum() == 1
    assert np.all(frame.uncertainty == 2.0)
    assert frame.header["FILTER"] == "r" and frame.name == "frame.fits"
    assert frame.pixel_scale_arcsec == pytest.approx(0.605)
    # and a Frame writes back the same way
    again = read_frame(write_frame(frame, tmp_path / "again.fits"))
    assert np.array_equal(again.data, frame.data) and again.mask.sum() == 1


def test_read_frame_names_the_file_when_it_is_not_an_image(tmp_path):
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((2, 3, 4), np.float32)).writeto(path)
    with pytest.raises(FrameError, match="cube.fits"):
        read_frame(path)
    junk = tmp_path / "junk.fits"
    junk.write_text("not a FITS file")
    with pytest.raises(OSError, match="junk.fits"):
        read_frame(junk)


def test_frame_without_wcs_says_which_chapter_solves_it(tmp_path):
    path = write_frame(CCDData(np.zeros((5, 5)), unit="adu"), tmp_path / "f.fits")
    frame = read_frame(path)
    assert frame.wcs is None and not frame.bad_pixels().any()
    with pytest.raises(FrameError, match="03-astrometry"):
        _ = frame.pixel_scale_arcsec


def test_header_values_name_file_keyword_and_setting():
    header = fits.Header({"FILTER": " r ", "EXPTIME": "sixty", "EMPTY": ""})
    assert text_value(header, NINA_KEYS, "filter") == "r"
    with pytest.raises(FrameError, match=r"a\.fits: .*EXPTIME.*exptime_key"):
        number_value(header, NINA_KEYS, "exptime", file="dir/a.fits")
    with pytest.raises(FrameError, match="OBJECT.*object_key"):
        text_value(header, NINA_KEYS, "object")
    keys = HeaderKeys(object="EMPTY")
    with pytest.raises(FrameError, match="EMPTY"):
        text_value(header, keys, "object")


def test_header_pointing_reads_degrees_and_sexagesimal():
    assert header_pointing({"RA": 88.074, "DEC": 32.545}) == (88.074, 32.545)
    keys = HeaderKeys(ra="OBJCTRA", dec="OBJCTDEC")
    ra, dec = header_pointing({"OBJCTRA": "05 52 18.0", "OBJCTDEC": "+32 33 12"}, keys)
    assert ra == pytest.approx(88.075) and dec == pytest.approx(32.5533, abs=1e-4)
    with pytest.raises(FrameError, match="OBJCTRA"):
        header_pointing({}, keys)
    with pytest.raises(FrameError, match="cannot read RA"):
        header_pointing({"RA": "somewhere", "DEC": 1.0})
    with pytest.raises(FrameError, match="not a position"):
        header_pointing({"RA": 400.0, "DEC": 1.0})


def test_frame_time_is_the_middle_of_the_exposure():
    header = {"DATE-OBS": "2024-02-15T20:00:00", "EXPTIME": 60.0}
    assert frame_time(header).isot == "2024-02-15T20:00:30.000"
    assert frame_time(header, middle=False).isot == "2024-02-15T20:00:00.000"
    assert frame_epoch(header) == pytest.approx(2024.124, abs=1e-3)
    with pytest.raises(FrameError, match="not an ISO date.*date_key"):
        frame_time({"DATE-OBS": "15/02/2024", "EXPTIME": 1.0}, file="x.fits")


def test_header_meta_uses_nina_names_whatever_the_camera_wrote():
    header = fits.Header({"DATE-LOC": "2024-02-15T20:00:00", "EXPOSURE": 60.0, "GAIN": 26})
    keys = HeaderKeys(date="DATE-LOC", exptime="EXPOSURE")
    meta = header_meta(header, keys)
    assert meta == {"DATE-OBS": "2024-02-15T20:00:00", "EXPTIME": 60.0, "GAIN": 26}


def test_wcs_helpers():
    header = fits.Header({"RA": 88.0, "DEC": 32.0})
    assert not has_celestial_wcs(header)
    header.extend(simple_wcs().to_header())
    assert has_celestial_wcs(header)
    clean = header_without_wcs(header)
    assert "CTYPE1" not in clean and clean["RA"] == 88.0
