"""Unit tests of datared.catalogs: the sample files, and VizieR through a fake network.

The online path runs astroquery's real code (request building, VOTable parsing); only the
HTTP transport is replaced by a requests adapter that answers with a recorded-style VOTable
built here, or fails like an unreachable server. The real network is never used.
"""

from __future__ import annotations

import io
from urllib.parse import unquote_plus

import numpy as np
import pytest
import requests
from astropy.io.votable import from_table
from astropy.table import Table

from datared import catalogs


class FakeVizier(requests.adapters.BaseAdapter):
    """A requests transport that answers VizieR queries with a fixed table."""

    def __init__(self, table: Table | None, fail: bool = False):
        super().__init__()
        self.table = table
        self.fail = fail
        self.requests: list[str] = []

    def send(self, request, **kwargs):
        body = request.body.decode() if isinstance(request.body, bytes) else (request.body or "")
        self.requests.append(unquote_plus(body))
        if self.fail:
            raise requests.exceptions.ConnectionError("Name or service not known")
        votable = from_table(self.table)
        votable.resources[0].tables[0].ID = "table0"
        votable.resources[0].tables[0].name = "I/355/gaiadr3"
        buffer = io.BytesIO()
        votable.to_xml(buffer)
        response = requests.Response()
        response.status_code = 200
        response._content = buffer.getvalue()
        response.headers["Content-Type"] = "application/x-votable+xml"
        response.url = request.url
        response.request = request
        return response

    def close(self):
        pass


def _vizier(adapter: FakeVizier):
    from astroquery.vizier import VizierClass

    viz = VizierClass()
    viz._session.mount("https://", adapter)
    viz._session.mount("http://", adapter)
    return viz


def _gaia_answer(n: int = 30) -> Table:
    rng = np.random.default_rng(0)
    return Table({
        "Source": np.arange(n, dtype=np.int64) + 1000, "RA_ICRS": 160.6 + rng.uniform(-0.05, 0.05, n),
        "e_RA_ICRS": np.full(n, 0.1), "DE_ICRS": 7.43 + rng.uniform(-0.05, 0.05, n),
        "e_DE_ICRS": np.full(n, 0.1), "Plx": np.full(n, 1.0), "pmRA": np.full(n, -16.0),
        "pmDE": np.full(n, 4.0), "Gmag": rng.uniform(10, 20, n), "BPmag": rng.uniform(10, 20, n),
        "RPmag": rng.uniform(10, 20, n),
    })


def test_load_gaia_online_renames_caches_and_reuses(tmp_path):
    adapter = FakeVizier(_gaia_answer())
    viz = _vizier(adapter)
    table = catalogs.load_gaia(160.6, 7.43, 0.2, source="online", cache_dir=tmp_path, vizier=viz)
    assert len(adapter.requests) == 1
    assert "I/355/gaiadr3" in adapter.requests[0]  # the right catalogue was asked for
    assert {"source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch", "phot_g_mean_mag"} <= set(table.colnames)
    assert np.all(table["ref_epoch"] == 2016.0)
    assert np.all(np.diff(table["phot_g_mean_mag"]) >= 0)  # brightest first
    cached = list((tmp_path / "catalogs").glob("gaiadr3_*.ecsv"))
    assert len(cached) == 1
    # A second call is served from the cache, even with the network gone.
    offline = _vizier(FakeVizier(None, fail=True))
    again = catalogs.load_gaia(160.6, 7.43, 0.2, source="online", cache_dir=tmp_path, vizier=offline)
    assert len(again) == len(table)


def test_load_gaia_online_reports_an_unreachable_service(tmp_path):
    viz = _vizier(FakeVizier(None, fail=True))
    with pytest.raises(catalogs.CatalogUnavailableError, match="unreachable.*sample"):
        catalogs.load_gaia(160.6, 7.43, 0.2, source="online", cache_dir=tmp_path, vizier=viz)
    assert not (tmp_path / "catalogs").exists() or not any((tmp_path / "catalogs").iterdir())


def test_load_refcat2_online_asks_for_refcat2(tmp_path):
    answer = Table({"RA_ICRS": [88.0, 88.01], "DE_ICRS": [32.5, 32.51], "gmag": [15.0, 16.0],
                    "e_gmag": [0.01, 0.02], "rmag": [14.5, 15.5], "e_rmag": [0.01, 0.02],
                    "imag": [14.3, 15.3], "e_imag": [0.01, 0.02]})
    adapter = FakeVizier(answer)
    table = catalogs.load_refcat2(88.0, 32.5, 0.1, source="online", cache_dir=tmp_path,
                                  vizier=_vizier(adapter))
    assert "J/ApJ/867/105" in adapter.requests[0]
    assert list(table["rmag"]) == [14.5, 15.5]


def test_sample_catalogs_are_read_and_cut_to_the_cone(tmp_path):
    folder = tmp_path / "catalogs"
    folder.mkdir()
    Table({"source_id": [1, 2, 3], "ra": [10.0, 10.05, 12.0], "dec": [5.0, 5.0, 5.0],
           "phot_g_mean_mag": [15.0, 12.0, 11.0]}).write(folder / "gaia.ecsv")
    Table({"RA_ICRS": [10.0, 12.0], "DE_ICRS": [5.0, 5.0], "rmag": [14.0, 13.0]}).write(
        folder / "refcat2.ecsv")
    gaia = catalogs.load_gaia(10.0, 5.0, 0.1, source="sample", data_dir=tmp_path)
    assert list(gaia["source_id"]) == [2, 1]  # in the cone, brightest first
    assert len(catalogs.load_gaia(10.0, 5.0, 0.1, source="sample", data_dir=tmp_path,
                                  mag_limit=13.0)) == 1
    ref = catalogs.load_refcat2(10.0, 5.0, 0.1, source="sample", data_dir=tmp_path)
    assert list(ref["rmag"]) == [14.0]


def test_missing_sample_catalogue_names_the_fix(tmp_path):
    with pytest.raises(catalogs.CatalogUnavailableError, match="online"):
        catalogs.load_gaia(10.0, 5.0, 0.1, source="sample", data_dir=tmp_path)


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="reference_catalog"):
        catalogs.load_gaia(10.0, 5.0, 0.1, source="gaia", data_dir=tmp_path)
