"""Header conventions of other software (issue 12): time keywords, UTC offsets, targets by
OBJECT aliases, per-type keyword overrides, CCDSUM binning, and their settings-file check."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest

from datared.errors import FrameError
from datared.frame import (
    NINA_KEYS,
    HeaderKeys,
    frame_binning,
    frame_time,
    header_meta,
    target_of,
)
from datared.settings import SettingsFileError

TARGETS = {"M37": {"kind": "cluster", "filters": ["g", "r", "i"],
                   "aliases": ["M 37", "NGC2099"]},
           "WASP-104": {"kind": "transit", "filters": ["r"]}}


def test_date_and_time_in_separate_keywords():
    keys = HeaderKeys(time="TIME-OBS")
    header = {"DATE-OBS": "2019-03-26", "TIME-OBS": "03:12:45.1", "EXPTIME": 60.0}
    assert frame_time(header, keys, middle=False).isot == "2019-03-26T03:12:45.100"
    assert frame_time(header, keys).isot == "2019-03-26T03:13:15.100"


def test_maxim_style_ut_keyword_and_a_date_with_a_time_of_midnight():
    keys = HeaderKeys(time="UT")
    header = {"DATE-OBS": "2019-03-26T00:00:00", "UT": "23:59:59.5", "EXPTIME": 1.0}
    assert frame_time(header, keys).isot == "2019-03-27T00:00:00.000"


def test_a_date_without_time_is_an_error_naming_file_keyword_and_setting():
    with pytest.raises(FrameError) as err:
        frame_time({"DATE-OBS": "2019-03-26", "EXPTIME": 60.0}, NINA_KEYS, file="/x/a.fits")
    message = str(err.value)
    assert message.startswith("a.fits: ") and "DATE-OBS" in message and "time_key" in message


def test_missing_time_keyword_names_it():
    with pytest.raises(FrameError, match="TIME-OBS.*time_key"):
        frame_time({"DATE-OBS": "2019-03-26", "EXPTIME": 1.0}, HeaderKeys(time="TIME-OBS"))


def test_unreadable_time_names_both_keywords():
    header = {"DATE-OBS": "2019-03-26", "TIME-OBS": "3h12", "EXPTIME": 1.0}
    with pytest.raises(FrameError, match="DATE-OBS.*TIME-OBS.*time_key"):
        frame_time(header, HeaderKeys(time="TIME-OBS"), file="b.fits")


@pytest.mark.parametrize(("stamp", "utc"), [
    ("2019-03-26T21:12:45-0700", "2019-03-27T04:12:45.000"),
    ("2019-03-26T21:12:45.5+02:00", "2019-03-26T19:12:45.500"),
    ("2019-03-26T21:12:45+0530", "2019-03-26T15:42:45.000"),
    ("2019-03-26T21:12:45Z", "2019-03-26T21:12:45.000"),
])
def test_a_utc_offset_is_converted_to_utc(stamp, utc):
    header = {"DATE-OBS": stamp, "EXPTIME": 10.0}
    assert frame_time(header, middle=False).isot == utc


def test_offset_after_a_separate_time_keyword():
    header = {"DATE-OBS": "2019-03-26", "TIME-OBS": "21:12:45-07:00", "EXPTIME": 0.0}
    assert frame_time(header, HeaderKeys(time="TIME-OBS")).isot == "2019-03-27T04:12:45.000"


def test_catalogue_metadata_carries_the_utc_start_for_nina_keys():
    keys = HeaderKeys(time="TIME-OBS")
    header = {"DATE-OBS": "2019-03-26", "TIME-OBS": "03:12:45", "EXPTIME": 60.0,
              "OBJECT": "M37"}
    meta = header_meta(header, keys)
    assert frame_time(meta).isot == frame_time(header, keys).isot
    plain = {"DATE-OBS": "2024-02-15T20:00:00.123456", "EXPTIME": 1.0}
    assert header_meta(plain)["DATE-OBS"] == "2024-02-15T20:00:00.123456"  # kept as written


@pytest.mark.parametrize("value", ["M37", "m37", "M 37", "M-37", "M_37", "NGC2099", "ngc 2099",
                                   "M37_g", "M37 r", "m37-i", "NGC2099_G"])
def test_spellings_of_a_target(value):
    assert target_of({"OBJECT": value, "FILTER": "g"}, NINA_KEYS, TARGETS) == "M37"


def test_target_names_with_dashes_and_the_frame_filter():
    assert target_of({"OBJECT": "wasp104"}, NINA_KEYS, TARGETS) == "WASP-104"
    targets = {"Field": {"filters": ["V"]}}
    assert target_of({"OBJECT": "field_Halpha", "FILTER": "Halpha"}, NINA_KEYS,
                     targets) == "Field"


def test_an_unknown_object_names_file_value_and_setting():
    with pytest.raises(FrameError) as err:
        target_of({"OBJECT": "M38"}, NINA_KEYS, TARGETS, file="/night/c.fits")
    message = str(err.value)
    assert message.startswith("c.fits: ") and "'M38'" in message and "aliases" in message
    assert "config.targets" in message
    with pytest.raises(FrameError, match="no OBJECT"):
        target_of({}, NINA_KEYS, TARGETS)
    with pytest.raises(FrameError):  # a filter alone is not a target
        target_of({"OBJECT": "g", "FILTER": "g"}, NINA_KEYS, TARGETS)


def test_per_type_overrides_and_none_settings():
    settings = SimpleNamespace(filter_key="FILTER", time_key=None, binning_key="CCDSUM",
                               header_overrides={"flat": {"filter_key": "FILTNAME"}})
    assert HeaderKeys.from_settings(settings).filter == "FILTER"
    assert HeaderKeys.from_settings(settings).time == ""
    assert HeaderKeys.from_settings(settings, "light").filter == "FILTER"
    flat_keys = HeaderKeys.from_settings(settings, "flat")
    assert flat_keys.filter == "FILTNAME" and flat_keys.binning == "CCDSUM"
    with pytest.raises(ValueError, match="filter_ky"):
        NINA_KEYS.for_type("flat", {"flat": {"filter_ky": "X"}})


def test_binning_from_ccdsum_or_two_keywords():
    assert frame_binning({"XBINNING": 2, "YBINNING": 2}) == (2, 2)
    keys = HeaderKeys(binning="CCDSUM")
    assert frame_binning({"CCDSUM": "3 3"}, keys) == (3, 3)
    assert frame_binning({"CCDSUM": "1 2"}, keys) == (1, 2)
    with pytest.raises(FrameError, match="binning_key"):
        frame_binning({"CCDSUM": "full"}, keys, file="d.fits")


@pytest.fixture
def load_config(monkeypatch, tmp_path):
    """``load(text)``: config imported afresh with a settings file holding ``text``."""
    def load(text: str):
        for name in ("DATARED_CONFIG", "DATARED_DATA_DIR", "DATARED_WORK_DIR"):
            monkeypatch.delenv(name, raising=False)
        path = tmp_path / "datared.toml"
        path.write_text(text)
        monkeypatch.setenv("DATARED_CONFIG", str(path))
        sys.modules.pop("config", None)
        try:
            return importlib.import_module("config")
        finally:
            sys.modules.pop("config", None)

    yield load
    sys.modules.pop("config", None)


def test_settings_file_accepts_the_new_header_settings(load_config):
    config = load_config('''
time_key = "TIME-OBS"
binning_key = "CCDSUM"
date_key = "DATE-OBS"

[header_overrides.flat]
filter_key = "FILTNAME"

[targets.M37]
kind = "cluster"
ra_deg = 88.074
dec_deg = 32.545
filters = ["g", "r", "i"]
aliases = ["M 37", "NGC2099"]
''')
    assert config.time_key == "TIME-OBS" and config.binning_key == "CCDSUM"
    assert config.header_overrides == {"flat": {"filter_key": "FILTNAME"}}
    assert config.targets["M37"]["aliases"] == ["M 37", "NGC2099"]
    keys = HeaderKeys.from_settings(config, "flat")
    assert (keys.filter, keys.time, keys.binning) == ("FILTNAME", "TIME-OBS", "CCDSUM")
    assert load_config('time_key = ""\n').time_key is None


@pytest.mark.parametrize(("text", "match"), [
    ('[header_overrides.flats]\nfilter_key = "FILTNAME"\n', "flats.*did you mean 'flat'"),
    ('[header_overrides.flat]\nfilter = "FILTNAME"\n', "did you mean 'filter_key'"),
    ('[header_overrides.flat]\nfilter_key = 3\n', "FILTNAME"),
    ('header_overrides = "flat"\n', "must be a table"),
    ('[targets.M37]\nkind = "cluster"\nra_deg = 1.0\ndec_deg = 2.0\nfilters = ["g"]\n'
     'aliases = "M 37"\n', "aliases must be a list"),
])
def test_settings_file_rejects_wrong_header_settings(load_config, text, match):
    with pytest.raises(SettingsFileError, match=match):
        load_config(text)


def test_image_types_match_ignoring_case_and_as_lists():
    from datared.frame import frame_kind, image_type_values

    imagetyp = {"bias": "BIAS", "dark": ["DARK", "Dark Frame"], "flat": "Flat Field",
                "light": ["LIGHT", "Light Frame"]}
    assert frame_kind("light frame", imagetyp) == "light"
    assert frame_kind(" Light Frame ", imagetyp) == "light"
    assert frame_kind("bias", imagetyp) == "bias"
    assert frame_kind("FLAT FIELD", imagetyp) == "flat"
    assert frame_kind("Tricolor Image", imagetyp) is None
    assert frame_kind(None, imagetyp) is None
    assert image_type_values("BIAS") == ["BIAS"]
    with pytest.raises(ValueError, match="a text or a list of texts"):
        image_type_values([3])


def test_frames_of_type_takes_a_list_of_values(tmp_path):
    import numpy as np
    from astropy.io import fits

    from datared.io import night_collection
    from datared.reduction import frames_of_type

    for name, value in (("a.fits", "LIGHT"), ("b.fits", "Light Frame"), ("c.fits", "light"),
                        ("d.fits", "Bias Frame")):
        fits.writeto(tmp_path / name, np.zeros((4, 4), np.float32),
                     fits.Header({"IMAGETYP": value}))
    collection = night_collection(tmp_path)
    lights = frames_of_type(collection, "IMAGETYP", ["LIGHT", "Light Frame"])
    assert [p.name for p in lights] == ["a.fits", "b.fits", "c.fits"]
    assert [p.name for p in frames_of_type(collection, "IMAGETYP", "bias frame")] == ["d.fits"]


def test_a_settings_file_may_list_image_type_values(load_config):
    from datared.settings import SettingsFileError

    config = load_config('[imagetyp]\nlight = ["LIGHT", "Light Frame"]\nbias = "Bias Frame"\n')
    assert config.imagetyp["light"] == ["LIGHT", "Light Frame"]
    assert config.imagetyp["bias"] == "Bias Frame" and config.imagetyp["flat"] == "FLAT"
    with pytest.raises(SettingsFileError, match="imagetyp.light must be a text or a list"):
        load_config("[imagetyp]\nlight = [1, 2]\n")
