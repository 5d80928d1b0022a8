"""datared.parallel: per-frame loops in worker processes give what one loop gives."""

from __future__ import annotations

import numpy as np
import pytest

from datared.errors import FrameError
from datared.parallel import available_cores, map_frames, resolve_workers


def _square_or_fail(item, shared):
    if item == 3:
        raise FrameError(f"frame {item}: bad on purpose")
    if item == 99:
        raise KeyError("a bug, not a bad frame")
    rng = np.random.default_rng(item)
    return float(np.sum(rng.normal(size=1000) * shared["scale"]))


def test_resolve_workers():
    assert resolve_workers(None) == available_cores()
    assert resolve_workers(0) == available_cores()
    assert resolve_workers(3) == 3
    assert resolve_workers(-1) == max(1, available_cores() - 1)
    assert resolve_workers(-1000) == 1
    for bad in (1.5, "2", True):
        with pytest.raises(ValueError, match="config.workers"):
            resolve_workers(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_input_order_with_bad_frames_skipped(workers):
    items = [5, 1, 3, 8, 2]
    outcomes = list(map_frames(_square_or_fail, items, shared={"scale": 2.0}, workers=workers,
                               show_progress=False))
    assert [o.item for o in outcomes] == items
    failed = [o for o in outcomes if o.error is not None]
    assert [o.item for o in failed] == [3]
    assert isinstance(failed[0].error, FrameError) and "bad on purpose" in str(failed[0].error)
    assert failed[0].value is None


def test_same_values_with_one_and_two_workers():
    items = list(range(10, 20))
    one = [o.value for o in map_frames(_square_or_fail, items, shared={"scale": 1.5},
                                       workers=1, show_progress=False)]
    two = [o.value for o in map_frames(_square_or_fail, items, shared={"scale": 1.5},
                                       workers=2, show_progress=False)]
    assert one == two  # bit for bit


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bug_is_not_caught(workers):
    with pytest.raises(KeyError, match="a bug"):
        list(map_frames(_square_or_fail, [1, 99, 2], shared={"scale": 1.0}, workers=workers,
                        show_progress=False))


def _needs_a_master(item, shared):
    from datared.errors import MissingInputError

    if item == 2:
        raise MissingInputError("masterflat_r.fits is missing: run 02-pre-reduction")
    return item


@pytest.mark.parametrize("workers", [1, 2])
def test_a_missing_master_stops_the_loop(workers):
    from datared.errors import MissingInputError

    with pytest.raises(MissingInputError, match="run 02-pre-reduction"):
        list(map_frames(_needs_a_master, [1, 2, 3], workers=workers, show_progress=False))


def test_a_container_cpu_quota_caps_the_cores(tmp_path):
    from datared.parallel import cgroup_cpu_limit

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "nowhere") is None
