# Figures and tables for `snakemake --report results/report.html`.


rule report_figures:
    input:
        phenotypes=expand("results/phenotypes/osteophytes_{side}.parquet", side=SIDES),
        scores=expand("results/evaluation/{site}.json", site=TRAINED_SITES),
        manifests=expand("results/manifest/{side}.parquet", side=SIDES),
    output:
        evaluation=report(
            "results/report/evaluation.html",
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"figure": "Table 2"},
        ),
        qc=report(
            "results/report/qc_counts.html",
            caption="../report/qc_counts.rst",
            category="Quality control",
            labels={"figure": "QC counts by reason"},
        ),
        areas=report(
            "results/report/areas.png",
            caption="../report/areas.rst",
            category="Phenotypes",
            labels={"figure": "predicted areas"},
        ),
        prevalence=report(
            "results/report/prevalence.png",
            caption="../report/prevalence.rst",
            category="Phenotypes",
            labels={"figure": "prevalence"},
        ),
        unfit=report(
            "results/report/unfit.png",
            caption="../report/unfit.rst",
            category="Quality control",
            labels={"figure": "images unfit to measure"},
        ),
    log:
        "logs/report_figures.log",
    benchmark:
        "results/benchmarks/report_figures.tsv"
    params:
        show_eids="--show-eids" if config["report"]["show_eids"] else "",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        CONDA_CPU
    localrule: True
    shell:
        "python -m hipoa report-figures --phenotypes {input.phenotypes} --scores {input.scores} "
        "--evaluation {output.evaluation} --qc {output.qc} --areas {output.areas} "
        "--prevalence {output.prevalence} --manifests {input.manifests} --unfit {output.unfit} "
        "{params.show_eids} 2> {log}"
