#!/usr/bin/env bash
# slurm/local-cluster.sh - a real single-node Slurm on this machine, for tests, CI and trying ld3m.
#
#   sudo bash slurm/local-cluster.sh up        # install Debian's slurm packages (first time), start
#   bash slurm/local-cluster.sh status         # daemons, sinfo, squeue
#   sudo bash slurm/local-cluster.sh down      # stop the daemons (by the PIDs in their pid files)
#   sudo bash slurm/local-cluster.sh down --purge   # also remove state, logs and the config
#
# Needs root and Debian/Ubuntu (apt). Everything listens on 127.0.0.1. No systemd, no cgroups
# (proctrack/linuxproc, task/none), no accounting database (sacct is unavailable; squeue, sbatch,
# arrays, dependencies, signals and requeue all work). Idempotent: `up` installs only what is
# missing, rewrites slurm.conf only when it changed, starts only daemons that are not running.
#
# Settings (environment):
#   LD3M_SLURM_PARTITION  partition name                               (debug)
#   LD3M_SLURM_MAXTIME    partition MaxTime in minutes                 (60)
#   LD3M_SLURM_CPUS       CPUs the node advertises; may exceed nproc    (nproc x 4)
#   LD3M_SLURM_MEM_MB     memory the node advertises                    (90% of MemTotal)
#   LD3M_SLURM_REQUEUE_S  delay before a requeued job may start again   (10; Slurm's default 120)
#
# Fast requeue: Slurm holds a requeued job PENDING(BeginTime) for AuthInfo cred_expire seconds
# (default 120); 10 here, with short scheduler intervals, restarts it in about 11 s.
# A job asking for --time above MaxTime stays PENDING forever (EnforcePartLimits=NO): keep the
# sweep's slurm.time_min <= LD3M_SLURM_MAXTIME.
set -euo pipefail

ACTION="${1:-up}"
OPTION="${2:-}"
HOST="$(hostname -s)"
PARTITION="${LD3M_SLURM_PARTITION:-debug}"
MAXTIME="${LD3M_SLURM_MAXTIME:-60}"
CPUS="${LD3M_SLURM_CPUS:-$(( $(nproc) * 4 ))}"
MEM_MB="${LD3M_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}"
REQUEUE_S="${LD3M_SLURM_REQUEUE_S:-10}"

CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
LOGS=/var/log/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "[local-cluster] $*"; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop NAME PIDFILE: TERM the recorded PID, KILL it after 15 s
  local name=$1 file=$2 pid
  if alive "$file"; then
    pid=$(cat "$file")
    say "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [[ ${#missing[@]} -eq 0 ]] && return
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  # Without an init system the postinst cannot start services ("policy-rc.d denied"): harmless.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || mungekey --create --force 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  if alive "$MUNGE_PID" && munge -n </dev/null | unmunge >/dev/null 2>&1; then return; fi
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2
  runuser -u munge -- /usr/sbin/munged   # munged refuses to run as root
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  say "munge does not answer"; exit 1
}

write_conf() {
  install -d -m 0755 /etc/slurm "$RUN" "$LOGS" "$STATE" "$SPOOL"
  local new; new=$(mktemp)
  cat >"$new" <<EOF
# Written by ld3m slurm/local-cluster.sh: one node on 127.0.0.1.
ClusterName=ld3m-local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${REQUEUE_S}
StateSaveLocation=${STATE}
SlurmdSpoolDir=${SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=${MAXTIME} State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$new" "$CONF"; then rm -f "$new"; return; fi
  mv "$new" "$CONF" && chmod 0644 "$CONF"
  say "wrote $CONF (CPUs=$CPUS, MaxTime=${MAXTIME} min, requeue delay ${REQUEUE_S} s)"
  stop slurmd "$SLURMD_PID"
  stop slurmctld "$CTLD_PID"
}

start_slurm() {
  alive "$CTLD_PID" || slurmctld
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  scontrol ping | grep -q 'is UP' || { say "slurmctld is down; see $LOGS/slurmctld.log"; exit 1; }
  alive "$SLURMD_PID" || slurmd
  local state=""
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)
    case $state in
      idle | mix | alloc | comp) say "node $HOST is $state: ready"; return ;;
      down* | drain* | fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  say "node $HOST is '$state'; see $LOGS/slurmd.log"; exit 1
}

case "$ACTION" in
  up)
    install_packages
    start_munge
    write_conf
    start_slurm
    ;;
  down)
    stop slurmd "$SLURMD_PID"
    stop slurmctld "$CTLD_PID"
    stop munged "$MUNGE_PID"
    if [[ "$OPTION" == --purge ]]; then rm -rf "$STATE" "$SPOOL" "$LOGS" "$CONF"; fi
    ;;
  status)
    for d in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
      if alive "${d#*:}"; then echo "${d%%:*}: running"; else echo "${d%%:*}: stopped"; fi
    done
    if alive "$CTLD_PID"; then sinfo; squeue; fi
    ;;
  *) echo "usage: $0 up | down [--purge] | status" >&2; exit 2 ;;
esac
