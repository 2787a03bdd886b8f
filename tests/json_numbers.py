"""Comparing JSON outputs whose floats may differ in the last bits."""

from __future__ import annotations

from typing import Any

import pytest


def assert_same_numbers(got: Any, expected: Any, path: str = "") -> None:
    """Equal JSON trees, floats equal to 1e-6 (relative, or absolute near 0)."""
    if isinstance(expected, dict):
        assert list(got) == list(expected), path
        for key in expected:
            assert_same_numbers(got[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_numbers(a, b, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), path
    else:
        assert got == expected, path
