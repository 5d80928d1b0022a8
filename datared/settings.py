"""Settings files: a TOML file named in ``DATARED_CONFIG`` overrides config.py's settings.

config.py calls :func:`apply_settings_file` with its own namespace at import, when the
variable is set (the package never imports config.py: the settings are passed in). The
rules, for the reader of ``book/adapting.md`` (section 2.2): config.py's values < the
settings file < the ``DATARED_*`` variables (``DATARED_DATA_DIR``, ``DATARED_WORK_DIR``,
``DATARED_CACHE_DIR``, ``DATARED_SAMPLE_SEED``), a variable that is set wins over the file. A
table in the file (``imagetyp``, ``site``, ``frame_quality_limits``) changes only the keys it
names; ``targets`` replaces config.py's targets whole (a target may also give
``aliases``, other OBJECT spellings, although config.py's targets have none);
``header_overrides`` is checked as frame type (a key of ``imagetyp``) -> header-keyword
setting (``filter_key`` ...) -> keyword. TOML has no None:
``overscan_section = ""`` (empty text) means None for the settings that allow None. Every
value is checked against the type of config.py's value; each mistake raises
:class:`SettingsFileError` naming the file, the key and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Settings whose DATARED_* variable, when set, wins over the settings file.
_ENVIRONMENT = {"data_dir": "DATARED_DATA_DIR", "work_dir": "DATARED_WORK_DIR",
                "cache_dir": "DATARED_CACHE_DIR", "sample_seed": "DATARED_SAMPLE_SEED"}
#: Tables keyed by names of things (not by settings): the file's table replaces them whole.
_REPLACED_TABLES = ("targets",)
#: Keys a target may have although no target of config.py has them, with a prototype value.
_OPTIONAL_TARGET_KEYS = {"aliases": ["M 37"]}
#: Names in config.py that are not settings a file may give.
_NOT_SETTINGS = ("repo_dir", "settings_file", "settings_in_file", "settings_changed_by_file",
                 "settings_overridden_by_environment")


def setting_names(settings: dict) -> list[str]:
    """Names of the settings a file may give: every public value of config.py except the
    computed ``repo_dir`` and the record of the settings file itself."""
    return [name for name, value in settings.items()
            if not name.startswith("_") and name not in _NOT_SETTINGS
            and isinstance(value, (bool, int, float, str, Path, list, tuple, dict, type(None)))]


class SettingsFileError(ValueError):
    """A settings file (DATARED_CONFIG) that cannot be used; the message names the fix."""


def _describe(value) -> str:
    """A TOML value in words, for error messages."""
    if isinstance(value, bool):
        return f"the truth value {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"the {type(value).__name__} {value}"


def _expected(default, may_be_none: bool) -> str:
    """What a setting with config.py's value ``default`` must be, in words, with an example."""
    none = ' (or "" for None)' if may_be_none else ""
    if isinstance(default, bool):
        return f"true or false, without quotes, like config.py's {str(default).lower()}"
    if isinstance(default, int):
        return f"a whole number, without quotes, like config.py's {default}"
    if isinstance(default, float):
        return f"a number, without quotes, like config.py's {default!r}"
    if isinstance(default, str):
        return f'text in double quotes, like config.py\'s "{default}"{none}'
    if default is None:
        return f'text in double quotes{none}'
    if isinstance(default, Path):
        return ('a path as text in double quotes (a relative path starts at the settings '
                "file's folder)")
    if isinstance(default, (list, tuple)):
        return "a list in square brackets, like [1.0, 2.0] or [\"g\", \"r\"]"
    return "a table ([name] on a line of its own, or {key = value, ...})"


def _unknown_key(file: Path, key: str, known, table: str = "",
                 value=None) -> SettingsFileError:
    """The error for a key of the file that config.py does not know, with the closest one."""
    import difflib

    place = f" in [{table}]" if table else ""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if key == "repo_dir" and not table:
        fix = "repo_dir is computed from where config.py is, not a setting. Remove it"
    elif close:
        fix = f"did you mean {close[0]!r}? Correct the name"
    elif not table and isinstance(value, dict):
        fix = (f"config.py has no table {key!r}. Settings are written at the top of the file, "
               f"not under a heading [{key}]: remove the heading")
    elif not table:
        fix = ("config.py has no setting of that name. Remove it, or use one of the names "
               "in config.py (book/adapting.md explains each)")
    else:
        fix = f"the keys of [{table}] are {', '.join(known)}. Correct or remove it"
    return SettingsFileError(f"settings file {file}: unknown key {key!r}{place}: {fix}.")


_ANY = object()  # a prototype that accepts any value (an empty or mixed list in config.py)


