"""Comparing JSON outputs whose floats may differ in the last bits."""

from __future__ import annotations

import math
from typing import Any


def assert_same_numbers(
    got: Any, expected: Any, where: str = "", *, rel: float = 1e-6, abs_tol: float = 1e-6
) -> None:
    """Equal JSON trees (same keys in the same order, same texts and counts); floats equal
    within ``rel`` (relative) or ``abs_tol`` (absolute)."""
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same_numbers(got[key], expected[key], f"{where}.{key}", rel=rel, abs_tol=abs_tol)
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_numbers(a, b, f"{where}[{index}]", rel=rel, abs_tol=abs_tol)
    elif isinstance(expected, float):
        assert math.isclose(got, expected, rel_tol=rel, abs_tol=abs_tol), (where, got, expected)
    else:
        assert got == expected, where
