"""No tracked file holds a number that could be a real UK Biobank eid.

UK Biobank asked a public UKB imaging repository to remove eids from its code and its history.
hipoa's own files (code, tests, docs, benchmarks, configs) use eids from 9000000-9999999 only,
a block UK Biobank does not issue (its eids are below 7,000,000); this test is the audit UK Biobank
would run: any 7-digit number from 1,000,000 to 6,999,999 standing alone (not part of a longer
number, a decimal fraction or an identifier; followed by ``_``, ``.`` or ``,`` it still counts, as
in a zip's name ``{eid}_20158_2_0.zip``) in a tracked file fails, naming file and line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
EID_LIKE = re.compile(r"(?<![0-9A-Za-z.])[1-6][0-9]{6}(?![0-9A-Za-z])")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the audit reads git's list of tracked files")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_the_pattern_finds_eids_as_they_appear():
    eid = str(1_751_499)  # built, so that this file holds none
    for text in (f"{eid}_20158_2_0.zip", f"eid {eid}.0", f'"{eid}",', f"range({eid}, 9000012)", f"/{eid}/"):
        assert EID_LIKE.search(text), text
    for text in (f"0.{eid}", f"{eid}0", f"x{eid}", f"{eid}abc", "9751499", "1_000_000", "1000000000"):
        assert not EID_LIKE.search(text), text


def test_no_tracked_file_holds_an_eid_outside_the_synthetic_block():
    found = []
    files = _tracked_files()
    assert any(p.name == "synth.py" for p in files)  # the list is the repository's
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (figures): no text to audit
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for match in EID_LIKE.finditer(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group()}")
    assert not found, "eid-like numbers in tracked files (use the synthetic block 9000000-9999999):\n" + "\n".join(found)

