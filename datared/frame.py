"""The one frame model: a calibrated frame on disk and the header values every chapter needs.

A calibrated frame is a FITS file written by :func:`write_frame` (through
``CCDData.write``): the float32 image in the primary HDU with the raw header, HISTORY cards
and, after chapter 03, a celestial WCS; a ``MASK`` extension (uint8, non-zero = bad) and an
optional ``UNCERT`` extension (1-sigma, ADU). :func:`read_frame` reads it back as a
:class:`Frame`. Every chapter and helper reads calibrated frames with it.

Header keywords differ between acquisition programs. :class:`HeaderKeys` names the ones a
night uses (built once from the book's settings with :meth:`HeaderKeys.from_settings`) and
the helpers below read a value through it, raising :class:`~datared.errors.FrameError` with
the file, the keyword and the setting to change when the value is missing or unreadable.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.wcs import WCS, FITSFixedWarning

from datared.errors import FrameError

#: Prefixes of the header keywords that describe a WCS (removed before a new WCS is written).
WCS_KEY_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_",
                    "CROTA", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES", "A_", "B_",
                    "AP_", "BP_", "PV1_", "PV2_", "IMAGEW", "IMAGEH", "WCSNAME", "MJDREF",
                    "TIMESYS")


@dataclass(frozen=True)
class HeaderKeys:
    """The header keywords of one night's acquisition software (NINA's names by default).

    Build it from the book's settings with :meth:`from_settings`; each field is named after
    the setting (``filter`` <- ``config.filter_key``) so that messages can say what to change.
    """

    imagetyp: str = "IMAGETYP"
    filter: str = "FILTER"
    exptime: str = "EXPTIME"
    date: str = "DATE-OBS"
    object: str = "OBJECT"
    xbinning: str = "XBINNING"
    ybinning: str = "YBINNING"
    airmass: str = "AIRMASS"
    ra: str = "RA"
    dec: str = "DEC"
    pierside: str = "PIERSIDE"
    #: keyword of the time of day when ``date`` holds only the date ("" = ``date`` has both)
    time: str = ""
    #: one keyword with both binnings, e.g. ``CCDSUM = '3 3'`` ("" = ``xbinning``/``ybinning``)
    binning: str = ""

    @classmethod
    def from_settings(cls, settings, frame_type: str | None = None) -> HeaderKeys:
        """The keywords named by a settings object or module (``config.filter_key`` ...).

        A setting that is None (``time_key``, ``binning_key``) gives "" (not used). With
        ``frame_type`` (``"bias"``, ``"dark"``, ``"flat"``, ``"light"``) the keywords of
        ``settings.header_overrides[frame_type]`` replace the night's (see :meth:`for_type`).
        """
        values = {}
        for item in fields(cls):
            name = f"{item.name}_key"
            if hasattr(settings, name):
                value = getattr(settings, name)
                values[item.name] = "" if value is None else str(value)
        keys = cls(**values)
        if frame_type is None:
            return keys
        return keys.for_type(frame_type, getattr(settings, "header_overrides", None) or {})

    def for_type(self, frame_type: str, overrides: dict) -> HeaderKeys:
        """These keywords with the overrides of one frame type.

        Parameters
        ----------
        frame_type : ``"bias"``, ``"dark"``, ``"flat"`` or ``"light"``.
        overrides : ``config.header_overrides``: frame type -> {setting: keyword}, e.g.
            ``{"flat": {"filter_key": "FILTNAME"}}`` (the flats name their filter in
            ``FILTNAME``, the other frames in ``filter_key``).
        """
        known = {item.name for item in fields(self)}
        values = {}
        for setting, keyword in (overrides.get(frame_type) or {}).items():
            name = setting[:-4] if setting.endswith("_key") else setting
            if name not in known:
                raise ValueError(f"header_overrides[{frame_type!r}]: {setting!r} is not a "
                                 "header-keyword setting; use one of "
                                 f"{', '.join(self.setting(k) for k in sorted(known))}")
            values[name] = "" if keyword is None else str(keyword)
        return replace(self, **values) if values else self

    def setting(self, field_name: str) -> str:
        """The name of the setting that holds a keyword, for messages (``filter_key``)."""
        return f"{field_name}_key"


#: NINA's keywords: the default of every function that takes ``keys``.
NINA_KEYS = HeaderKeys()

#: Metadata names (NINA's spelling) of the header values a catalogue keeps.
META_FIELDS = {"DATE-OBS": "date", "EXPTIME": "exptime", "AIRMASS": "airmass",
               "FILTER": "filter", "OBJECT": "object", "PIERSIDE": "pierside",
               "XBINNING": "xbinning", "YBINNING": "ybinning", "RA": "ra", "DEC": "dec",
               "IMAGETYP": "imagetyp"}
#: Further header values kept as they are, when present.
META_EXTRA = ("GAIN", "OFFSET", "CCD-TEMP", "MJD-OBS", "JD")


@dataclass
class Frame:
    """A calibrated frame: image (float32, ADU), mask (True = bad, or None), uncertainty
    (1-sigma ADU, or None), header, celestial WCS (or None) and the file it came from."""

    path: Path
    data: np.ndarray
    header: fits.Header
    wcs: WCS | None = None
    mask: np.ndarray | None = None
    uncertainty: np.ndarray | None = None

    @property
    def name(self) -> str:
        """File name of the frame."""
        return self.path.name

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (rows, columns)."""
        return tuple(self.data.shape)

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel scale from the WCS, arcsec per pixel (geometric mean of both axes)."""
        if self.wcs is None:
            raise FrameError(f"{self.path.name}: the frame has no WCS; run "
                             "notebooks/03-astrometry.ipynb to solve it first")
        return pixel_scale_of(self.wcs)

    def bad_pixels(self) -> np.ndarray:
        """The mask as a boolean array (all False when the frame has no mask)."""
        if self.mask is None:
            return np.zeros(self.data.shape, dtype=bool)
        return self.mask


def pixel_scale_of(wcs: WCS) -> float:
    """Pixel scale of a WCS, arcsec per pixel (geometric mean of both axes, at CRPIX)."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    scales = proj_plane_pixel_scales(wcs.celestial) * 3600.0
    return float(np.sqrt(scales[0] * scales[1]))


