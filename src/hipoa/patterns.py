"""Input patterns with the wildcards ``{eid}``, ``{instance}``, ``{array}`` and ``{side}``.

Light on purpose (``re`` and ``glob`` only): the workflow imports it while it is parsed, to
count the images a pattern matches before anything runs, as well as :mod:`hipoa.ingest`.
"""

from __future__ import annotations

import glob
import re

_WILDCARD = re.compile(r"\{([^{}]*)\}")
_WILDCARD_REGEX = {"eid": r"[^/\\]+?", "instance": r"\d+", "array": r"\d+", "side": r"[LR]"}


def wildcards(pattern: str) -> list[str]:
    """The wildcard names of ``pattern``, in order (repeats kept).

    Raises:
        ValueError: a wildcard other than eid, instance, array, side.
    """
    names = _WILDCARD.findall(pattern)
    bad = sorted({n for n in names if n not in _WILDCARD_REGEX})
    if bad:
        raise ValueError(f"pattern {pattern!r}: unknown wildcard(s) {bad}; allowed: eid, instance, array, side")
    return names


def fill_pattern(pattern: str, **values: object) -> str:
    """Replace ``{eid}``, ``{instance}``, ``{array}``, ``{side}`` in ``pattern`` with ``values``.

    Raises:
        ValueError: the pattern holds a wildcard that is unknown or not given.
    """
    for name in wildcards(pattern):
        if name not in values:
            raise ValueError(f"pattern {pattern!r}: no value for {{{name}}}")
    return _WILDCARD.sub(lambda m: str(values[m.group(1)]), pattern)


def check_image_patterns(images: str, per_image: dict[str, str], sides: list[str] | tuple[str, ...]) -> None:
    """Refuse a per-image pattern (automatic or manual points, masks) that cannot tell images apart.

    Each must hold ``{eid}``; ``{side}`` when more than one side runs (else a left and a right hip
    share one file); ``{instance}`` when the image pattern has it (else two visits share one);
    otherwise one file would serve many images and every one of them be measured with it.

    Args:
        images: The image pattern (``inputs.images`` / ``--images``).
        per_image: ``{key as the user wrote it: pattern}``, empty patterns skipped (not given).
        sides: The sides this run processes.

    Raises:
        ValueError: naming the key, its pattern and the wildcard it lacks.
    """
    needed = ["eid"] + (["side"] if len(set(sides)) > 1 else []) + (["instance"] if "instance" in wildcards(images) else [])
    for key, pattern in per_image.items():
        if not pattern:
            continue
        have = set(wildcards(pattern))
        lacking = [name for name in needed if name not in have]
        if lacking:
            why = {"eid": "every participant", "side": f"both sides ({', '.join(sides)})",
                   "instance": "every visit of a participant (the image pattern has {instance})"}
            raise ValueError(
                f"{key} {pattern!r} lacks {', '.join('{' + n + '}' for n in lacking)}: one file would serve "
                f"{' and '.join(why[n] for n in lacking)}, and every such image be measured with it"
            )


def pattern_to_glob(pattern: str) -> tuple[str, re.Pattern[str]]:
    """Turn an image pattern into a glob and a regex that parses its wildcards back.

    ``ukb/{eid}_20158_{instance}_{array}.zip`` -> ``ukb/*_20158_*_*.zip`` and a regex with named
    groups ``eid`` (any text without a slash), ``instance`` and ``array`` (digits), ``side``
    (``L``/``R``). A wildcard that repeats must match the same text each time.

    Raises:
        ValueError: unknown wildcard, or no ``{eid}``.
    """
    names = wildcards(pattern)
    if "eid" not in names:
        raise ValueError(f"image pattern {pattern!r} has no {{eid}}")
    glob_parts: list[str] = []
    regex_parts: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in _WILDCARD.finditer(pattern):
        literal = pattern[pos : m.start()]
        glob_parts += [glob.escape(literal), "*"]
        regex_parts.append(re.escape(literal))
        name = m.group(1)
        regex_parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{_WILDCARD_REGEX[name]})")
        seen.add(name)
        pos = m.end()
    glob_parts.append(glob.escape(pattern[pos:]))
    regex_parts.append(re.escape(pattern[pos:]))
    return "".join(glob_parts), re.compile("".join(regex_parts))


def count_images(pattern: str, sides: list[str], enough: int) -> dict[str, int]:
    """Files ``pattern`` matches (and parses) per side, counting until each side has ``enough``.

    A pattern without ``{side}`` (a UK Biobank zip holds both hips) counts each file for every
    side. Stopping at ``enough`` keeps a check of a 40,000-file folder cheap.
    """
    glob_pattern, regex = pattern_to_glob(pattern)
    counts = dict.fromkeys(sides, 0)
    for path in glob.iglob(glob_pattern):
        match = regex.fullmatch(path)
        if match is None:
            continue
        side = match.groupdict().get("side")
        for s in sides:
            if side in (None, s):
                counts[s] += 1
        if all(n >= enough for n in counts.values()):
            break
    return counts
