"""Where the shipped assets are: `assets/` of the repository (a checkout or an editable install),
or the copy a wheel installs as the `ldm._assets` package data (pyproject.toml maps one onto the other)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOTS = (_HERE.parent / "assets", _HERE / "_assets")


def asset_path(name: str) -> Path:
    """The path of assets/NAME (a file or folder), wherever this installation keeps it; the
    repository's path if it exists nowhere, so that an error message names the expected place."""
    for root in _ROOTS:
        if (root / name).exists():
            return root / name
    return _ROOTS[0] / name
