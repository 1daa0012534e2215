#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying `+launcher=slurm` (and for
# tests/test_slurm_launcher.py, which runs when `sinfo` answers). Needs root and Debian's packages:
#   apt-get install -y slurm-wlm munge && bash tests/slurm/start_single_node.sh
# One partition, `debug`, holding every core of this machine; no cgroups (containers rarely have them).
# Stop it with: scontrol shutdown; pkill munged
set -euo pipefail
node=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
config_dir=/etc/slurm
mkdir -p "$config_dir" /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge
cat > "$config_dir/slurm.conf" <<CONF
ClusterName=llmk_lab
SlurmctldHost=$node
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1; }
chown root:root /etc/munge/munge.key /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged > /dev/null || munged --force
pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then sinfo; exit 0; fi
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