def _converted(file: Path, where: str, value, default, may_be_none: bool = False):
    """``value`` from the file, checked against (and converted like) config.py's ``default``."""
    if default is _ANY:
        return value
    if may_be_none and value == "":
        return None
    ok = False
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str) or default is None:
        ok = isinstance(value, str)
    elif isinstance(default, Path):
        ok = isinstance(value, str)
        if ok:
            path = Path(value).expanduser()
            value = path if path.is_absolute() else Path(os.path.normpath(file.parent / path))
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, list)
        if ok:
            kinds = {type(item) for item in default}
            proto = default[0] if len(kinds) == 1 else _ANY
            value = type(default)(_converted(file, f"{where}[{i}]", item, proto)
                                  for i, item in enumerate(value))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        if ok:  # a table inside a target, keyed by names (e.g. limb_darkening per filter)
            kinds = {type(item) for item in default.values()}
            proto = next(iter(default.values())) if len(kinds) == 1 else _ANY
            value = {k: _converted(file, f"{where}.{k}", v, proto) for k, v in value.items()}
    if not ok:
        raise SettingsFileError(
            f"settings file {file}: {where} must be {_expected(default, may_be_none)}, not "
            f"{_describe(value)}. Correct it in the file.")
    return value


def _merged_table(file: Path, name: str, value, default: dict) -> dict:
    """config.py's table ``default`` with the keys the file gives (each checked) replaced."""
    if not isinstance(value, dict):
        raise SettingsFileError(
            f"settings file {file}: {name} must be a table, not {_describe(value)}: write "
            f"[{name}] on a line of its own and its keys below it, one `key = value` a line.")
    merged = dict(default)
    for key, item in value.items():
        if key not in default:
            raise _unknown_key(file, key, default, table=name)
        merged[key] = _converted(file, f"{name}.{key}", item, default[key])
    return merged


def _image_types(file: Path, value, default: dict) -> dict:
    """config.py's ``imagetyp`` with the file's entries: each a text or a list of texts."""
    if not isinstance(value, dict):
        raise SettingsFileError(
            f"settings file {file}: imagetyp must be a table, not {_describe(value)}: write "
            "[imagetyp] on a line of its own and below it e.g. light = \"LIGHT\" or "
            "light = [\"LIGHT\", \"Light Frame\"].")
    merged = dict(default)
    for kind, item in value.items():
        if kind not in default:
            raise _unknown_key(file, kind, default, table="imagetyp")
        texts = item if isinstance(item, list) else [item]
        if not texts or not all(isinstance(text, str) for text in texts):
            raise SettingsFileError(
                f"settings file {file}: imagetyp.{kind} must be a text or a list of texts "
                f"(the header values of {kind} frames), not {_describe(item)}.")
        merged[kind] = item
    return merged


def _replaced_targets(file: Path, value, default: dict) -> dict:
    """The file's targets (replacing config.py's whole), each key checked against config.py's.

    A target must have the keys every target of config.py has (kind, ra_deg, dec_deg, filters)
    and no key that no target of config.py has.
    """
    if not isinstance(value, dict):
        raise SettingsFileError(
            f"settings file {file}: targets must be tables, one per target, not "
            f"{_describe(value)}: write [targets.M37] on a line of its own and the target's "
            "keys (kind, ra_deg, dec_deg, filters, ...) below it.")
    fields: dict[str, object] = {}  # every key of config.py's targets, with a first value
    for entry in default.values():
        for key, item in entry.items():
            fields.setdefault(key, item)
    required = [key for key in fields if all(key in entry for entry in default.values())]
    for key, item in _OPTIONAL_TARGET_KEYS.items():
        fields.setdefault(key, item)
    targets = {}
    for name, entry in value.items():
        table = f'targets."{name}"' if not name.replace("-", "").replace("_", "").isalnum() \
            else f"targets.{name}"
        if not isinstance(entry, dict):
            raise SettingsFileError(
                f"settings file {file}: the target {name!r} must be a table, not "
                f"{_describe(entry)}: write [{table}] on a line of its own and its keys below.")
        for key in entry:
            if fields and key not in fields:
                raise _unknown_key(file, key, fields, table=table)
        missing = [key for key in required if key not in entry]
        if missing:
            raise SettingsFileError(
                f"settings file {file}: the target {name!r} has no {', '.join(missing)}. The "
                "targets of a settings file replace config.py's targets whole, so give each "
                "target every key it needs (see config.py's targets).")
        targets[name] = {key: _converted(file, f"{table}.{key}", item, fields.get(key, _ANY))
                         for key, item in entry.items()}
    return targets


