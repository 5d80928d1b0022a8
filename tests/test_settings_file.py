"""The settings file: a TOML file named by DATARED_CONFIG overrides config.py's settings.

Each test imports ``config`` afresh (``importlib`` with ``monkeypatch``, as
tests/test_sources.py does) and removes it from ``sys.modules`` afterwards, so that no other
test sees a configuration made here.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import Table

from datared.settings import setting_names
from datared.sim import DEFAULT_SEED, simulate_night
from datared.sim.night import HEADER_KEYS, SETTINGS_FILE, night_settings, settings_toml

VARIABLES = ("DATARED_CONFIG", "DATARED_DATA_DIR", "DATARED_WORK_DIR", "DATARED_CACHE_DIR",
             "DATARED_SAMPLE_SEED")


@pytest.fixture
def load_config(monkeypatch):
    """``load(file=None, **variables)``: config imported afresh with only these variables set.

    ``file`` is the settings file's path (DATARED_CONFIG); the DATARED_* variables not given
    are unset, so that a developer's environment does not change the results.
    """
    def load(file: Path | None = None, **variables):
        for name in VARIABLES:
            monkeypatch.delenv(name, raising=False)
        if file is not None:
            monkeypatch.setenv("DATARED_CONFIG", str(file))
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
        sys.modules.pop("config", None)
        try:
            return importlib.import_module("config")
        finally:
            sys.modules.pop("config", None)

    yield load
    sys.modules.pop("config", None)


def write(folder: Path, text: str, name: str = "datared.toml") -> Path:
    """Write a settings file into ``folder`` (created) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# Values: applied, converted, checked
# ---------------------------------------------------------------------------------------

def test_without_a_settings_file_config_py_alone_counts(load_config, monkeypatch):
    config = load_config()
    assert config.settings_file is None
    assert config.settings_in_file == () and config.settings_changed_by_file == ()
    monkeypatch.setenv("DATARED_CONFIG", "  ")  # an empty variable means no file
    sys.modules.pop("config", None)
    try:
        assert importlib.import_module("config").settings_file is None
    finally:
        sys.modules.pop("config", None)


def test_overrides_are_applied_and_converted(load_config, tmp_path):
    default = load_config()
    file = write(tmp_path, """
gain_e_per_adu = 1          # a whole number where config.py has a float: taken as 1.0
read_noise_e = 9.0
binning = 1
clean_cosmic_rays = true
camera = "CCD 2048 x 2048"
overscan_section = "[2054:2080, 1:2048]"
trim_section = ""           # TOML has no None: empty text means None
filters = ["V", "R"]
ignored_data_subdirs = ["truth", "catalogs", "notes"]
aperture_radii_arcsec = [3, 4.5]
""")
    config = load_config(file)
    assert config.settings_file == file
    assert config.gain_e_per_adu == 1.0 and isinstance(config.gain_e_per_adu, float)
    assert config.read_noise_e == 9.0 and config.binning == 1
    assert config.clean_cosmic_rays is True
    assert config.camera == "CCD 2048 x 2048"
    assert config.overscan_section == "[2054:2080, 1:2048]" and config.trim_section is None
    assert config.filters == ["V", "R"]
    assert config.ignored_data_subdirs == ("truth", "catalogs", "notes")  # a tuple, as in config.py
    assert config.aperture_radii_arcsec == [3.0, 4.5]
    assert all(isinstance(r, float) for r in config.aperture_radii_arcsec)
    # Settings the file does not name keep config.py's values.
    for name in ("focal_length_mm", "site", "targets", "imagetyp", "data_dir", "work_dir"):
        assert getattr(config, name) == getattr(default, name), name
    # In config.py's order; trim_section is named but stays None, so it is not "changed".
    assert config.settings_in_file == (
        "ignored_data_subdirs", "camera", "binning", "gain_e_per_adu", "read_noise_e",
        "overscan_section", "trim_section", "filters", "clean_cosmic_rays",
        "aperture_radii_arcsec")
    assert "trim_section" not in config.settings_changed_by_file
    assert "camera" in config.settings_changed_by_file


