#!/usr/bin/env bash
# Real-SLURM check of the hipoa workflow, run the way its users start it: `snakemake --profile
# slurm` from the checkout.
#
# Starts a throwaway one-node SLURM cluster on localhost (munged, MariaDB + slurmdbd for
# accounting, slurmctld, slurmd with two fake GPUs) and runs the demo twice, each in a fresh
# copy of the workflow and with a fresh HOME:
#   (a) "generic": the user has a generic profile ~/.config/snakemake/slurm (executor, account,
#       partition) that knows nothing of hipoa; hipoa's workflow profile profiles/default adds
#       the GPU partition, retries and job arrays;
#   (b) "installed": the user has none and runs `hipoa install-profile slurm` first (which must
#       then refuse to overwrite it).
# After each it checks in the accounting database that every job COMPLETED under the account,
# that the GPU rules ran as GPU jobs (TRES gres/gpu, partition gpu) and the CPU rules did not,
# that the local rules were no SLURM job, and it prints the number of sbatch calls (job arrays
# included). Then it runs the same demo with `--profile profiles/local` in another copy and
# compares the phenotype Parquet files of both SLURM runs with it (pandas assert_frame_equal;
# metadata equal except `created`). Every daemon it starts is stopped by the PID it recorded,
# on success, failure or signal.
#
# Needs root and Debian (installs slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# with apt-get when missing). No systemd, no cgroups. Everything else lives in a fresh
# temporary directory with free TCP ports, so the script can be rerun at will.
#
# Usage: tests/slurm/run_slurm_demo.sh [options] [-- extra snakemake arguments for every run]
#   Without `--`, the runs get `--configfile config/demo.yaml tests/slurm/demo_config.yaml`
#   (a tiny cohort and one-epoch U-Nets); `-- --configfile config/demo.yaml` runs the full demo.
#   --workflow DIR   project directory holding workflow/ config/ profiles/ src/ (default: this repo)
#   --gpu-rules "R1 R2"  rules that must run as GPU jobs
#                    (default: "train_unet evaluate_unet predict_masks")
#   --timeout S      limit for each snakemake run in seconds (default 1800; SIGINT on expiry)
#   --skip-local     do not run the local demo nor compare the Parquet files
#   --keep           keep the temporary directory (logs, all runs) after success
#   --cluster-only   start the cluster, print how to use it, and wait until interrupted
#   --install-only   only install the missing Debian packages
# Exit status: 0 when every check passed; 3 when the Debian packages are missing and cannot be
# installed; 1 (or the signal's 128+n) on any other failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/slurm
WORKFLOW_DIR=$ROOT
GPU_RULES="train_unet evaluate_unet predict_masks"
# Rules that run on the submit host (localrule), never as SLURM jobs.
LOCAL_RULES="show_patches split_data report_figures"
SMK_TIMEOUT=1800
SKIP_LOCAL=0
KEEP=0
CLUSTER_ONLY=0
INSTALL_ONLY=0
EXTRA_ARGS=(--configfile config/demo.yaml "$HERE/demo_config.yaml")
CLUSTER=hipoa-test
DEMO_ACCOUNT=hipoa-demo
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

log() { printf '[slurm-demo %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    log "FAIL: $*"
    exit 1
}

while (($#)); do
    case $1 in
    --workflow) WORKFLOW_DIR=$(cd "$2" && pwd) && shift 2 ;;
    --gpu-rules) GPU_RULES=$2 && shift 2 ;;
    --timeout) SMK_TIMEOUT=$2 && shift 2 ;;
    --skip-local) SKIP_LOCAL=1 && shift ;;
    --keep) KEEP=1 && shift ;;
    --cluster-only) CLUSTER_ONLY=1 && shift ;;
    --install-only) INSTALL_ONLY=1 && shift ;;
    --) shift && EXTRA_ARGS=("$@") && break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (installs Debian packages, starts daemons); uid is $(id -u)"
[[ -f $WORKFLOW_DIR/workflow/Snakefile || -f $WORKFLOW_DIR/Snakefile ]] ||
    die "no workflow/Snakefile in --workflow '$WORKFLOW_DIR'"

T0=$(date +%s)
elapsed() { echo $(($(date +%s) - $1)); }

