"""Optional dependencies: a missing extra is named in a one-line error, where it is needed."""

from __future__ import annotations

import sys

import pytest

from steerx_lens import backends
from steerx_lens.extras import MissingExtraError, require
from steerx_lens.figures import new_figure


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("matplotlib", lambda: new_figure(2, 2), "plots"),
        ("nnsight", lambda: backends.backend_module("nnsight"), "nnsight"),
        ("sae_lens", lambda: require("sae_lens", "loading an SAE"), "sae"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, module: str, call, extra: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    with pytest.raises(MissingExtraError, match=rf"steerx-lens\[{extra}\]") as caught:
        call()
    assert "\n" not in str(caught.value)


def test_an_installed_module_is_returned() -> None:
    assert require("json", "testing").dumps([1]) == "[1]"
