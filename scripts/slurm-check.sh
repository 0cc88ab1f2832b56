#!/usr/bin/env bash
# Data parallel under Slurm's srun, on this one machine: a single-node Slurm (Debian's
# slurm-wlm and munge, installed and started here when missing; root needed), then
#   1. `srun --mpi=pmix -n 2 align dpo` ends at the same adapter, bit for bit, as
#      `mpirun -np 2 align dpo` (and within f32 reduction order of one process);
#   2. a rank killed with SIGKILL makes srun cancel the job step (no hang);
#   3. `srun ... align dpo --resume` continues from the last checkpoint to the end.
# Not part of .ci/run (it starts daemons); run by hand:  scripts/slurm-check.sh
# Needs the mpi build: cargo build --release --features mpi (done here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
align=${ALIGN:-target/release/align}
work=$(mktemp -d /tmp/align-slurm.XXXXXX)
export RAYON_NUM_THREADS=1
fail() { echo "FAIL: $*"; exit 1; }

if ! command -v srun >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null
fi
if ! sinfo -h >/dev/null 2>&1; then
    host=$(hostname -s)
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    chown munge:munge /run/munge
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=align-check
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmix
ReturnToService=2
SlurmUser=root
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    for _ in $(seq 30); do sinfo -h -o %t | grep -q idle && break; sleep 1; done
fi
sinfo
if ! ldd "$align" 2>/dev/null | grep -q libmpi; then
    cargo build --release --features mpi
fi

flags=(dpo --steps 4 --batch-size 2 --grad-accum 2 --eval-every 0 --save-every 2 --seed 3)
"$align" "${flags[@]}" --out "$work/one" >"$work/one.log" 2>&1
mpirun --allow-run-as-root --oversubscribe -np 2 -x RAYON_NUM_THREADS \
    "$align" "${flags[@]}" --out "$work/mpirun" >"$work/mpirun.log" 2>&1
srun --mpi=pmix -n 2 "$align" "${flags[@]}" --out "$work/srun" >"$work/srun.log" 2>&1
grep -q "data parallel: 2 ranks" "$work/srun.log" || fail "srun did not start 2 ranks: $work/srun.log"
w=adapter/adapter_model.safetensors
cmp -s "$work/mpirun/$w" "$work/srun/$w" || fail "srun and mpirun adapters differ"
echo "1. srun -n 2 = mpirun -np 2, bit for bit"
if cmp -s "$work/one/$w" "$work/srun/$w"; then
    echo "   (and = one process, bit for bit)"
else
    echo "   (one process: same steps, adapter within f32 reduction order; compare with tests/dist.rs's tolerance)"
fi

long=(dpo --steps 400 --batch-size 2 --grad-accum 2 --eval-every 0 --save-every 20 --seed 3)
srun --mpi=pmix -n 2 "$align" "${long[@]}" --out "$work/killed" >"$work/killed.log" 2>&1 &
job=$!
for _ in $(seq 60); do ls -d "$work/killed"/checkpoint-* >/dev/null 2>&1 && break; sleep 0.5; done
victim=$(pgrep -f -- "--out $work/killed" | grep -v "^$job$" | tail -1)
kill -9 "$victim"
start=$(date +%s)
if wait "$job"; then fail "srun ended with status 0 after a rank was killed"; fi
echo "2. a killed rank ended the srun step in $(($(date +%s) - start)) s ($(grep -c CANCELLED "$work/killed.log" || true) cancellation message)"

srun --mpi=pmix -n 2 "$align" dpo --resume "$work/killed" >"$work/resume.log" 2>&1
grep -q "resumed from" "$work/resume.log" || fail "no resume: $work/resume.log"
[ -f "$work/killed/$w" ] || fail "the resumed run wrote no final adapter"
echo "3. $(grep 'resumed from' "$work/resume.log"); finished: $work/killed/$w"
echo "all srun checks passed ($work)"