# ---------------------------------------------------------------- packages
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "Debian packages present: ${PACKAGES[*]}"
        return
    fi
    if ! command -v apt-get >/dev/null; then
        log "FAIL: apt-get not found; cannot install ${missing[*]}"
        exit 3
    fi
    log "installing ${missing[*]} with apt-get"
    # Keep maintainer scripts from starting the system's own daemons (no systemd here; we
    # start private instances below). Only add a policy-rc.d when there is none.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}"
    } >"${TMPDIR:-/tmp}/hipoa-slurm-apt.log" 2>&1 || rc=$?
    ((added_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        tail -n 20 "${TMPDIR:-/tmp}/hipoa-slurm-apt.log"
        log "FAIL: apt-get install ${missing[*]} failed (status $rc)"
        exit 3
    fi
}
install_packages
T_INSTALL=$(elapsed "$T0")
((INSTALL_ONLY)) && exit 0

# ---------------------------------------------------------------- process bookkeeping
# One run at a time on a machine: the cluster's configuration is linked at /etc/slurm.
ETC_CONF=/etc/slurm/slurm.conf
ETC_CONF_LINKED=0
LOCK=/run/lock/hipoa-slurm-demo.lock
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -w 3600 9 || die "another run holds $LOCK"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hipoa-slurm.XXXXXX")
chmod 755 "$WORK"
DAEMON_NAMES=()
DAEMON_PIDS=()
SMK_PID=
SLURM_UP=0

pid_alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

stop_pid() { # name pid: SIGTERM, wait up to 20 s, then SIGKILL
    local name=$1 pid=$2 i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do
        pid_alive "$pid" || break
        sleep 0.25
    done
    if pid_alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
}

cleanup() {
    local rc=$? i
    local -a jobs=()
    set +e
    trap - EXIT INT TERM
    if pid_alive "$SMK_PID"; then
        # SIGINT makes snakemake cancel its SLURM jobs before it exits.
        log "interrupting snakemake (pid $SMK_PID) with SIGINT"
        kill -INT "$SMK_PID"
        for ((i = 0; i < 240; i++)); do
            pid_alive "$SMK_PID" || break
            sleep 0.25
        done
        stop_pid snakemake "$SMK_PID"
    fi
    if ((SLURM_UP)); then
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
        if ((${#jobs[@]})); then
            log "cancelling leftover jobs: ${jobs[*]}"
            scancel "${jobs[@]}"
            for ((i = 0; i < 60; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${DAEMON_NAMES[i]}" "${DAEMON_PIDS[i]}"
    done
    ((ETC_CONF_LINKED)) && rm -f "$ETC_CONF"
    ((CLUSTER_ONLY && (rc == 130 || rc == 143))) && rc=0
    rm -rf "$WORK/mysql" # the database is large and of no use once the daemons are gone
    if ((rc != 0)); then
        log "exit status $rc; logs kept in $WORK (log/, run-*/.snakemake/)"
    elif ((KEEP)); then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_daemon() { # name command...: run in the foreground mode of the daemon, in background
    local name=$1
    shift
    # fd 9 holds the run lock: a daemon that outlived this script must not keep it.
    "$@" >"$WORK/log/$name.out" 2>&1 9>&- &
    DAEMON_NAMES+=("$name")
    DAEMON_PIDS+=($!)
    echo "$name $!" >>"$WORK/run/pids"
    log "started $name (pid $!)"
}

show_log() { # name: tail of the daemon's logs
    local f
    for f in "$WORK/log/$1".*; do
        [[ -f $f ]] && { echo "--- $f" && tail -n 25 "$f"; }
    done
}

wait_until() { # description timeout_s watched_daemon command...
    local what=$1 name=$3 pid deadline=$((SECONDS + $2))
    shift 3
    pid=${DAEMON_PIDS[-1]}
    while ((SECONDS < deadline)); do
        timeout 10 "$@" >/dev/null 2>&1 && return 0
        if ! pid_alive "$pid"; then
            show_log "$name"
            die "$name exited while waiting for $what"
        fi
        sleep 0.25
    done
    show_log "$name"
    die "timed out waiting for $what"
}

# ---------------------------------------------------------------- configuration
mkdir -p "$WORK"/{etc,log,run,dev,munge,mysql,mysql-tmp,state/slurmctld,state/slurmd}
HOST=$(hostname -s)
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
fill() { # template output
    sed -e "s|@WORK@|$WORK|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@CPUS@|16|g" -e "s|@MEM_MB@|131072|g" "$1" >"$2"
}
fill "$HERE/slurm.conf.in" "$WORK/etc/slurm.conf"
fill "$HERE/gres.conf.in" "$WORK/etc/gres.conf"
fill "$HERE/slurmdbd.conf.in" "$WORK/etc/slurmdbd.conf"
chmod 600 "$WORK/etc/slurmdbd.conf"
# Daemons and clients read this cluster's configuration through SLURM_CONF. Inside a job,
# the Snakemake job step drops every SLURM_* variable except the job's identity before it
# calls srun, so srun finds its configuration where it does on a real cluster: in
# /etc/slurm/slurm.conf. That file is a symlink to ours while the run lasts (see lock above).
export SLURM_CONF=$WORK/etc/slurm.conf
if [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
    [[ $(readlink "$ETC_CONF") == "${TMPDIR:-/tmp}"/hipoa-slurm.*/etc/slurm.conf ]] ||
        die "$ETC_CONF exists and is not a leftover of this script; not touching a real cluster"
    rm -f "$ETC_CONF"
fi
mkdir -p "$(dirname "$ETC_CONF")"
ln -s "$SLURM_CONF" "$ETC_CONF"
ETC_CONF_LINKED=1
for i in 0 1; do mknod "$WORK/dev/fakegpu$i" c 1 3; done
log "work dir $WORK; host $HOST; ports slurmctld $CTLD_PORT slurmd $SLURMD_PORT" \
    "slurmdbd $DBD_PORT mariadb $DB_PORT"

# ---------------------------------------------------------------- daemons
T1=$(date +%s)
# munged: as the munge user, private key, socket and logs.
head -c 1024 /dev/urandom >"$WORK/munge/munge.key"
chown -R munge:munge "$WORK/munge"
chmod 755 "$WORK/munge"
chmod 600 "$WORK/munge/munge.key"
start_daemon munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --socket="$WORK/munge/munge.sock" --key-file="$WORK/munge/munge.key" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" \
    --seed-file="$WORK/munge/munged.seed"
wait_until "munge credentials" 20 munged \
    bash -c "munge -S '$WORK/munge/munge.sock' -n | unmunge -S '$WORK/munge/munge.sock'"

# MariaDB: a private instance on 127.0.0.1 for slurmdbd.
touch "$WORK/log/mariadbd.log"
chown mysql:mysql "$WORK/mysql" "$WORK/mysql-tmp" "$WORK/log/mariadbd.log"
mariadb-install-db --no-defaults --user=mysql --datadir="$WORK/mysql" \
    --auth-root-authentication-method=socket --skip-test-db >"$WORK/log/mariadb-install.log" 2>&1 ||
    {
        tail -n 20 "$WORK/log/mariadb-install.log"
        die "mariadb-install-db failed"
    }
start_daemon mariadbd mariadbd --no-defaults --user=mysql --datadir="$WORK/mysql" \
    --tmpdir="$WORK/mysql-tmp" --socket="$WORK/mysql/mysqld.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$WORK/mysql-tmp/mariadbd.pid" \
    --log-error="$WORK/log/mariadbd.log" --innodb-buffer-pool-size=64M \
    --innodb-log-file-size=16M --innodb-use-native-aio=0 --open-files-limit=4096
SQL=(mariadb --no-defaults --socket="$WORK/mysql/mysqld.sock" -u root)
wait_until "MariaDB" 60 mariadbd "${SQL[@]}" -e 'SELECT 1'
"${SQL[@]}" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# slurmdbd, then the cluster, an account and the root user in it.
start_daemon slurmdbd slurmdbd -D
wait_until "slurmdbd" 90 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -i add account "$DEMO_ACCOUNT" Cluster="$CLUSTER" Description=hipoa-demo \
    Organization=hipoa >/dev/null
sacctmgr -i add user root Account="$DEMO_ACCOUNT" Cluster="$CLUSTER" >/dev/null

start_daemon slurmctld slurmctld -D -i
SLURM_UP=1
wait_until "slurmctld" 60 slurmctld scontrol ping
start_daemon slurmd slurmd -D -N "$HOST"
wait_until "node $HOST idle in sinfo" 60 slurmd \
    bash -c "[[ \$(sinfo -h -n '$HOST' -o %t | sort -u) == idle ]]"
T_CLUSTER=$(elapsed "$T1")
log "cluster up in ${T_CLUSTER}s:"
sinfo -o '%P %a %D %t %N %G'
scontrol show node "$HOST" | grep -E 'Gres=|CfgTRES='

if ((CLUSTER_ONLY)); then
    log "cluster running; in another shell: export SLURM_CONF=$SLURM_CONF"
    log "stop it with Ctrl-C or: kill $$"
    while true; do sleep 1; done
fi

# ---------------------------------------------------------------- the runs
copy_workflow() { # destination: a fresh copy of the project's workflow files
    local d
    mkdir -p "$1"
    for d in workflow config profiles envs src Snakefile; do
        [[ -e $WORKFLOW_DIR/$d ]] && cp -a "$WORKFLOW_DIR/$d" "$1/"
    done
    rm -rf "$1/.snakemake"
    find "$1/src" -name __pycache__ -prune -exec rm -rf {} +
}

run_snakemake() { # label directory snakemake-args...: runs under a timeout, output to a log
    local label=$1 dir=$2 rc=0 t
    shift 2
    t=$(date +%s)
    log "snakemake ($label) in $dir: snakemake $*"
    (cd "$dir" && exec timeout -s INT -k 120 "$SMK_TIMEOUT" snakemake "$@") \
        >"$WORK/log/snakemake-$label.log" 2>&1 9>&- &
    SMK_PID=$!
    wait "$SMK_PID" || rc=$?
    SMK_PID=
    log "snakemake ($label) finished with status $rc in $(elapsed "$t")s"
    if ((rc != 0)); then
        tail -n 60 "$WORK/log/snakemake-$label.log"
        ((rc == 124)) && die "snakemake ($label) timed out after ${SMK_TIMEOUT}s"
        die "snakemake ($label) failed (status $rc); log: $WORK/log/snakemake-$label.log"
    fi
}

# Partition and account come from the user's profile or environment, as on a user's cluster:
# CPU rules go to partition main, GPU rules to HIPOA_SLURM_GPU_PARTITION (read by the workflow
# profile profiles/default). Nothing of this machine's own configuration is read: each case runs
# with a fresh HOME.
unset HIPOA_SLURM_PARTITION SBATCH_PARTITION HIPOA_SLURM_ACCOUNT SLURM_ACCOUNT SBATCH_ACCOUNT \
    XDG_CONFIG_HOME
export HIPOA_SLURM_GPU_PARTITION=gpu

# Case (a): the user already has a generic profile named `slurm` (executor, account, partition),
# as many clusters give their users; hipoa's per-rule settings must come from profiles/default.
HOME_GENERIC=$WORK/home-generic
mkdir -p "$HOME_GENERIC/.config/snakemake/slurm"
{
    echo "# A cluster's generic Snakemake profile, knowing nothing of hipoa."
    echo "executor: slurm"
    echo "jobs: 50"
    echo "default-resources:"
    echo "  slurm_account: $DEMO_ACCOUNT"
    echo "  slurm_partition: main"
    echo "  mem_mb: 2000"
} >"$HOME_GENERIC/.config/snakemake/slurm/config.yaml"
# Case (b): the user has none; `hipoa install-profile slurm` installs hipoa's (account from
# SBATCH_ACCOUNT, partition: the cluster's default, main).
HOME_NONE=$WORK/home-none
mkdir -p "$HOME_NONE"

check_slurm_run() { # label: sbatch calls, job arrays, accounting of one SLURM run
    local label=$1 smk_log=$WORK/log/snakemake-$1.log sacct_out=$WORK/log/sacct-$1.txt run_id
    local n_calls n_arrays n_single n_tasks n_accounted
    run_id=$(sed -n 's/.*SLURM run ID: \([^ ]*\).*/\1/p' "$smk_log" | head -n 1)
    log "($label) SLURM run ID $run_id; sbatch calls:"
    grep -o 'sbatch call: .*' "$smk_log" | sed -e 's/--wrap=.*/--wrap=<snakemake job step>/' \
        -e 's/--slurm-jobstep-array-execs=[^ ]*/--slurm-jobstep-array-execs=<tasks>/' \
        -e 's/^/  /' || die "no 'sbatch call' line in $smk_log"
    n_calls=$(grep -c 'sbatch call: ' "$smk_log" || true)
    n_arrays=$(grep -c 'Submitting array job with sbatch call: ' "$smk_log" || true)
    n_single=$(grep -c 'has been submitted with SLURM jobid' "$smk_log" || true)
    n_tasks=$(grep -o 'The individual task IDs are [0-9]*-[0-9]*' "$smk_log" |
        awk -F'[ -]' '{n += $NF - $(NF-1) + 1} END {print n + 0}')
    log "SBATCH CALLS ($label): $n_calls sbatch calls for $((n_single + n_tasks)) jobs" \
        "($n_arrays job arrays holding $n_tasks jobs, $n_single single jobs)"
    ((n_calls > 0)) || die "($label) snakemake submitted no SLURM job"
    ((n_arrays > 0)) || die "($label) no job array was submitted (profiles/default: slurm-array-jobs)"
    sacct -X -n -P --name="$run_id" -S "$(date -d '-1 day' +%Y-%m-%dT%H:%M:%S)" \
        -o JobID,Comment,Partition,Account,AllocTRES,State,Elapsed >"$sacct_out"
    log "($label) sacct (JobID|Comment|Partition|Account|AllocTRES|State|Elapsed):"
    sed 's/^/  /' "$sacct_out"
    n_accounted=$(wc -l <"$sacct_out")
    ((n_accounted == n_single + n_tasks)) ||
        die "($label) sacct lists $n_accounted jobs of run $run_id, snakemake submitted $((n_single + n_tasks))"
    read -r -a GPU_RULE_LIST <<<"$GPU_RULES"
    python3 "$HERE/check_sacct.py" "$sacct_out" "$DEMO_ACCOUNT" "$LOCAL_RULES" "${GPU_RULE_LIST[@]}" ||
        die "($label) job checks failed (see ERROR lines)"
}

# --retries 0: a failure shows at once (the workflow profile would retry it twice).
RUN_GENERIC=$WORK/run-generic
copy_workflow "$RUN_GENERIC"
T2=$(date +%s)
HOME=$HOME_GENERIC run_snakemake generic "$RUN_GENERIC" --profile slurm --profile "$HERE/profile" \
    --retries 0 "${EXTRA_ARGS[@]}"
T_GENERIC=$(elapsed "$T2")
check_slurm_run generic

RUN_INSTALLED=$WORK/run-installed
copy_workflow "$RUN_INSTALLED"
log "installing hipoa's slurm profile: (cd $RUN_INSTALLED && hipoa install-profile slurm)"
(cd "$RUN_INSTALLED" && HOME=$HOME_NONE hipoa install-profile slurm) ||
    die "hipoa install-profile slurm failed"
[[ -f $HOME_NONE/.config/snakemake/slurm/config.yaml ]] ||
    die "no profile in $HOME_NONE/.config/snakemake/slurm"
if (cd "$RUN_INSTALLED" && HOME=$HOME_NONE hipoa install-profile slurm >/dev/null 2>&1); then
    die "hipoa install-profile slurm overwrote the profile it had installed"
fi
T3=$(date +%s)
HOME=$HOME_NONE SBATCH_ACCOUNT=$DEMO_ACCOUNT run_snakemake installed "$RUN_INSTALLED" \
    --profile slurm --profile "$HERE/profile" --retries 0 "${EXTRA_ARGS[@]}"
T_INSTALLED=$(elapsed "$T3")
check_slurm_run installed

if ((SKIP_LOCAL)); then
    T_LOCAL=0
    log "skipping the local run and the Parquet comparison (--skip-local)"
else
    RUN_LOCAL=$WORK/run-local
    copy_workflow "$RUN_LOCAL"
    T4=$(date +%s)
    run_snakemake local "$RUN_LOCAL" --profile profiles/local "${EXTRA_ARGS[@]}"
    T_LOCAL=$(elapsed "$T4")
    for run in "$RUN_GENERIC" "$RUN_INSTALLED"; do
        python3 "$HERE/compare_parquet.py" "$run" "$RUN_LOCAL" ||
            die "phenotype Parquet files of $run and the local run differ"
    done
fi

log "TIMING install ${T_INSTALL}s, cluster start ${T_CLUSTER}s, SLURM demo with a generic" \
    "profile ${T_GENERIC}s, with hipoa's installed profile ${T_INSTALLED}s, local demo" \
    "${T_LOCAL}s, total $(elapsed "$T0")s"
log "PASSED"
