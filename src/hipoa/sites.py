"""Osteophyte sites: where each patch is centred and how large its pixels are.

The defaults are the data contract's table (Ebsim et al., section 3): the patch pixel size is
``dp`` times the reference length, the distance between points 12 and 39 of the 85-point outline.
Sites live in config, so they can be added or retuned without code changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from hipoa.points import REFERENCE_POINTS, SITE_CENTRES

PATCH_SIZE = 128
"""Side of a network input patch in pixels (paper, section 3)."""


@dataclass(frozen=True)
class Site:
    """One osteophyte site.

    Attributes:
        name: Site key, e.g. ``"superior_femoral_head"``; used in file and column names.
        centre: 0-based index of the point the patch is centred on.
        reference: 0-based indices of the two points whose distance is the reference length.
        dp: Patch pixel size as a fraction of the reference length.
        label: Value of this site's pixels in the label masks.
    """

    name: str
    centre: int
    reference: tuple[int, int]
    dp: float
    label: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reference"] = list(self.reference)
        return d


DEFAULT_SITES: tuple[Site, ...] = (
    Site("inferior_femoral_head", centre=SITE_CENTRES["inferior_femoral_head"], reference=REFERENCE_POINTS,
         dp=0.005, label=1),
    Site("superior_femoral_head", centre=SITE_CENTRES["superior_femoral_head"], reference=REFERENCE_POINTS,
         dp=0.006, label=2),
    Site("lateral_acetabulum", centre=SITE_CENTRES["lateral_acetabulum"], reference=REFERENCE_POINTS,
         dp=0.010, label=3),
)


def sites_from_mapping(mapping: dict[str, dict[str, Any]]) -> list[Site]:
    """Build sites from config's ``sites`` mapping ``{name: {centre, reference, dp, label}}``.

    Raises:
        ValueError: naming the site and the key when an entry is incomplete or invalid.
    """
    sites = []
    for name, entry in mapping.items():
        missing = {"centre", "reference", "dp", "label"} - set(entry)
        if missing:
            raise ValueError(f"site {name!r}: missing keys {sorted(missing)}")
        ref = tuple(int(i) for i in entry["reference"])
        if len(ref) != 2 or ref[0] == ref[1]:
            raise ValueError(f"site {name!r}: reference must be two different points, got {entry['reference']}")
        dp = float(entry["dp"])
        if not dp > 0:
            raise ValueError(f"site {name!r}: dp must be > 0, got {dp}")
        label = int(entry["label"])
        if not 1 <= label <= 255:
            raise ValueError(f"site {name!r}: label must be in 1..255, got {label}")
        sites.append(Site(name=name, centre=int(entry["centre"]), reference=(ref[0], ref[1]), dp=dp, label=label))
    labels = [s.label for s in sites]
    if len(set(labels)) != len(labels):
        raise ValueError(f"site labels must be unique, got {labels}")
    return sites


def load_sites(spec: str | Path | None) -> list[Site]:
    """Sites from a JSON string, a JSON/YAML file path, or the contract defaults when ``spec`` is None/empty."""
    if spec is None or str(spec).strip() == "":
        return list(DEFAULT_SITES)
    text = str(spec)
    if text.lstrip().startswith("{"):
        mapping = json.loads(text)
    else:
        mapping = yaml.safe_load(Path(text).read_text())
        if "sites" in mapping:
            mapping = mapping["sites"]
    return sites_from_mapping(mapping)
