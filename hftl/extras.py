"""hftl's optional dependencies (the extras in pyproject.toml), checked where the code that needs them is imported.

A text run needs none of them. A missing one is a one-line error naming the extra that installs it; torchaudio and
torchvision are also checked against the installed torch before they are imported, since a release built for
another torch fails to load with errors that do not say so (torchaudio 2.11 beside torch 2.13: undefined symbols).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

from .errors import UserError


class ExtraError(UserError, ImportError):
    """An optional package is missing, or does not match torch; the message says what to install."""


def require(module: str, extra: str, needed_for: str):
    """`import module`, or ExtraError naming the extra that installs it (`needed_for`: what asked, e.g. 'audio data')."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ExtraError(f"{needed_for} needs {top}, which is not installed: pip install 'hftl[{extra}]'.")
    if top in TORCH_BUILT:
        check_matches_torch(top)
    return importlib.import_module(module)


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def built_for(package: str, version: str) -> str:
    """The torch major.minor that `package` `version` is built against: torchaudio shares torch's (2.11 <-> 2.11),
    torchvision's minor is torch's + 15 (0.26 <-> 2.11, 0.21 <-> 2.6)."""
    major, minor = _minor(version)
    return f"{major}.{minor}" if package == "torchaudio" else f"2.{minor - 15}"


def matching_version(package: str, torch_version: str) -> str:
    """The major.minor of `package` built against torch `torch_version` (the inverse of built_for)."""
    major, minor = _minor(torch_version)
    return f"{major}.{minor}" if package == "torchaudio" else f"0.{minor + 15}"


# Packages built against one torch release: they must match the installed torch's minor version.
TORCH_BUILT = ("torchaudio", "torchvision")


def check_matches_torch(package: str) -> None:
    """ExtraError when the installed `package` was built for another torch than the installed one. Both ways out are
    named: the `package` built for this torch (torchaudio has none past 2.11: 2.11.1 is its newest release), or the
    torch this `package` was built for."""
    import torch

    installed = importlib.metadata.version(package)
    wanted, torch_of_it = matching_version(package, torch.__version__), built_for(package, installed)
    if _minor(torch_of_it) != _minor(torch.__version__):
        raise ExtraError(f"{package} {installed} is built for torch {torch_of_it}, but torch {torch.__version__} is installed, "
                         f"and it would fail to load: pip install '{package}=={wanted}.*' (the {package} for this torch), or "
                         f"pip install 'torch=={torch_of_it}.*' '{package}=={installed}' (the torch it was built for).")