def test_a_table_of_settings_changes_only_the_keys_it_names(load_config, tmp_path):
    default = load_config()
    file = write(tmp_path, """
[frame_quality_limits]
min_transparency = 0.2

[imagetyp]
light = "Light Frame"

[site]
name = "My observatory"
height_m = 420
""")
    config = load_config(file)
    assert config.frame_quality_limits == {**default.frame_quality_limits,
                                           "min_transparency": 0.2}
    assert config.imagetyp == {**default.imagetyp, "light": "Light Frame"}
    assert config.site == {**default.site, "name": "My observatory", "height_m": 420.0}
    assert isinstance(config.site["height_m"], float)
    # config.py's own dictionaries are not changed in place (a fresh import shows them).
    assert load_config().imagetyp["light"] == default.imagetyp["light"]


def test_targets_of_the_file_replace_config_pys_targets_whole(load_config, tmp_path):
    default = load_config()
    assert len(default.targets) >= 2, "config.py's targets: the test needs the sample's two"
    file = write(tmp_path, """
[targets."NGC 2420"]
kind = "cluster"
ra_deg = 114.6
dec_deg = 21
filters = ["g", "r", "i"]

[targets.HAT-P-32]
kind = "transit"
ra_deg = 31.04
dec_deg = 46.69
filters = ["r"]
period_d = 2.15
limb_darkening = {r = [0.4, 0.2]}
""")
    config = load_config(file)
    assert list(config.targets) == ["NGC 2420", "HAT-P-32"]  # the sample's targets are gone
    assert config.targets["NGC 2420"] == {"kind": "cluster", "ra_deg": 114.6, "dec_deg": 21.0,
                                          "filters": ["g", "r", "i"]}
    assert isinstance(config.targets["NGC 2420"]["dec_deg"], float)
    # A target of the file is taken as written: no key of config.py's entry is added to it.
    assert config.targets["HAT-P-32"] == {"kind": "transit", "ra_deg": 31.04, "dec_deg": 46.69,
                                          "filters": ["r"], "period_d": 2.15,
                                          "limb_darkening": {"r": [0.4, 0.2]}}


def test_a_target_without_the_keys_every_target_has_is_an_error(load_config, tmp_path):
    file = write(tmp_path, '[targets.M37]\nkind = "cluster"\nra_deg = 88.07\n')
    with pytest.raises(ValueError, match=r"(?s)datared\.toml.*target 'M37' has no dec_deg, "
                                         r"filters.*replace config\.py's targets whole"):
        load_config(file)


@pytest.mark.parametrize("text, where, expected", [
    ('gain_e_per_adu = "0.85"', "gain_e_per_adu", "a number, without quotes"),
    ("binning = 2.0", "binning", "a whole number"),
    ("clean_cosmic_rays = 1", "clean_cosmic_rays", "true or false"),
    ("camera = 600", "camera", "text in double quotes"),
    ("overscan_section = 5", "overscan_section", r'or "" for None'),
    ('filters = "r"', "filters", "a list"),
    ('filters = ["g", 1]', r"filters\[1\]", "text in double quotes"),
    ("work_dir = 3", "work_dir", "a path as text"),
    ("site = 3", "site", "a table, not the number 3"),
    ('[site]\nlat_deg = "50.7"', r"site\.lat_deg", "a number"),
    ('[frame_quality_limits]\nmin_clean_stars = 2.5', r"frame_quality_limits\.min_clean_stars",
     "a whole number"),
    ('targets = "M37"', "targets", "tables, one per target"),
    ('[targets.X]\nkind = "cluster"\nra_deg = "5h"\ndec_deg = 1.0\nfilters = ["r"]',
     r"targets\.X\.ra_deg", "a number"),
])
def test_a_wrong_type_names_the_file_the_key_and_the_fix(load_config, tmp_path, text, where,
                                                         expected):
    file = write(tmp_path, text + "\n")
    prefix = f"settings file {re.escape(str(file))}: "
    with pytest.raises(ValueError, match=rf"{prefix}{where} must be .*{expected}") as info:
        load_config(file)
    assert type(info.value).__name__ == "SettingsFileError"