def _header_overrides(file: Path, value, frame_types, key_settings) -> dict:
    """The file's ``header_overrides``: frame type -> {header-keyword setting: keyword}."""
    example = '[header_overrides.flat] with filter_key = "FILTNAME" below it'
    if not isinstance(value, dict):
        raise SettingsFileError(f"settings file {file}: header_overrides must be a table, not "
                                f"{_describe(value)}: write {example}.")
    overrides = {}
    for kind, table in value.items():
        if kind not in frame_types:
            raise _unknown_key(file, kind, frame_types, table="header_overrides")
        if not isinstance(table, dict):
            raise SettingsFileError(
                f"settings file {file}: header_overrides.{kind} must be a table of keyword "
                f"settings, not {_describe(table)}: write {example}.")
        for setting, keyword in table.items():
            if setting not in key_settings:
                raise _unknown_key(file, setting, key_settings,
                                   table=f"header_overrides.{kind}")
            if not isinstance(keyword, str):
                raise SettingsFileError(
                    f"settings file {file}: header_overrides.{kind}.{setting} must be a "
                    f'keyword as text in double quotes, like "FILTNAME", not '
                    f"{_describe(keyword)}. Correct it in the file.")
        overrides[kind] = dict(table)
    return overrides


def apply_settings_file(settings: dict, name: str, *, sample_night_name) -> None:
    """Read the settings file ``name`` (TOML) and replace the settings by its values.

    Parameters
    ----------
    settings : the settings module's namespace (``globals()`` of config.py), changed in place:
        each setting the file gives, and ``settings_file``, ``settings_in_file``,
        ``settings_changed_by_file`` and ``settings_overridden_by_environment``.
    name : the file (``DATARED_CONFIG``).
    sample_night_name : ``(preset, seed) -> folder name`` of a simulated night in
        ``cache_dir`` (config.py's default ``data_dir``).
    """
    import tomllib

    known = setting_names(settings)
    may_be_none = {key for key, annotation in settings.get("__annotations__", {}).items()
                   if "None" in str(annotation)}

    file = Path(os.path.abspath(Path(name).expanduser()))
    fix = "correct DATARED_CONFIG, or unset it to use config.py only"
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise SettingsFileError(f"DATARED_CONFIG names the settings file {file}, which {what}: "
                                f"{fix}.")
    try:
        with file.open("rb") as stream:
            data = tomllib.load(stream)
    except tomllib.TOMLDecodeError as err:
        raise SettingsFileError(
            f"settings file {file}: not valid TOML: {err}. Correct that line (each setting "
            'is `name = value`, text in double quotes: camera = "QHY600M").') from None
    except UnicodeDecodeError as err:
        raise SettingsFileError(f"settings file {file}: not UTF-8 text ({err}): save it as "
                                "UTF-8.") from None
    except OSError as err:
        raise SettingsFileError(f"settings file {file} cannot be read "
                                f"({err.strerror or err}): {fix}.") from None

    before = {key: settings[key] for key in known}
    data_dir_is_default = ("DATARED_DATA_DIR" not in os.environ
                           and before["data_dir"] == before["cache_dir"] / settings["_sample_name"])
    values = {}
    for key, value in data.items():
        if key not in before:
            raise _unknown_key(file, key, known, value=value)
        if key in _REPLACED_TABLES:
            values[key] = _replaced_targets(file, value, before[key])
        elif key == "imagetyp":
            values[key] = _image_types(file, value, before[key])
        elif key == "header_overrides":
            values[key] = _header_overrides(
                file, value, list(before.get("imagetyp", {})),
                [name for name in known if name.endswith("_key")])
        elif isinstance(before[key], dict):
            values[key] = _merged_table(file, key, value, before[key])
        else:
            values[key] = _converted(file, key, value, before[key], key in may_be_none)
    overridden = {}
    for key, value in values.items():
        variable = _ENVIRONMENT.get(key)
        if variable and variable in os.environ:
            overridden[key] = variable  # the variable wins: config.py's line already used it
        else:
            settings[key] = value
    if "data_dir" not in values and data_dir_is_default:  # follows cache_dir, preset, seed
        settings["_sample_name"] = sample_night_name(settings["sample_preset"],
                                                      settings["sample_seed"])
        settings["data_dir"] = settings["cache_dir"] / settings["_sample_name"]
    settings["settings_file"] = file
    settings["settings_in_file"] = tuple(key for key in known if key in values)
    settings["settings_changed_by_file"] = tuple(
        key for key in known if (key in values or key == "data_dir")
        and settings[key] != before[key])
    settings["settings_overridden_by_environment"] = overridden
