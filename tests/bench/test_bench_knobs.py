"""BENCH_* variables: defaults, parsing, and an error that names the variable and its range."""

from __future__ import annotations

import pytest

from bench.knobs import KnobError, knob


def test_unset_or_empty_gives_the_default(monkeypatch):
    monkeypatch.delenv("BENCH_X", raising=False)
    assert knob("BENCH_X", 200, minimum=21) == 200
    monkeypatch.setenv("BENCH_X", "  ")
    assert knob("BENCH_X", 0.5, minimum=0.02) == 0.5


def test_value_is_parsed_as_the_defaults_type(monkeypatch):
    monkeypatch.setenv("BENCH_X", "0.25")
    assert knob("BENCH_X", 1.0, minimum=0.02) == 0.25
    monkeypatch.setenv("BENCH_X", "40")
    value = knob("BENCH_X", 200, minimum=21)
    assert value == 40 and isinstance(value, int)


@pytest.mark.parametrize("raw, default, message", [
    ("abc", 200, "BENCH_X='abc' is not an integer"),
    ("2.5", 200, "BENCH_X='2.5' is not an integer"),
    ("x", 1.0, "BENCH_X='x' is not a number"),
    ("5", 200, "BENCH_X=5 is out of range: it must be at least 21"),
    ("0", 1.0, "BENCH_X=0 is out of range: it must be at least 0.02"),
])
def test_bad_values_exit_with_a_message_naming_the_variable(monkeypatch, raw, default, message):
    monkeypatch.setenv("BENCH_X", raw)
    with pytest.raises(KnobError) as caught:
        knob("BENCH_X", default, minimum=21 if isinstance(default, int) else 0.02)
    assert message in str(caught.value)


def test_maximum_is_enforced(monkeypatch):
    monkeypatch.setenv("BENCH_X", "9")
    with pytest.raises(KnobError, match="between 1 and 8"):
        knob("BENCH_X", 2, minimum=1, maximum=8)


def test_choice_knob_takes_one_of_its_values_and_names_them_otherwise(monkeypatch):
    from bench.knobs import choice_knob
    monkeypatch.delenv("BENCH_X", raising=False)
    assert choice_knob("BENCH_X", "a", ("a", "b")) == "a"
    monkeypatch.setenv("BENCH_X", "b")
    assert choice_knob("BENCH_X", "a", ("a", "b")) == "b"
    monkeypatch.setenv("BENCH_X", "c")
    with pytest.raises(KnobError, match="BENCH_X='c' is not one of: a, b; unset it for the default"):
        choice_knob("BENCH_X", "a", ("a", "b"))
