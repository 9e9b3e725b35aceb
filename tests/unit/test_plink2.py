"""The ``.pheno.tsv`` export works with the real ``plink2 --glm`` (Debian package ``plink2``).

``plink2 --dummy`` makes a small genotype set; its ``.psam`` is rewritten so that the sample IDs
are the cohort's eids (FID = IID = eid, as in the ``.pheno.tsv``), plus three genotyped
participants without phenotypes. Then ``--glm`` runs on a binary trait with ``--1`` (0/1 coding)
and on a quantitative area trait; plink2's log and result files must report exactly the samples
whose trait is not NA.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from hipoa import phenotypes

from test_phenotypes import SITES, build_side  # noqa: E402  (tests/unit is on sys.path)
from test_predict import make_model  # noqa: E402

PLINK2 = shutil.which("plink2")
pytestmark = pytest.mark.skipif(PLINK2 is None, reason="plink2 not installed (Debian: apt-get install -y plink2)")

A = SITES[0]
EXTRA_GENOTYPED = ["9000", "9001", "9002"]


def _plink(cwd: Path, *args: str) -> str:
    """Run plink2 and return its log; fail with the log when it fails."""
    out = args[args.index("--out") + 1]
    proc = subprocess.run([PLINK2, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    log = (cwd / f"{out}.log").read_text() if (cwd / f"{out}.log").exists() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    return log


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plink")
    models = {s: make_model(tmp / "models" / s / "unet.keras") for s in SITES}
    manifest, preds, _, _ = build_side(tmp / "work", models, "L")
    out = tmp / "osteophytes_L.parquet"
    phenotypes.gather(manifest=manifest, predictions=preds, models=models, side="L", out=out)
    pheno = phenotypes.out_tsv_path(out, "pheno")
    eids = pd.read_csv(pheno, sep="\t", dtype=str)["IID"].tolist() + EXTRA_GENOTYPED
    _plink(tmp, "--dummy", str(len(eids)), "30", "--seed", "1", "--out", "geno")
    # --dummy names samples per0, per1, ...: give them the cohort's IDs (FID = IID = eid).
    (tmp / "geno.psam").write_text("#FID\tIID\tSEX\n" + "".join(f"{e}\t{e}\t2\n" for e in eids))
    return tmp, pheno


def _obs_counts(path: Path) -> set[int]:
    return set(pd.read_csv(path, sep="\t")["OBS_CT"].astype(int))


def test_glm_binary_trait_with_1(cohort):
    tmp, pheno = cohort
    t = pd.read_csv(pheno, sep="\t", dtype=str, keep_default_na=False)
    cases, controls = (t[f"{A}_present"] == "1").sum(), (t[f"{A}_present"] == "0").sum()
    # By hand (test_predict.example_shard): 1000, 1005 and 2000 present; 1001, 1004, 2001, 2004
    # absent; 1002, 2002 (QC) and 1003, 2003 (patch outside) NA; the extra genotyped have none.
    assert (cases, controls) == (3, 4)
    log = _plink(tmp, "--pfile", "geno", "--pheno", pheno.name, "--pheno-name", f"{A}_present", "--1",
                 "--glm", "allow-no-covars", "--out", "bin")
    assert f"{len(t) + len(EXTRA_GENOTYPED)} samples" in log
    assert re.search(rf"1 binary phenotype loaded \({cases} cases, {controls} controls\)", log), log
    (result,) = tmp.glob(f"bin.{A}_present.glm.logistic*")
    assert _obs_counts(result) == {cases + controls}


def test_glm_quantitative_area(cohort):
    tmp, pheno = cohort
    t = pd.read_csv(pheno, sep="\t", dtype=str, keep_default_na=False)
    n = int((t[f"{A}_area_mm2"] != "NA").sum())
    assert n == 7
    log = _plink(tmp, "--pfile", "geno", "--pheno", pheno.name, "--pheno-name", f"{A}_area_mm2", "--1",
                 "--glm", "allow-no-covars", "--out", "quant")
    assert re.search(rf"1 quantitative phenotype loaded \({n} values\)", log), log
    assert _obs_counts(tmp / f"quant.{A}_area_mm2.glm.linear") == {n}
