"""Unit tests of datared.progress: text bars for the book's pages, tqdm.auto otherwise."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm as auto_tqdm

from datared.progress import TEXT_NCOLS, TEXT_PROGRESS_ENV, FinalLineTqdm, progress


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_the_variable_gives_a_text_bar_on_stdout(monkeypatch, capsys, value):
    monkeypatch.setenv(TEXT_PROGRESS_ENV, value)
    total = 0
    for number in progress(range(500), desc="frames", unit="frame"):
        total += number
    assert total == sum(range(500))  # the bar does not change the loop
    out, err = capsys.readouterr()
    assert err == ""
    lines = [line for line in out.replace("\r", "\n").split("\n") if line.strip()]
    assert len(lines) == 1, out  # one line per loop, drawn when it ends
    assert lines[0].startswith("frames: 100%")
    assert "500/500" in lines[0]
    assert len(lines[0].rstrip()) <= TEXT_NCOLS
    assert lines[0].isascii()


def test_a_text_bar_draws_nothing_until_it_closes(monkeypatch):
    monkeypatch.setenv(TEXT_PROGRESS_ENV, "1")
    stream = io.StringIO()
    bar = progress(total=10, desc="steps", file=stream, mininterval=0, miniters=1)
    assert isinstance(bar, FinalLineTqdm)
    for _ in range(10):
        bar.update()
    assert stream.getvalue() == ""
    bar.close()
    assert stream.getvalue().count("\n") == 1
    assert "10/10" in stream.getvalue()


def test_a_loop_left_early_still_gets_its_line(monkeypatch, capsys):
    monkeypatch.setenv(TEXT_PROGRESS_ENV, "1")
    with pytest.raises(RuntimeError):
        for number in progress(range(10), desc="broken"):
            if number == 3:
                raise RuntimeError("bad frame")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "broken:" in out and "3/10" in out


def test_disable_is_passed_on(monkeypatch, capsys):
    monkeypatch.setenv(TEXT_PROGRESS_ENV, "1")
    assert list(progress([1, 2, 3], disable=True)) == [1, 2, 3]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("value", [None, "", "0", "false", "off"])
def test_without_the_variable_tqdm_auto_is_used(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(TEXT_PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(TEXT_PROGRESS_ENV, value)
    bar = progress(range(3), file=io.StringIO())
    assert type(bar) is auto_tqdm
    assert not isinstance(bar, FinalLineTqdm)
    assert list(bar) == [0, 1, 2]