def quiet_wcs(header: fits.Header) -> WCS | None:
    """The celestial WCS of a header, or None; astropy's repair notes are silenced.

    Acquisition software writes non-standard cards (a DATE-OBS without time zone, ...);
    astropy repairs them and says so with ``FITSFixedWarning`` and ``VerifyWarning``.
    """
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", VerifyWarning)
        wcs = WCS(header)
    return wcs if wcs.has_celestial else None


def has_celestial_wcs(header: fits.Header) -> bool:
    """True if a FITS header holds a celestial WCS (e.g. written by the astrometry chapter)."""
    return quiet_wcs(header) is not None


def header_without_wcs(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without any WCS keywords (the pointing RA/DEC stays)."""
    clean = header.copy()
    for key in list(clean.keys()):
        if key.startswith(WCS_KEY_PREFIXES) and key not in ("RA", "DEC"):
            del clean[key]
    return clean


def hdu_data(hdul: fits.HDUList, index: int, path: str | Path):
    """The data of HDU ``index`` of an open file; a truncated file raises a clear FrameError.

    astropy reads the pixels lazily and reports a file cut short (a copy interrupted, a disk
    full while the camera wrote) only as "cannot reshape array of size N into shape ...";
    this says how much of the image is there and what to do.
    """
    try:
        return hdul[index].data
    except (ValueError, TypeError) as err:
        hdu = hdul[index]
        axes = [int(hdu.header.get(f"NAXIS{k}", 0)) for k in range(1, int(hdu.header.get("NAXIS", 0)) + 1)]
        expected = int(np.prod(axes)) if axes else 0
        bytes_per_pixel = abs(int(hdu.header.get("BITPIX", 8))) // 8 or 1
        path = Path(path)
        try:
            start = int(hdul.fileinfo(index)["datLoc"])
            have = max(0, (path.stat().st_size - start) // bytes_per_pixel)
        except (OSError, KeyError, TypeError):
            have = None
        compressed = path.name.lower().endswith((".gz", ".fz", ".bz2"))
        if have is None or compressed or have >= expected:
            what = f"its image data cannot be read ({err})"
        else:
            what = (f"the file is truncated: {have} of the {expected} pixels "
                    f"({' x '.join(str(a) for a in axes)}) its header announces are there")
        raise FrameError(f"{path.name}: {what}. Copy the file again from the camera computer, "
                         "or remove it from the night folder.") from None


def read_frame(path: str | Path) -> Frame:
    """Read a calibrated frame (image, ``MASK``, ``UNCERT``, header, WCS) as a :class:`Frame`.

    Raises ``OSError`` when the file cannot be read as FITS and :class:`FrameError` when its
    primary HDU holds no 2D image; both name the file.

    Parameters
    ----------
    path : FITS file written by :func:`write_frame` (or any single-image FITS file).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            # hdu_data says it better for a truncated file
            warnings.filterwarnings("ignore", message="File may have been truncated")
            with fits.open(path, memmap=False) as hdul:
                data = hdu_data(hdul, 0, path)
                header = hdul[0].header.copy()
                mask = np.asarray(hdul["MASK"].data) != 0 if "MASK" in hdul else None
                uncertainty = (np.asarray(hdul["UNCERT"].data, dtype=np.float32)
                               if "UNCERT" in hdul else None)
    except OSError as err:
        raise OSError(f"{path}: cannot be read as FITS ({err}); rerun the chapter that wrote "
                      "it, or remove the file") from err
    if data is None or np.ndim(data) != 2:
        raise FrameError(f"{path}: expected a 2D image in the primary HDU, found "
                         f"{'none' if data is None else np.shape(data)}; write calibrated "
                         "frames as single images")
    data = np.asarray(data, dtype=np.float32)
    if mask is not None and mask.shape != data.shape:
        raise FrameError(f"{path}: MASK {mask.shape} and image {data.shape} differ in size; "
                         "rerun notebooks/02-pre-reduction.ipynb")
    return Frame(path, data, header, quiet_wcs(header), mask, uncertainty)


def write_frame(ccd, path: str | Path, *, header: fits.Header | None = None) -> Path:
    """Write a calibrated frame: float32 image, ``MASK`` (uint8) and ``UNCERT`` if present.

    Parameters
    ----------
    ccd : ``CCDData`` (from calibration) or :class:`Frame`.
    path : output file (overwritten: reruns are safe).
    header : header to write instead of the frame's own (e.g. with a new WCS).
    """
    from astropy.nddata import CCDData, StdDevUncertainty

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(ccd, Frame):
        uncertainty = (None if ccd.uncertainty is None
                       else StdDevUncertainty(ccd.uncertainty, unit="adu"))
        ccd = CCDData(ccd.data, unit="adu", meta=ccd.header, mask=ccd.mask,
                      uncertainty=uncertainty)
    if header is not None:
        ccd = CCDData(ccd.data, unit=ccd.unit, meta=header, mask=ccd.mask,
                      uncertainty=ccd.uncertainty)
    ccd.data = np.asarray(ccd.data, dtype=np.float32)
    if ccd.uncertainty is not None:
        ccd.uncertainty.array = np.asarray(ccd.uncertainty.array, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        ccd.write(path, overwrite=True, hdu_mask="MASK", hdu_uncertainty="UNCERT")
    return path


# ---------------------------------------------------------------------------------------
# Header values
# ---------------------------------------------------------------------------------------

def _where(file) -> str:
    return f"{Path(file).name}: " if file else ""


def header_value(header, keys: HeaderKeys, field_name: str, *, file: str | Path | None = None):
    """The value of one of the night's keywords; :class:`FrameError` naming file, keyword and
    setting when it is missing or empty.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : the night's keywords.
    field_name : which one (a field of :class:`HeaderKeys`: ``"filter"``, ``"exptime"``...).
    file : the frame's file, for the message.
    """
    key = getattr(keys, field_name)
    value = header.get(key) if key else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FrameError(f"{_where(file)}the header has no {key} keyword ({field_name}); add "
                         f"it, or set {keys.setting(field_name)} in config.py to the keyword "
                         "your software writes")
    return value


def text_value(header, keys: HeaderKeys, field_name: str, *,
               file: str | Path | None = None) -> str:
    """A keyword's value as stripped text (filter, object, pier side...)."""
    return str(header_value(header, keys, field_name, file=file)).strip()


def number_value(header, keys: HeaderKeys, field_name: str, *,
                 file: str | Path | None = None) -> float:
    """A keyword's value as a float (exposure time, airmass...); FrameError if not a number."""
    value = header_value(header, keys, field_name, file=file)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        key = getattr(keys, field_name)
        raise FrameError(f"{_where(file)}{key} = {value!r} is not a number; fix the header or "
                         f"set {keys.setting(field_name)} in config.py")
    return number


def header_pointing(header, keys: HeaderKeys = NINA_KEYS, *,
                    file: str | Path | None = None) -> tuple[float, float]:
    """The telescope pointing in a header as (RA, Dec) in degrees.

    Accepts numbers in degrees (NINA's ``RA``/``DEC``) and sexagesimal strings, which many
    other programs write (``OBJCTRA = '05 52 18.0'`` in hours, ``OBJCTDEC = '+32 33 12'`` in
    degrees). Raises :class:`FrameError` naming the keyword when it is missing or unreadable.

    Parameters
    ----------
    header : FITS header (or any mapping) of the frame.
    keys : the night's keywords (``ra`` and ``dec`` are used).
    file : the frame's file, for the message.
    """
    from astropy.coordinates import Angle

    values = []
    for field_name, sexagesimal_unit in (("ra", "hourangle"), ("dec", "deg")):
        value = header_value(header, keys, field_name, file=file)
        key = getattr(keys, field_name)
        try:
            values.append(float(value))
            continue
        except (TypeError, ValueError):
            pass
        try:
            values.append(Angle(str(value).strip(), unit=sexagesimal_unit).deg)
        except ValueError:
            raise FrameError(f"{_where(file)}cannot read {key} = {value!r} as an angle "
                             "(degrees, or sexagesimal hours for RA / degrees for Dec); set "
                             f"{keys.setting(field_name)} in config.py") from None
    ra, dec = values
    if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0):
        raise FrameError(f"{_where(file)}{keys.ra}, {keys.dec} = {ra}, {dec} degrees is not a "
                         "position on the sky")
    return ra, dec


#: A date without a time of day (``2019-03-26``).
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")
#: An ISO date and time with a UTC offset at the end (``...T21:12:45-0700``, ``+02:00``, ``Z``).
_UTC_OFFSET = re.compile(r"(?P<stamp>.*T\d{2}:\d{2}(?::\d{2}(?:\.\d*)?)?)\s*"
                         r"(?:(?P<zulu>Z)|(?P<sign>[+-])(?P<hours>\d{2}):?(?P<minutes>\d{2}))")


def _start_stamp(header, keys: HeaderKeys, file) -> tuple[str, float]:
    """The start of the exposure as an ISO stamp without offset, and the offset in hours."""
    value = header_value(header, keys, "date", file=file)
    text = str(value).strip()
    if keys.time:
        clock = str(header_value(header, keys, "time", file=file)).strip()
        text = f"{text.split('T')[0].strip()}T{clock}"
    elif _DATE_ONLY.fullmatch(text):
        raise FrameError(f"{_where(file)}{keys.date} = {value!r} holds only a date, no time of "
                         "day; set time_key in config.py to the keyword that holds the time "
                         "(e.g. \"TIME-OBS\", or \"UT\" for MaxIm DL)")
    offset = 0.0
    match = _UTC_OFFSET.fullmatch(text)
    if match:
        text = match["stamp"]
        if match["sign"]:
            offset = int(match["hours"]) + int(match["minutes"]) / 60.0
            offset = -offset if match["sign"] == "-" else offset
    return text, offset


def frame_time(header, keys: HeaderKeys = NINA_KEYS, *, file: str | Path | None = None,
               middle: bool = True):
    """The time of a frame as an astropy ``Time`` (UTC): the middle of the exposure by default.

    The date keyword holds the start of the exposure in ISO format (NINA, MaxIm DL, ...); the
    middle adds half the exposure time. When ``keys.time`` is set (``config.time_key``) the
    date keyword holds only the date and that keyword the time of day (``DATE-OBS =
    '2019-03-26'``, ``TIME-OBS = '03:12:45.1'``). A stamp with a UTC offset
    (``2019-03-26T21:12:45-0700``, ``+02:00``, ``Z``) is converted to UTC. A date without a
    time and without ``time_key`` is an error, not midnight. :class:`FrameError` names the
    file, the value and the setting when the date is missing or does not parse.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : the night's keywords (``date``, ``time`` if set, and ``exptime`` are used).
    file : the frame's file, for the message.
    middle : the middle of the exposure (True) or its start (False).
    """
    from astropy import units as u
    from astropy.time import Time

    text, offset_hours = _start_stamp(header, keys, file)
    try:
        start = Time(text, format="isot", scale="utc")
    except ValueError:
        if keys.time:
            shown = (f"{keys.date} = {header.get(keys.date)!r} and {keys.time} = "
                     f"{header.get(keys.time)!r} do not make an ISO date and time")
            fix = "set date_key and time_key in config.py to the keywords of the date and time"
        else:
            shown = f"{keys.date} = {header.get(keys.date)!r} is not an ISO date and time"
            fix = "set date_key in config.py to the keyword that holds the start of the exposure"
        raise FrameError(f"{_where(file)}{shown} (YYYY-MM-DDThh:mm:ss); {fix}") from None
    if offset_hours:
        start = start - offset_hours * u.hour
    if not middle:
        return start
    return start + 0.5 * number_value(header, keys, "exptime", file=file) * u.s


def frame_binning(header, keys: HeaderKeys = NINA_KEYS, *,
                  file: str | Path | None = None) -> tuple[int, int]:
    """The binning of a frame as (x, y): from ``keys.binning`` (``CCDSUM = '3 3'``) when set,
    else from ``keys.xbinning`` and ``keys.ybinning``.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : the night's keywords.
    file : the frame's file, for the message.
    """
    if keys.binning:
        value = header_value(header, keys, "binning", file=file)
        parts = str(value).replace(",", " ").replace("x", " ").split()
        try:
            numbers = [int(float(part)) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) == 1:
            numbers = numbers * 2
        if len(numbers) != 2 or min(numbers) < 1:
            raise FrameError(f"{_where(file)}{keys.binning} = {value!r} is not a binning like "
                             "'2 2'; set binning_key in config.py (or None to use "
                             "xbinning_key and ybinning_key)")
        return numbers[0], numbers[1]
    return (int(number_value(header, keys, "xbinning", file=file)),
            int(number_value(header, keys, "ybinning", file=file)))


def image_type_values(setting) -> list[str]:
    """The header values that one entry of ``config.imagetyp`` accepts: a text or a list of
    texts (``"LIGHT"``, ``["LIGHT", "Light Frame"]``)."""
    values = [setting] if isinstance(setting, str) else list(setting)
    if not values or not all(isinstance(value, str) for value in values):
        raise ValueError(f"config.imagetyp: each entry must be a text or a list of texts, "
                         f"got {setting!r}")
    return values


def frame_kind(value, imagetyp: dict) -> str | None:
    """The kind of frame (a key of ``config.imagetyp``: "bias", "dark", "flat", "light")
    whose value, or one of whose values, the header value ``value`` is, ignoring case and
    surrounding spaces (``'Light Frame'``, ``'light'``); None for another value or none."""
    if value is None or np.ma.is_masked(value):
        return None
    wanted = str(value).strip().casefold()
    for kind, setting in imagetyp.items():
        if any(wanted == text.strip().casefold() for text in image_type_values(setting)):
            return kind
    return None


def _name_form(text: str) -> str:
    """A name for comparison: lower case, without spaces, '-' and '_'."""
    return re.sub(r"[\s_\-]+", "", str(text)).lower()


def target_of(header, keys: HeaderKeys, targets: dict, *,
              file: str | Path | None = None) -> str:
    """The target (a key of ``config.targets``) of a science frame, from its OBJECT value.

    The OBJECT value matches a target's name or one of its ``aliases`` (a list in the
    target's entry, e.g. ``"aliases": ["M 37", "NGC2099"]``), ignoring case, spaces, '-'
    and '_' and a filter name at its end (``M37_g``, ``M37 r``). :class:`FrameError` names
    the file, the OBJECT value and the setting when no target matches.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : the night's keywords (``object`` and, if present, ``filter``).
    targets : ``config.targets``: name -> entry (``filters``, optional ``aliases``).
    file : the frame's file, for the message.
    """
    value = text_value(header, keys, "object", file=file)
    names = {}
    for name, entry in targets.items():
        for spelling in [name, *((entry or {}).get("aliases") or [])]:
            names.setdefault(_name_form(spelling), name)
    wanted = _name_form(value)
    if wanted in names:
        return names[wanted]
    bands = {_name_form(band) for entry in targets.values()
             for band in (entry or {}).get("filters") or []}
    if keys.filter and header.get(keys.filter) is not None:
        bands.add(_name_form(header.get(keys.filter)))
    for band in sorted(bands - {""}, key=len, reverse=True):
        if wanted.endswith(band) and wanted[:-len(band)] in names:
            return names[wanted[:-len(band)]]
    raise FrameError(f"{_where(file)}{keys.object} = {value!r} matches no target of "
                     f"config.targets ({', '.join(targets) or 'none'}); add it to the "
                     "\"aliases\" list of its target in config.targets (or add the target)")


def frame_epoch(header, keys: HeaderKeys = NINA_KEYS, *,
                file: str | Path | None = None) -> float:
    """Julian year of the start of the exposure (for proper motions: a day is 0.003 yr)."""
    return float(frame_time(header, keys, file=file, middle=False).jyear)


def header_meta(header, keys: HeaderKeys = NINA_KEYS) -> dict:
    """The header values worth keeping in a catalogue's metadata (those present).

    The metadata always uses NINA's names (``DATE-OBS``, ``EXPTIME``, ...), whatever the
    camera software wrote, so later chapters read every night's catalogues the same way;
    ``DATE-OBS`` is the start of the exposure in UTC as :func:`frame_time` reads it (a
    separate time keyword and a UTC offset already applied), so that ``frame_time(meta)``
    with NINA's keywords gives the same time.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : the night's keywords.
    """
    meta = {}
    for name, field_name in META_FIELDS.items():
        source = getattr(keys, field_name)
        if source in header:
            meta[name] = header[source]
    if keys.date in header and (keys.time or _UTC_OFFSET.fullmatch(str(header[keys.date]).strip())):
        try:
            meta["DATE-OBS"] = frame_time(header, keys, middle=False).isot
        except FrameError:
            pass  # kept as written; frame_time says what is wrong where the time is needed
    for name in META_EXTRA:
        if name in header:
            meta[name] = header[name]
    return meta
