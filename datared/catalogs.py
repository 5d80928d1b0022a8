"""Reference catalogues: Gaia DR3 (astrometry) and ATLAS-REFCAT2 (photometry).

Two sources, chosen by ``config.reference_catalog``:

``"sample"``
    the simulated night's ``data_dir/catalogs/gaia.ecsv`` and ``refcat2.ecsv``.
``"online"``
    VizieR through astroquery: Gaia DR3 (``I/355/gaiadr3``) and ATLAS-REFCAT2
    (``J/ApJ/867/105/refcat2``). Each answer is cached as an ECSV file under
    ``cache_dir/catalogs/``, so a night is queried once and later runs work offline.

Both return the same column names: Gaia's archive names (``ra``, ``dec``, ``pmra``,
``pmdec``, ``ref_epoch``, ``phot_g_mean_mag``, ...) and VizieR's names for REFCAT2
(``RA_ICRS``, ``DE_ICRS``, ``gmag``, ``e_gmag``, ``rmag``, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from datared.errors import DataredError

GAIA_VIZIER = "I/355/gaiadr3"
REFCAT2_VIZIER = "J/ApJ/867/105/refcat2"

#: VizieR's Gaia DR3 columns and the Gaia archive names we give them.
GAIA_COLUMNS = {
    "Source": "source_id", "RA_ICRS": "ra", "e_RA_ICRS": "ra_error", "DE_ICRS": "dec",
    "e_DE_ICRS": "dec_error", "Plx": "parallax", "pmRA": "pmra", "pmDE": "pmdec",
    "Gmag": "phot_g_mean_mag", "BPmag": "phot_bp_mean_mag", "RPmag": "phot_rp_mean_mag",
}
#: REFCAT2 columns kept (VizieR names, as in the sample night's refcat2.ecsv).
REFCAT2_COLUMNS = ["RA_ICRS", "DE_ICRS", "Plx", "pmRA", "pmDE", "Gmag", "gmag", "e_gmag",
                   "rmag", "e_rmag", "imag", "e_imag", "zmag", "e_zmag", "rp1", "r1", "dupvar"]
#: Epoch of Gaia DR3 positions (Julian year).
GAIA_DR3_EPOCH = 2016.0


class CatalogUnavailableError(DataredError, RuntimeError):
    """A reference catalogue could neither be read nor downloaded."""


def load_gaia(ra_deg: float, dec_deg: float, radius_deg: float, *, source: str,
              data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
              index_dir: str | Path | None = None, mag_limit: float | None = None,
              vizier=None) -> Table:
    """Gaia DR3 stars within ``radius_deg`` of a position.

    Parameters
    ----------
    ra_deg, dec_deg : centre of the cone, degrees (ICRS).
    radius_deg : cone radius, degrees.
    source : "sample", "online" or "index" (``config.reference_catalog``). "index" reads the
        stars of the astrometry.net index files in ``index_dir`` (positions and the index's
        magnitude, no proper motions; :func:`datared.astrometry_net.index_catalog`), for
        astrometry with no network and no catalogue file.
    data_dir : the night's folder, needed for "sample" (``config.data_dir``).
    cache_dir : cache folder, needed for "online" (``config.cache_dir``).
    index_dir : folder of index files, needed for "index" (``config.astrometry_index_dir``).
    mag_limit : keep stars brighter than this G magnitude.
    vizier : an ``astroquery.vizier.VizierClass`` to use (tests pass one with a fake network).

    Returns a table with ``source_id``, ``ra``, ``dec`` (degrees), ``pmra``, ``pmdec``
    (mas/yr), ``ref_epoch`` (Julian year), ``phot_g_mean_mag`` and more, brightest first.
    """
    if source == "index":
        if index_dir is None:
            raise CatalogUnavailableError(
                "reference_catalog = \"index\" in config.py reads the stars of astrometry.net "
                "index files: set astrometry_index_dir to the folder that holds them")
        from datared.astrometry_net import index_catalog

        table = index_catalog(index_dir, ra_deg, dec_deg, radius_deg)
        return table if mag_limit is None else \
            table[np.asarray(table["phot_g_mean_mag"], float) <= mag_limit]
    source, data_dir, cache_dir = _defaults(source, data_dir, cache_dir)
    if source == "sample":
        table = _read_sample(data_dir, "gaia.ecsv")
    else:
        def fetch() -> Table:
            raw = query_vizier(GAIA_VIZIER, list(GAIA_COLUMNS), ra_deg, dec_deg, radius_deg,
                               vizier=vizier)
            table = Table()
            for vizier_name, gaia_name in GAIA_COLUMNS.items():
                if vizier_name in raw.colnames:
                    table[gaia_name] = raw[vizier_name]
            table["ref_epoch"] = np.full(len(table), GAIA_DR3_EPOCH)
            table.meta["source"] = f"VizieR {GAIA_VIZIER}"
            return table

        table = _cached_query(cache_dir, "gaiadr3", ra_deg, dec_deg, radius_deg, fetch)
    table = cone(table, ra_deg, dec_deg, radius_deg, ra_col="ra", dec_col="dec")
    if mag_limit is not None:
        table = table[np.asarray(table["phot_g_mean_mag"], float) <= mag_limit]
    table.sort("phot_g_mean_mag")
    return table


def load_refcat2(ra_deg: float, dec_deg: float, radius_deg: float, *,
                 source: str, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, vizier=None) -> Table:
    """ATLAS-REFCAT2 stars (g, r, i AB magnitudes) within ``radius_deg`` of a position.

    Parameters
    ----------
    ra_deg, dec_deg : centre of the cone, degrees (ICRS).
    radius_deg : cone radius, degrees.
    source : "sample" or "online" (``config.reference_catalog``).
    data_dir : the night's folder, needed for "sample" (``config.data_dir``).
    cache_dir : cache folder, needed for "online" (``config.cache_dir``).
    vizier : an ``astroquery.vizier.VizierClass`` to use (tests pass one with a fake network).

    Returns a table with VizieR's column names (``RA_ICRS``, ``DE_ICRS`` in degrees,
    ``gmag``, ``e_gmag``, ``rmag``, ``e_rmag``, ``imag``, ``e_imag``, ...).
    """
    if source == "index":
        raise CatalogUnavailableError(
            "reference_catalog = \"index\" in config.py gives positions only (from the "
            "astrometry.net index files), and this step needs ATLAS-REFCAT2 magnitudes: set "
            "reference_catalog = \"online\" (the answer is cached in config.cache_dir, so the "
            "network is needed once) or \"sample\" for the simulated night")
    source, data_dir, cache_dir = _defaults(source, data_dir, cache_dir)
    if source == "sample":
        table = _read_sample(data_dir, "refcat2.ecsv")
    else:
        def fetch() -> Table:
            table = query_vizier(REFCAT2_VIZIER, REFCAT2_COLUMNS, ra_deg, dec_deg, radius_deg,
                                 vizier=vizier)
            table.meta["source"] = f"VizieR {REFCAT2_VIZIER}"
            return table

        table = _cached_query(cache_dir, "refcat2", ra_deg, dec_deg, radius_deg, fetch)
    return cone(table, ra_deg, dec_deg, radius_deg, ra_col="RA_ICRS", dec_col="DE_ICRS")


def cone(table: Table, ra_deg: float, dec_deg: float, radius_deg: float, *,
         ra_col: str, dec_col: str) -> Table:
    """Rows of ``table`` within ``radius_deg`` (degrees) of (``ra_deg``, ``dec_deg``)."""
    if len(table) == 0:
        return table
    stars = SkyCoord(np.asarray(table[ra_col], float) * u.deg,
                     np.asarray(table[dec_col], float) * u.deg)
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    return table[stars.separation(centre) <= radius_deg * u.deg]


def query_vizier(catalog: str, columns: list[str], ra_deg: float, dec_deg: float,
                 radius_deg: float, *, vizier=None, timeout_s: float = 60.0) -> Table:
    """One cone search in a VizieR catalogue (all rows), with a clear error when offline.

    Parameters
    ----------
    catalog : VizieR table, e.g. ``"I/355/gaiadr3"``.
    columns : columns to return.
    ra_deg, dec_deg : cone centre, degrees.
    radius_deg : cone radius, degrees.
    vizier : an ``astroquery.vizier.VizierClass`` (default: a new one).
    timeout_s : network timeout, seconds.
    """
    import requests
    from astroquery.vizier import VizierClass

    if vizier is None:
        vizier = VizierClass(columns=columns, row_limit=-1, timeout=timeout_s)
    else:
        vizier.columns = columns
        vizier.ROW_LIMIT = -1
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    try:
        result = vizier.query_region(centre, radius=radius_deg * u.deg, catalog=catalog,
                                     cache=False)
    except (requests.exceptions.RequestException, OSError) as err:
        raise CatalogUnavailableError(
            f"VizieR ({catalog}) is unreachable: {err.__class__.__name__}: {err}. Check the "
            "internet connection and retry; answers are cached in config.cache_dir, so a "
            "night needs the network once. Offline: for the astrometry (chapter 03), install "
            "astrometry.net index files and set astrometry_backend = \"astrometry.net\", "
            "astrometry_index_dir and reference_catalog = \"index\" (book/installation.md, "
            "section 4); reference_catalog = \"sample\" is for the simulated night only."
        ) from None
    if len(result) == 0:
        raise CatalogUnavailableError(
            f"VizieR returned no stars of {catalog} within {radius_deg:g} deg of "
            f"RA {ra_deg:.4f}, Dec {dec_deg:.4f}: check the coordinates in config.targets."
        )
    table = Table(result[0], masked=False)
    for name in table.colnames:  # plain columns, NaN for missing values
        column = result[0][name]
        if hasattr(column, "mask") and np.any(column.mask) and column.dtype.kind == "f":
            table[name] = column.filled(np.nan)
    return table


def _defaults(source, data_dir, cache_dir):
    """Check the source and that the folder it needs is given (``data_dir`` or ``cache_dir``)."""
    if source not in ("sample", "online"):
        raise ValueError(f"reference_catalog = {source!r} in config.py: use \"sample\", "
                         "\"online\" or \"index\"")
    needed = {"sample": ("data_dir", data_dir), "online": ("cache_dir", cache_dir)}[source]
    if needed[1] is None:
        raise TypeError(f"a {source!r} reference catalogue needs {needed[0]}= (config.{needed[0]})")
    return (source, None if data_dir is None else Path(data_dir),
            None if cache_dir is None else Path(cache_dir))


def _read_sample(data_dir: Path, name: str) -> Table:
    """Read a catalogue shipped with the sample night."""
    path = data_dir / "catalogs" / name
    if not path.exists():
        raise CatalogUnavailableError(
            f"{path} is missing. reference_catalog = \"sample\" in config.py works only "
            "with the simulated night (run notebooks/01-data.ipynb or `make sample`); for "
            "your own night set reference_catalog = \"online\"."
        )
    return Table.read(path)


def _cache_path(cache_dir: Path, name: str, ra_deg: float, dec_deg: float,
                radius_deg: float) -> Path:
    """Cache file of one cone search (the position rounded to 0.0001 deg)."""
    return (Path(cache_dir) / "catalogs"
            / f"{name}_{ra_deg:09.4f}_{dec_deg:+08.4f}_{radius_deg:.4f}.ecsv")


def _cached_query(cache_dir: Path, name: str, ra_deg: float, dec_deg: float,
                  radius_deg: float, fetch) -> Table:
    """The cached answer of one cone search, or ``fetch()``'s answer, cached for next time."""
    cache = _cache_path(cache_dir, name, ra_deg, dec_deg, radius_deg)
    if cache.exists():
        return Table.read(cache)
    table = fetch()
    _write_cache(table, cache)
    return table


def _write_cache(table: Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (a half-written cache is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.ecsv")
    table.write(tmp, format="ascii.ecsv", overwrite=True)
    tmp.replace(path)
