# hipoa: hip osteophyte phenotypes from UK Biobank hip DXAs with per-site U-Nets.
# Entry point only; helpers are in workflow/rules/common.smk, one .smk per stage.
# Run: snakemake --profile profiles/local   (README.md; config keys: config/README.md)

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


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
