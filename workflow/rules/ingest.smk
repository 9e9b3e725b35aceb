# One manifest row per (eid, instance, side) image, never dropped; headers only, so 40k zips
# ingest in minutes. The shard of each row (blake2b(eid) mod patches.shards) is decided here.


rule ingest:
    input:
        unpack(ingest_input),
    output:
        manifest="results/manifest/{side}.parquet",
    log:
        "logs/ingest/{side}.log",
    benchmark:
        "results/benchmarks/ingest/{side}.tsv"
    params:
        source=ingest_source,
        withdrawn=withdrawn_flag,
        shards=config["patches"]["shards"],
        n_points=config["n_points"],
        limits=qc_json(),
        labels=mask_labels(),
    threads: 4
    # Measured peak: 348 MB for 19,900 images (docs/scale.md); the worst header under the parse caps
    # costs one worker 144 MB (benchmarks/header_rss.py), so 4 workers stay well inside the request.
    resources:
        mem_mb=2000,
        runtime=180,
    conda:
        CONDA_CPU
    shell:
        "python -m hipoa ingest {params.source} {params.withdrawn} --side {wildcards.side} --shards {params.shards} "
        "--n-points {params.n_points} --limits '{params.limits}' --mask-labels {params.labels} "
        "--workers {threads} --out {output.manifest} 2> {log}"
