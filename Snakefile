# hipoa: hip osteophyte phenotypes from UK Biobank hip DXAs with per-site U-Nets.
# Entry point only; helpers are in workflow/rules/common.smk, one .smk per stage.
# Run: snakemake --profile slurm (UK Biobank, config/config.yaml), or the demo:
#      snakemake --profile profiles/local --configfile config/demo.yaml
# (README.md; config keys: config/README.md)

from snakemake.utils import min_version, validate

min_version("9.0")


# The UK Biobank left-hip run with the paper's recipe; every --configfile is merged over it and
# --config over those (config/README.md). The demo: --configfile config/demo.yaml.
configfile: f"{workflow.basedir}/config/config.yaml"


# Coerce --config values, validate, fill the schema's defaults.
include: "workflow/rules/config.smk"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