@pytest.mark.parametrize("text, message", [
    ("gain_e_per_ad = 0.9", r"unknown key 'gain_e_per_ad': did you mean 'gain_e_per_adu'\?"),
    ("Filters = ['g']", r"unknown key 'Filters': did you mean 'filters'\?"),
    ("[frame_quality_limits]\nmax_fwhm = 2.0",
     r"unknown key 'max_fwhm' in \[frame_quality_limits\]: did you mean 'max_fwhm_ratio'\?"),
    ('[imagetyp]\nlights = "L"', r"unknown key 'lights' in \[imagetyp\]: did you mean 'light'\?"),
    ('[targets.M37]\nkind = "cluster"\nra_dg = 88.0\ndec_deg = 32.5\nfilters = ["r"]',
     r"unknown key 'ra_dg' in \[targets\.M37\]: did you mean 'ra_deg'\?"),
    ('[instrument]\ncamera = "x"', r"unknown key 'instrument'.*not under a heading"),
    ('repo_dir = "."', r"unknown key 'repo_dir': repo_dir is computed"),
    ("zzz = 1", r"unknown key 'zzz': config\.py has no setting of that name"),
])
def test_an_unknown_key_names_the_closest_valid_one(load_config, tmp_path, text, message):
    file = write(tmp_path, text + "\n")
    with pytest.raises(ValueError, match=rf"settings file {re.escape(str(file))}: {message}"):
        load_config(file)


def test_a_missing_file_or_a_syntax_error_names_the_file_and_the_line(load_config, tmp_path):
    missing = tmp_path / "nowhere" / "datared.toml"
    with pytest.raises(ValueError, match=rf"DATARED_CONFIG names the settings file {re.escape(str(missing))}, "
                                         r"which does not exist: correct DATARED_CONFIG, or "
                                         r"unset it"):
        load_config(missing)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        load_config(tmp_path)
    broken = write(tmp_path, 'camera = "QHY600M"\n\ngain_e_per_adu 0.85\n', name="broken.toml")
    with pytest.raises(ValueError, match=rf"settings file {re.escape(str(broken))}: not valid TOML: .*line 3"):
        load_config(broken)
    unclosed = write(tmp_path, 'camera = "QHY600M\n', name="unclosed.toml")
    with pytest.raises(ValueError, match=r"unclosed\.toml: not valid TOML: .*line 1"):
        load_config(unclosed)


# ---------------------------------------------------------------------------------------
# Paths, derived values and the environment
# ---------------------------------------------------------------------------------------

def test_relative_paths_start_at_the_settings_files_folder(load_config, tmp_path,
                                                           monkeypatch):
    folder = tmp_path / "course" / "settings"
    file = write(folder, f'data_dir = "../nights/n1"\nwork_dir = "work"\n'
                         f'cache_dir = "{tmp_path / "cache"}"\n')
    monkeypatch.chdir(tmp_path)  # not the file's folder: the paths must not follow the cwd
    config = load_config(Path("course/settings/datared.toml"))  # a relative DATARED_CONFIG
    assert config.settings_file == file
    assert config.data_dir == tmp_path / "course" / "nights" / "n1"
    assert config.work_dir == folder / "work"
    assert config.cache_dir == tmp_path / "cache"
    home = write(tmp_path / "home-paths", 'work_dir = "~/datared-work"\n')
    assert load_config(home).work_dir == Path.home() / "datared-work"


