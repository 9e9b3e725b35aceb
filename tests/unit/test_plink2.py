"""The GWAS files work with the real ``plink2 --glm`` (Debian package ``plink2``).

Both sides of a small cohort go through :func:`hipoa.phenotypes.gather` and the participant
release (:func:`hipoa.release.release_both_sides`). ``plink2 --dummy`` makes a small genotype set
whose ``.psam`` is rewritten so that the sample IDs are the cohort's eids (FID = IID = eid, as in
the GWAS files), plus three genotyped participants without phenotypes. Then ``--glm`` runs on
every GWAS file, the way the README tells an analyst to: binary traits with ``--1`` (0/1
coding), quantitative ones as they are, covariates from the ``.covar.tsv`` and the training
participants removed with ``--remove``. plink2's log and results must report exactly the samples
whose trait and covariate are not NA and who are not removed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from test_phenotypes import SITES  # noqa: E402  (tests/unit is on sys.path)
from test_release import release_cohort  # noqa: E402

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
    release_cohort(tmp)
    tmp = tmp / "phenotypes"
    eids = pd.read_csv(tmp / "osteophytes.bt.tsv", sep="\t", dtype=str)["IID"].tolist() + EXTRA_GENOTYPED
    _plink(tmp, "--dummy", str(len(eids)), "30", "--seed", "1", "--out", "geno")
    # --dummy names samples per0, per1, ...: give them the cohort's IDs (FID = IID = eid).
    (tmp / "geno.psam").write_text("#FID\tIID\tSEX\n" + "".join(f"{e}\t{e}\t2\n" for e in eids))
    return tmp, len(eids)


# (stem, kind, trait, covariate): one binary and one quantitative trait of every GWAS file.
CASES = [
    ("osteophytes_L", "bt", f"{A}_present", "reference_length_mm"),
    ("osteophytes_L", "qt", f"{A}_area_mm2_rint", "reference_length_mm"),
    ("osteophytes_R", "bt", "any_present", "reference_length_mm"),
    ("osteophytes_R", "qt", "total_area_mm2", "reference_length_mm"),
    ("osteophytes", "bt", f"{A}_present_any", "reference_length_mm_L"),
    ("osteophytes", "qt", f"{A}_area_sum_mm2_rint", "reference_length_mm_L"),
    # an all-digit serial number and software versions that start like a number, as categories
    ("osteophytes", "qt", "total_area_mm2_rint", "reference_length_mm,device_serial,software_versions"),
    ("osteophytes_L", "bt", "any_present", "reference_length_mm,device_serial"),
]


@pytest.mark.parametrize(("stem", "kind", "trait", "covariate"), CASES)
def test_glm_on_every_gwas_file(cohort, stem, kind, trait, covariate):
    tmp, n_genotyped = cohort
    traits = pd.read_csv(tmp / f"{stem}.{kind}.tsv", sep="\t", dtype=str, keep_default_na=False)
    covar = pd.read_csv(tmp / f"{stem}.covar.tsv", sep="\t", dtype=str, keep_default_na=False)
    removed = pd.read_csv(tmp / f"{stem}.remove.txt", sep="\t", header=None, names=["FID", "IID"], dtype=str)
    assert sorted(removed["IID"]) == ["1000", "1001"]  # train and val participants; 2000 is test
    covariates = covariate.split(",")
    rows = traits.merge(covar[["IID", *covariates]], on="IID")
    # NONE is plink2's missing category (--missing-catname): counted in the log's "main filters"
    # line, left out of the regression (OBS_CT); an NA number is left out of both
    kept = (rows[trait] != "NA") & ~rows["IID"].isin(removed["IID"]) & (rows[covariates] != "NA").all(axis=1)
    filtered = rows[kept]
    used = rows[kept & (rows[covariates] != "NONE").all(axis=1)]
    assert 3 <= len(used) < len(traits)  # some lines are NA or removed, so the count means something
    args = ["--pfile", "geno", "--pheno", f"{stem}.{kind}.tsv", "--pheno-name", trait,
            "--covar", f"{stem}.covar.tsv", "--covar-name", covariate, "--remove", f"{stem}.remove.txt",
            "--out", f"{stem}.{trait}.{len(covariates)}"]
    if kind == "bt":
        args += ["--1", "--glm", "firth-fallback"]
    else:
        args += ["--glm"]
    log = _plink(tmp, *args)
    assert f"{n_genotyped} samples" in log
    assert re.search(rf"--remove: {n_genotyped - 2} samples remaining", log), log
    if kind == "bt":
        cases, controls = int((filtered[trait] == "1").sum()), int((filtered[trait] == "0").sum())
        assert cases and controls
        assert f"{cases} cases and {controls} controls remaining after main filters" in log, log
        (result,) = tmp.glob(f"{stem}.{trait}.{len(covariates)}.{trait}.glm.logistic*")
    else:
        (result,) = tmp.glob(f"{stem}.{trait}.{len(covariates)}.{trait}.glm.linear")
    table = pd.read_csv(result, sep="\t")
    assert set(table.loc[table["TEST"] == "ADD", "OBS_CT"].astype(int)) == {len(used)}


def _readme_commands(tool: str) -> list[str]:
    """The README's ``tool`` commands of its geneticists' block, continuation lines joined."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("```bash\nP=results/phenotypes\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    return [" ".join(c.split()) for c in commands if c.startswith(tool + " ")]


def test_the_readme_plink2_commands_run_as_written(cohort):
    """The README's plink2 lines, as an analyst pastes them (P set, the genotypes named ukb_imp),
    on a release with a participant whose scanner is unknown (NONE) and one-hip participants; only
    the site name differs (this cohort has two sites, the README's example is the acetabulum)."""
    tmp, n_genotyped = cohort
    for ext in ("pgen", "pvar", "psam"):
        shutil.copyfile(tmp / f"geno.{ext}", tmp / f"ukb_imp.{ext}")
    commands = _readme_commands("plink2")
    assert len(commands) == 2
    for command in commands:
        command = command.replace("lateral_acetabulum", A)
        proc = subprocess.run(["bash", "-c", f"P=. && {command}"], cwd=tmp, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, command + "\n" + proc.stdout + proc.stderr
        assert "Error" not in proc.stdout, proc.stdout


def test_the_readme_regenie_covariates_are_what_regenie_reads(cohort):
    """regenie is not packaged: its covariate options in the README are checked against the file
    with the strict reader, and so is the whole-file form (every categorical column named)."""
    from test_release import read_regenie

    from hipoa.release import DEVICE_COLUMNS, categorical_covariates

    tmp, _ = cohort
    covar = read_regenie(tmp / "osteophytes.covar.tsv")
    for command in _readme_commands("regenie"):
        words = command.split()
        numeric = words[words.index("--covarColList") + 1].split(",")
        categorical = words[words.index("--catCovarList") + 1].split(",")
        assert set(numeric + categorical) <= set(covar.columns), command
        assert covar[numeric].apply(lambda c: pd.to_numeric(c.replace("NA", None)).notna() | (c == "NA")).all(axis=None)
        assert "NA" not in set(covar[categorical].to_numpy().ravel())
    typed = pd.read_csv(tmp / "osteophytes.covar.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert categorical_covariates(typed.convert_dtypes()) != []
    dictionary = pd.read_csv(tmp / "osteophytes.dict.tsv", sep="\t")
    marked = dictionary[(dictionary["FILES"] == "covar") & (dictionary["TYPE"] == "categorical")]["FIELD"].tolist()
    assert sorted(marked) == sorted(DEVICE_COLUMNS)
    others = [c for c in covar.columns[2:] if c not in marked]  # the whole-file form: the rest are numbers
    assert covar[others].apply(lambda c: pd.to_numeric(c.replace("NA", None)).notna() | (c == "NA")).all(axis=None)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"--catCovarList {','.join(DEVICE_COLUMNS)}" in readme
