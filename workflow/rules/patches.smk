# Landmark-normalised patches per site, one Zarr store per (side, shard), and a QC montage.


rule crop_patches:
    input:
        manifest="results/manifest/{side}.parquet",
    output:
        store=directory("results/patches/{side}/shard-{shard}.zarr"),
    log:
        "logs/crop_patches/{side}/shard-{shard}.log",
    benchmark:
        "results/benchmarks/crop_patches/{side}/shard-{shard}.tsv"
    params:
        sites=sites_json(),
        context=config["patches"]["context"],
        min_inside=config["patches"]["min_inside_fraction"],
        n_points=config["n_points"],
        limits=qc_json(),
    threads: 1
    # Measured peak: 373 MB for a shard of 1,000 images (docs/scale.md).
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa crop-patches --manifest {input.manifest} --shard {wildcards.shard} "
        "--out {output.store} --sites '{params.sites}' --context {params.context} "
        "--min-inside {params.min_inside} --n-points {params.n_points} --limits '{params.limits}' 2> {log}"


rule show_patches:
    input:
        stores=patch_stores_of_side,
    output:
        montage=report(
            "results/qc/patches_{side}_{source}.png",
            caption="../report/patches.rst",
            category="Quality control",
            labels={"figure": "patches", "side": "{side}", "points": "{source}"},
        ),
    log:
        "logs/show_patches/{side}_{source}.log",
    benchmark:
        "results/benchmarks/show_patches/{side}_{source}.tsv"
    params:
        n=8,
        show_eids="--show-eids" if config["report"]["show_eids"] else "",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        CONDA_CPU
    localrule: True
    shell:
        "python -m hipoa show-patches --stores {input.stores} --out {output.montage} "
        "--n {params.n} --source {wildcards.source} {params.show_eids} 2> {log}"
