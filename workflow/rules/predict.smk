# Every patch cropped from automatic points through every site's model, one job per group of
# predictions.shards_per_job shards (the models are loaded once per job);
# then the per-side phenotype table for GWAS (Parquet + plink2/regenie TSVs).


rule predict_masks:
    input:
        stores=predict_group_stores,
        models=[model_path(site) for site in SITES],
        cards=[model_card(site) for site in SITES],
    output:
        predictions=directory("results/predictions/{side}/group-{group}"),
    log:
        "logs/predict_masks/{side}/group-{group}.log",
    benchmark:
        "results/benchmarks/predict_masks/{side}/group-{group}.tsv"
    params:
        shards=predict_group_args,
        models=model_args,
        batch_size=config["predictions"]["batch_size"],
        precision=config["predictions"]["precision"],
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    conda:
        CONDA_GPU
    shell:
        "mkdir -p {output.predictions} && python -m hipoa predict-masks {params.shards} --model {params.models} "
        "--batch-size {params.batch_size} --precision {params.precision} 2> {log}"


rule phenotypes:
    input:
        unpack(phenotypes_input),
    output:
        **phenotypes_outputs(),
        table="results/phenotypes/osteophytes_{side}.parquet",
        pheno="results/phenotypes/osteophytes_{side}.pheno.tsv",
        fields="results/phenotypes/osteophytes_{side}.dict.tsv",
        summary="results/phenotypes/osteophytes_{side}.summary.txt",
    log:
        "logs/phenotypes/{side}.log",
    benchmark:
        "results/benchmarks/phenotypes/{side}.tsv"
    params:
        models=model_args,
        flags=phenotypes_flags,
        config_hash=config_hash(),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa phenotypes --manifest {input.manifest} "
        "--model {params.models} {params.flags} --side {wildcards.side} --out {output.table} "
        "--config-hash {params.config_hash} 2> {log} | tee {output.summary}"
