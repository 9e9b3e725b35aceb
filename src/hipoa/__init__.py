"""hipoa: automated hip osteophyte phenotyping of UK Biobank hip DXAs."""

from __future__ import annotations

# The one place the version is written: pyproject.toml reads it from here (setuptools'
# dynamic version), and the workflow's rules import hipoa from the checkout's src/, so the
# version a table records is that of the code that made it.
__version__ = "0.3.0"
