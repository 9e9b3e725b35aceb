"""hipoa: automated hip osteophyte phenotyping of UK Biobank hip DXAs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hipoa")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
