#!/usr/bin/env bash
# Single-node Slurm cluster (slurmctld + slurmd + slurmdbd/mariadb accounting) for local tests,
# e.g. submitit with cluster="slurm". No systemd: daemons are started by hand, stopped by pid file.
#   scripts/slurm_local.sh start|stop|status   (root; state in $SLURM_LOCAL_DIR, default /tmp/slurm-local)
# Config goes to the default /etc/slurm/slurm.conf, so clients need no SLURM_CONF. One cluster at a time.
set -euo pipefail

ACTIVE=/run/slurm-local.dir             # records the state dir of the running cluster (munge/mariadb pids are global)
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
[[ ${1:-} != start && -z ${SLURM_LOCAL_DIR:-} && -s $ACTIVE ]] && DIR=$(cat "$ACTIVE")   # stop/status: the running one
ETC=/etc/slurm                           # default config dir: sinfo/sbatch/submitit find it with no env var
CLUSTER=local
NODE=$(hostname -s)
DB_SOCK=/run/mysqld/mysqld.sock          # client default: slurmdbd has no socket setting, so it must be here
DB_PID=/run/mysqld/slurm-local.pid       # pid file must be in a mysql-owned dir (mariadbd runs as mysql)
MUNGE_PID=/run/munge/munged.pid          # munged's built-in default
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }   # pid file exists and its process runs
name() { [[ $1 == "$DB_PID" ]] && echo mariadbd || basename "$1" .pid; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds
  local t=$1 what=$2; shift 2
  for ((i = 0; i < t * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${t}s waiting for $what (logs: $DIR/log)"
}

install_pkgs() {
  local missing=() p
  for p in "${PKGS[@]}"; do dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]} (apt-get, ~250 MB)"
  # Debian's policy-rc.d in containers keeps postinst scripts from starting the services; we start them below.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_configs() {
  mkdir -p "$ETC" "$DIR"/{state,spool,log,run}
  local mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))  # leave 1 GB for the OS
  cat >"$ETC/slurm.conf" <<EOF
# Written by slurm_local.sh; state under $DIR
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
# Everything runs as root: no slurm user/ownership juggling in a throwaway container.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroup v1/v2 delegation in containers: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# Accounting is required: without it sacct fails and submitit sees every job as UNKNOWN.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# Schedule cores and memory, so several small jobs share the node and --mem is honoured.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A node that was DOWN (e.g. after a restart) becomes usable again as soon as it registers.
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
# "localhost" = the client's default unix socket (mariadbd below listens on no TCP port).
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
  chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses to start if the file (holding a password) is readable by others
}

start_munge() {
  alive "$MUNGE_PID" && return 0
  install -d -o munge -g munge -m 755 /run/munge          # /run may have been wiped since install
  [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
  runuser -u munge -- /usr/sbin/munged                     # munged refuses to run as root; it daemonizes itself
  wait_for 10 munged munge -n
}

start_mariadb() {
  install -d -o mysql -g mysql -m 755 /run/mysqld
  if ! alive "$DB_PID"; then
    if [[ ! -d $DIR/mysql/mysql ]]; then
      log "initialising mariadb data dir $DIR/mysql"
      install -d -o mysql -g mysql "$DIR/mysql"
      mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    fi
    # --no-defaults: ignore /etc/mysql; --skip-networking: socket only, so no clash on port 3306.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DB_SOCK" --pid-file="$DB_PID" \
      --skip-networking --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  fi
  wait_for 60 mariadb mariadb-admin --socket="$DB_SOCK" ping
  # root@localhost authenticates by unix socket (we are root); both statements are idempotent.
  mariadb --socket="$DB_SOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start() {
  [[ $EUID -eq 0 ]] || die "run as root"
  if [[ -s $ACTIVE && $(cat "$ACTIVE") != "$DIR" ]] && alive "$(cat "$ACTIVE")/run/slurmctld.pid"; then
    die "a cluster with state dir $(cat "$ACTIVE") is running; stop it first (SLURM_LOCAL_DIR=$(cat "$ACTIVE") $0 stop)"
  fi
  echo "$DIR" >"$ACTIVE"
  local t0=$SECONDS f
  install_pkgs
  write_configs
  start_munge
  start_mariadb
  alive "$DIR/run/slurmdbd.pid" || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  alive "$DIR/run/slurmctld.pid" || slurmctld
  wait_for 30 slurmctld scontrol ping
  alive "$DIR/run/slurmd.pid" || slurmd
  wait_for 60 "node $NODE idle" bash -c "sinfo -h -N -n $NODE -o %t | grep -qx idle"
  # A daemon that could not bind its port (e.g. a stray instance) exits at once: catch it here, not in a test.
  for f in "$DIR"/run/{slurmdbd,slurmctld,slurmd}.pid; do alive "$f" || die "$(name "$f") is not running, see $DIR/log"; done
  log "cluster '$CLUSTER' up in $((SECONDS - t0))s; config is $ETC/slurm.conf (default path, no SLURM_CONF needed)"
  [[ -z ${SLURM_CONF:-} || ${SLURM_CONF} == "$ETC/slurm.conf" ]] || log "WARNING: unset SLURM_CONF (now $SLURM_CONF)"
  sinfo
}

stop() {
  # Reverse order of start; kill only the pids we recorded, never by process name.
  local f pid
  for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid" "$DB_PID" "$MUNGE_PID"; do
    if alive "$f"; then
      pid=$(cat "$f")   # read once: daemons delete their own pid file on exit
      log "stopping $(name "$f") (pid $pid)"
      kill "$pid"
      for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && log "WARNING: $(name "$f") (pid $pid) still running after 30s"
    fi
    rm -f "$f"
  done
  rm -f "$ACTIVE"
  log "stopped"
}

status() {
  local f rc=0
  for f in "$MUNGE_PID" "$DB_PID" "$DIR/run/slurmdbd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"; do
    if alive "$f"; then echo "running  $(name "$f") pid $(cat "$f")"; else echo "stopped  $(name "$f")"; rc=1; fi
  done
  ((rc == 0)) && sinfo
  return $rc
}

case ${1:-} in
  start | stop | status) "$1" ;;
  *) echo "usage: $0 start|stop|status   (state dir: \$SLURM_LOCAL_DIR, default /tmp/slurm-local)" >&2; exit 2 ;;
esac