def test_environment_variables_win_over_the_file(load_config, tmp_path):
    file = write(tmp_path / "s", 'data_dir = "night"\nwork_dir = "work"\ncache_dir = "cache"\n'
                                 "sample_seed = 7\ngain_e_per_adu = 1.5\n")
    config = load_config(file, DATARED_DATA_DIR=tmp_path / "env-night",
                         DATARED_WORK_DIR=tmp_path / "env-work",
                         DATARED_CACHE_DIR=tmp_path / "env-cache", DATARED_SAMPLE_SEED=3)
    assert config.data_dir == tmp_path / "env-night"
    assert config.work_dir == tmp_path / "env-work"
    assert config.cache_dir == tmp_path / "env-cache"
    assert config.sample_seed == 3
    assert config.gain_e_per_adu == 1.5  # a setting without a variable: the file's value
    assert config.settings_overridden_by_environment == {
        "data_dir": "DATARED_DATA_DIR", "work_dir": "DATARED_WORK_DIR",
        "cache_dir": "DATARED_CACHE_DIR", "sample_seed": "DATARED_SAMPLE_SEED"}
    # Without the variables, the file's values count.
    config = load_config(file)
    assert (config.data_dir, config.work_dir, config.cache_dir, config.sample_seed) == (
        tmp_path / "s" / "night", tmp_path / "s" / "work", tmp_path / "s" / "cache", 7)
    assert config.settings_overridden_by_environment == {}


def test_the_default_data_dir_follows_the_files_seed_preset_and_cache(load_config, tmp_path):
    file = write(tmp_path, 'sample_seed = 7\nsample_preset = "full"\ncache_dir = "cache"\n')
    config = load_config(file)
    assert config.data_dir == tmp_path / "cache" / "sample-night-full-seed7"
    assert "data_dir" in config.settings_changed_by_file
    # The book's own seed has a folder without a seed in its name.
    file = write(tmp_path, f"sample_seed = {DEFAULT_SEED}\n")
    assert load_config(file, DATARED_SAMPLE_SEED=7).data_dir.name == "sample-night-small-seed7"
    assert load_config(file).data_dir.name == "sample-night-small"
    # DATARED_DATA_DIR keeps the data folder where it is, whatever the seed.
    file = write(tmp_path, "sample_seed = 7\n")
    assert load_config(file, DATARED_DATA_DIR=tmp_path / "mine").data_dir == tmp_path / "mine"
    # With the seed of a variable, a file's seed does not move data_dir either.
    config = load_config(file, DATARED_SAMPLE_SEED=5, DATARED_CACHE_DIR=tmp_path / "c")
    assert config.data_dir == tmp_path / "c" / "sample-night-small-seed5"


def test_importing_config_with_a_settings_file_creates_nothing(load_config, tmp_path):
    file = write(tmp_path / "s", 'work_dir = "work"\ncache_dir = "cache"\n')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    config = load_config(file)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert config.make_work_dirs() == tmp_path / "s" / "work"
    assert (tmp_path / "s" / "work" / "LIGHT_PRERED").is_dir()


def test_importing_config_twice_with_different_files(load_config, tmp_path):
    first = write(tmp_path / "a", 'camera = "first"\nbinning = 1\n')
    second = write(tmp_path / "b", 'camera = "second"\n')
    default = load_config()
    one, two = load_config(first), load_config(second)
    assert (one.camera, one.binning, one.settings_file) == ("first", 1, first)
    assert (two.camera, two.binning, two.settings_file) == ("second", default.binning, second)
    assert two.settings_in_file == ("camera",)
    again = load_config()
    assert (again.camera, again.settings_file) == (default.camera, None)
    assert "config" not in sys.modules or sys.modules["config"] not in (one, two, again)


# ---------------------------------------------------------------------------------------
# The settings file every simulated night gets
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """A tiny night with the book's seed (one frame per group)."""
    return simulate_night(tmp_path_factory.mktemp("settings-night") / "tiny", preset="tiny",
                          seed=DEFAULT_SEED, max_per_group=1, progress=False)


