# The synthetic demo cohort (cohort.synthesize): UKB bulk layout + truth table, made by
# `hipoa synth`. Real runs point `inputs` at UKB data and never run this rule.


rule synth_cohort:
    output:
        truth=f"{COHORT_DIR}/truth.parquet",
        images=directory(f"{COHORT_DIR}/ukb"),
        points=directory(f"{COHORT_DIR}/points"),
        masks=directory(f"{COHORT_DIR}/masks"),
        preview=report(
            f"{COHORT_DIR}/preview.png",
            caption="../report/synth_preview.rst",
            category="Inputs",
            labels={"figure": "synthetic cohort preview"},
        ),
    log:
        "logs/synth_cohort.log",
    benchmark:
        "results/benchmarks/synth_cohort.tsv"
    params:
        out=parent_of_truth,
        participants=config["cohort"]["participants"],
        seed=config["cohort"]["seed"],
        annotated_fraction=config["cohort"]["annotated_fraction"],
        annotate_sides=config["cohort"]["annotate_sides"],
        enriched_prevalence=config["cohort"]["enriched_prevalence"],
        prevalence=config["cohort"]["prevalence"],
        faults=config["cohort"]["faults"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa synth --out {params.out} --participants {params.participants} "
        "--seed {params.seed} --annotated-fraction {params.annotated_fraction} "
        "--annotate-sides {params.annotate_sides} "
        "--enriched-prevalence {params.enriched_prevalence} --prevalence {params.prevalence} "
        "--faults {params.faults} --workers {threads} --preview {output.preview} 2> {log}"
