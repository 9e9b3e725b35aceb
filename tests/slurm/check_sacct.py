"""Check the accounting of one SLURM run of the demo (called by run_slurm_demo.sh).

Usage: python check_sacct.py SACCT_TXT ACCOUNT "LOCAL RULES" GPU_RULE...

SACCT_TXT holds `sacct -X -n -P -o JobID,Comment,Partition,Account,AllocTRES,State,Elapsed`
for the run. Every job must be COMPLETED under ACCOUNT; jobs of the GPU rules hold a GPU
(gres/gpu in AllocTRES) on partition gpu, every other job none, on partition main; the rules
that run on the submit host (LOCAL RULES, space-separated) have no job. Exits 1 with one
ERROR line per problem.
"""

from __future__ import annotations

import re
import sys


def main(argv: list[str]) -> int:
    path, account, local_rules, gpu_rules = argv[0], argv[1], argv[2].split(), argv[3:]
    errors: list[str] = []
    gpu_jobs: dict[str, list[str]] = {rule: [] for rule in gpu_rules}
    with open(path) as lines:
        for line in lines:
            jobid, comment, partition, acct, tres, state, _elapsed = line.rstrip("\n").split("|")
            rule = re.sub(r"^rule_", "", comment).split("_wildcards_")[0]
            has_gpu = re.search(r"gres/gpu=\d+", tres) is not None
            if state != "COMPLETED":
                errors.append(f"job {jobid} ({rule}) is {state}")
            if acct != account:
                errors.append(f"job {jobid} ({rule}) ran under account {acct!r}, not {account!r}")
            if rule in local_rules:
                errors.append(f"local rule {rule} was submitted as job {jobid}")
            if rule in gpu_jobs:
                gpu_jobs[rule].append(jobid)
                if not has_gpu or partition != "gpu":
                    errors.append(f"GPU rule {rule} job {jobid}: partition {partition}, TRES {tres}")
            elif has_gpu or partition != "main":
                errors.append(f"CPU rule {rule} job {jobid}: partition {partition}, TRES {tres}")
    for rule, ids in gpu_jobs.items():
        if not ids:
            errors.append(f"no SLURM job for GPU rule {rule}")
    summary = ", ".join(f"{rule}: {len(ids)} (jobs {' '.join(ids)})" for rule, ids in gpu_jobs.items())
    print(f"GPU jobs (gres/gpu in AllocTRES, partition gpu): {summary}")
    if errors:
        print("\n".join(f"  ERROR {e}" for e in errors))
        return 1
    print(f"all SLURM jobs COMPLETED under account {account}; CPU rules on partition main "
          f"without GPUs; no job for {' '.join(local_rules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