def test_the_nights_settings_file_round_trips(night):
    text = (night / SETTINGS_FILE).read_text()
    t0 = json.loads((night / "truth" / "params.json").read_text())["planet"]["t0_bjd_tdb"]
    assert tomllib.loads(text) == night_settings("tiny", DEFAULT_SEED, t0)
    assert text == settings_toml(night_settings("tiny", DEFAULT_SEED, t0), "tiny", DEFAULT_SEED, 1)
    # Names that need quotes in TOML survive the round trip too.
    settings = night_settings("small", 3, t0)
    settings["targets"]["NGC 2420"] = {"kind": "cluster", "ra_deg": 114.6, "dec_deg": 21.575,
                                       "filters": ["g"], "notes": {"a b": 'say "hi"\\'}}
    assert tomllib.loads(settings_toml(settings, "small", 3, None)) == settings


def test_the_nights_settings_change_nothing_for_the_book_default_night(load_config, night):
    """QHY600M, NINA, Bonn, M37 and WASP-104: the night's file says what config.py says."""
    default = load_config()
    config = load_config(night / SETTINGS_FILE)
    assert config.data_dir == night  # "." in the file: the night's own folder
    assert config.sample_preset == "tiny" and config.sample_seed == DEFAULT_SEED
    different = [name for name in setting_names(vars(default))
                 if name not in ("data_dir", "sample_preset")
                 and getattr(config, name) != getattr(default, name)]
    assert not different, (
        f"the simulated night's {SETTINGS_FILE} and config.py disagree on {different}: update "
        "night_settings in datared/sim/night.py (or config.py)")
    assert config.settings_changed_by_file == ("sample_preset", "data_dir")
    assert set(config.settings_in_file) >= {"imagetyp_key", "imagetyp", "gain_e_per_adu",
                                            "filters", "site", "targets", "reference_catalog"}
    assert config.reference_catalog == "sample" and config.overscan_section is None


def test_the_nights_settings_describe_its_frames(night):
    """The keywords and image types of the file are those of the frames' headers."""
    settings = tomllib.loads((night / SETTINGS_FILE).read_text())
    frames = Table.read(night / "truth" / "frames.ecsv").filled("")
    assert set(frames["imagetyp"]) == set(settings["imagetyp"].values())
    light = frames[frames["imagetyp"] == settings["imagetyp"]["light"]][0]
    header = fits.getheader(night / light["path"])
    for setting, keyword in HEADER_KEYS.items():
        assert settings[setting] == keyword and keyword in header, setting
    assert header[settings["object_key"]] in settings["targets"]
    assert header[settings["xbinning_key"]] == settings["binning"]
    assert set(frames["filter"]) - {""} == set(settings["filters"])
    wasp = settings["targets"]["WASP-104"]
    assert wasp["b_prior"][0] == pytest.approx(6.90 * math.cos(math.radians(83.6)), abs=0.005)


def test_the_cached_sample_night_has_a_file_that_changes_nothing(night_dir, load_config):
    """The book's sample night (when generated by this simulator) carries its settings file."""
    file = night_dir / SETTINGS_FILE
    if not file.is_file():
        pytest.skip(f"the sample night has no {SETTINGS_FILE} (made by an older simulator): "
                    "run `make sample` again")
    seed = {name: os.environ[name] for name in ("DATARED_SAMPLE_SEED",) if name in os.environ}
    default = load_config(DATARED_DATA_DIR=night_dir, **seed)
    config = load_config(file, **seed)
    assert config.data_dir == night_dir
    changed = [name for name in setting_names(vars(default))
               if getattr(config, name) != getattr(default, name)]
    assert not changed, f"{file} changes {changed} against config.py"


def test_the_example_of_the_adapting_page_is_a_valid_settings_file(load_config, tmp_path):
    """book/adapting.md, section 2.2: its example file loads and says what section 6 says."""
    page = (Path(__file__).resolve().parents[1] / "book" / "adapting.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, flags=re.S)
    assert blocks, "book/adapting.md has no ```toml example"
    config = load_config(write(tmp_path, blocks[0]))
    assert config.data_dir == tmp_path / "ccd-night-2024-03-02"
    assert config.imagetyp["light"] == "Light Frame" and config.binning == 1
    assert list(config.targets) == ["NGC 2420"] and config.reference_catalog == "online"
    assert config.trim_section == "[1:2048, 1:2048]"
