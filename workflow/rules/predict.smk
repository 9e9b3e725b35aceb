# Every patch cropped from automatic points through every site's model, one job per group of
# predictions.shards_per_job shards (the models are loaded once per job);
# then the per-side phenotype table with its GWAS files, and the participant table of all sides
# with its own (hipoa.release).


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
        **GPU_PARTITION,
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
        **release_outputs("results/phenotypes/osteophytes_{side}"),
        summary="results/phenotypes/osteophytes_{side}.summary.txt",
    log:
        "logs/phenotypes/{side}.log",
    benchmark:
        "results/benchmarks/phenotypes/{side}.tsv"
    params:
        models=model_args,
        flags=phenotypes_flags,
        config_hash=config_hash(),
        instance=config["gwas"]["instance"],
    threads: 1
    # Measured peak: 229 MB for 19,900 images (docs/scale.md).
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa phenotypes --manifest {input.manifest} "
        "--model {params.models} {params.flags} --side {wildcards.side} --out {output.table} "
        "--config-hash {params.config_hash} --instance {params.instance} 2> {log} | tee {output.summary}"


rule release:
    input:
        phenotypes=expand("results/phenotypes/osteophytes_{side}.parquet", side=SIDES),
        manifests=expand("results/manifest/{side}.parquet", side=SIDES),
    output:
        **release_outputs("results/phenotypes/osteophytes"),
    log:
        "logs/release.log",
    benchmark:
        "results/benchmarks/release.tsv"
    params:
        instance=config["gwas"]["instance"],
    threads: 1
    # Measured peak: 262 MB for 19,900 participants (docs/scale.md).
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa release --phenotypes {input.phenotypes} --manifests {input.manifests} "
        "--out {output.table} --instance {params.instance} 2> {log}"
