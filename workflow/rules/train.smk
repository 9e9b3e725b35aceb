# Per-site U-Nets: participant-level splits, training (or loading an existing .keras), and
# evaluation on the test split as in the paper's Table 2.


rule split_data:
    input:
        stores=TRAINING_STORES,
    output:
        splits="results/splits/{site}.parquet",
    log:
        "logs/split_data/{site}.log",
    benchmark:
        "results/benchmarks/split_data/{site}.tsv"
    params:
        seed=config["training"]["seed"],
        val_fraction=config["training"]["val_fraction"],
        test_fraction=config["training"]["test_fraction"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        CONDA_CPU
    localrule: True
    shell:
        "python -m hipoa split-data --stores {input.stores} --site {wildcards.site} --seed {params.seed} "
        "--val-fraction {params.val_fraction} --test-fraction {params.test_fraction} "
        "--out {output.splits} 2> {log}"


rule train_unet:
    input:
        unpack(train_unet_input),
    output:
        model="results/models/{site}/unet.keras",
        card="results/models/{site}/unet.json",
    log:
        "logs/train_unet/{site}.log",
    benchmark:
        "results/benchmarks/train_unet/{site}.tsv"
    params:
        source=train_unet_source,
        settings=train_unet_settings,
    threads: 4
    resources:
        **GPU_PARTITION,
        gpu=1,
        mem_mb=32000,
        runtime=720,
    conda:
        CONDA_GPU
    shell:
        "python -m hipoa train-unet --site {wildcards.site} {params.source} --out {output.model} "
        "{params.settings} 2> {log}"


rule evaluate_unet:
    input:
        model="results/models/{site}/unet.keras",
        card="results/models/{site}/unet.json",
        stores=TRAINING_STORES,
        splits="results/splits/{site}.parquet",
    output:
        scores="results/evaluation/{site}.json",
        confusion=report(
            "results/evaluation/{site}_confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            labels={"figure": "confusion matrix", "site": "{site}"},
        ),
        overlays=report(
            "results/evaluation/{site}_overlay.png",
            caption="../report/overlays.rst",
            category="Evaluation",
            labels={"figure": "overlays", "site": "{site}"},
        ),
    log:
        "logs/evaluate_unet/{site}.log",
    benchmark:
        "results/benchmarks/evaluate_unet/{site}.tsv"
    params:
        figures_dir=parent_of_scores,
    threads: 2
    resources:
        **GPU_PARTITION,
        gpu=1,
        mem_mb=8000,
        runtime=60,
    conda:
        CONDA_GPU
    shell:
        "python -m hipoa evaluate --site {wildcards.site} --model {input.model} --stores {input.stores} "
        "--splits {input.splits} --out {output.scores} --figures-dir {params.figures_dir} 2> {log}"
