"""Unit tests of datared.checks: the notebooks' self-checks."""

from __future__ import annotations

import numpy as np
import pytest

from datared.checks import check_close, check_equal, check_true, differing
from datared.errors import SelfCheckError


def test_nan_equals_nan_and_close_values_pass():
    check_close([1.0, np.nan, 3.0], [1.0 + 1e-12, np.nan, 3.0], what="sums")
    check_equal(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]), what="ints")


def test_a_difference_names_the_element_and_both_values():
    with pytest.raises(SelfCheckError) as info:
        check_close([1.0, 2.0, np.nan], [1.0, 2.5, 4.0], what="aperture sums",
                    labels=["star 1", "star 2", "star 3"])
    message = str(info.value)
    assert "aperture sums: 2 of 3 values differ" in message
    assert "[star 2] helper = 2, library = 2.5" in message
    assert "[star 3] helper = nan, library = 4" in message


def test_shapes_must_agree_and_long_lists_are_cut():
    with pytest.raises(SelfCheckError, match="shapes differ"):
        check_close(np.zeros(3), np.zeros(4), what="x")
    with pytest.raises(SelfCheckError, match="and 7 more"):
        check_equal(np.zeros(12), np.ones(12), what="x", show=5)


def test_differing_and_check_true():
    assert list(differing([1.0, np.nan, np.inf], [1.0, np.nan, 1.0])) == [False, False, True]
    check_true(True, "never")
    with pytest.raises(SelfCheckError, match="broken"):
        check_true(False, "broken")


def test_compare_with_setting_names_the_setting_and_the_value_to_use():
    from datared.checks import compare_with_setting

    ok, text = compare_with_setting(0.6071, 0.605, name="pixel_scale_arcsec", what="scale",
                                    unit="arcsec/px", tolerance=0.02)
    assert ok and "+0.3%" in text and "within 2%" in text and "Note" not in text
    ok, text = compare_with_setting(0.672, 0.605, name="pixel_scale_arcsec", what="scale",
                                    unit="arcsec/px", tolerance=0.02, fix="check the binning.")
    assert not ok and "+11.1%" in text
    assert "set pixel_scale_arcsec = 0.672 in config.py" in text and "check the binning." in text
    ok, text = compare_with_setting(float("nan"), 3.6, name="read_noise_e", what="read noise",
                                    unit="e-", tolerance=0.1)
    assert not ok and "unchecked" in text
