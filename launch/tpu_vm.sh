#!/usr/bin/env bash
# Runs one bltjax command on every worker of a Cloud TPU VM slice, and keeps it running.
#
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --accelerator v5p-128 [options] [--dry-run] -- \
#       python -m bltjax.train --config experiments/blt_1b.py --workdir /mnt/bltjax/runs/1b ...
#
# What it does, in order (each step is printed before it runs; --dry-run prints them only):
#   1. create the slice as a queued resource (skipped when it already exists) and wait until it is ACTIVE;
#   2. copy this checkout to ~/bltjax on every worker and install it there with launch/venv.sh (a
#      virtualenv with the tpu extra, through constraints.txt; --no-copy skips both), then mount
#      --mount BUCKET:DIR with gcsfuse on every worker. bltjax needs Python >= 3.11 and the Ubuntu
#      22.04 TPU images have 3.10, so where python3 is older the workers first get uv
#      (pip install --user uv), with which venv.sh makes a Python 3.11 venv;
#   3. start the same command on all workers (gcloud ... ssh --worker=all) with BLTJAX_DISTRIBUTED=auto,
#      so that bltjax joins the hosts through jax's TPU detection; the output streams here and is also
#      kept in ~/bltjax-logs/NAME.log on each worker;
#   4. on pre-emption (the slice is no longer ACTIVE, or the command exits 143 after a SIGTERM save),
#      delete and re-create the slice and start the same command again, up to --retries times. The
#      workdir makes the relaunch resume from the last checkpoint, so it must be on storage that
#      outlives the slice and that every worker sees (a gcsfuse --mount, or Filestore/NFS).
# Any other failure (a config error, a crash) stops the launcher with the command's exit status.
#
# Options:
#   --project P        gcloud project (default: gcloud's configured one)
#   --runtime V        TPU software version (default: by generation, see runtime_for below)
#   --spot             spot capacity (cheaper, pre-emptible); --reserved: use a reservation
#   --mount B:DIR      gcsfuse-mount bucket B at DIR on every worker (put --workdir and the data there)
#   --setup CMD        one more shell command for every worker after the install (pins, extra packages)
#   --retries N        re-creations after pre-emption (default 5)
#   --no-copy          the code is already installed in ~/bltjax on the workers
#   --delete           delete the slice after the command succeeded
#   --dry-run          print the commands, run nothing
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
prog="launch/tpu_vm.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "$prog: $*" >&2; exit 2; }

name="" zone="" accelerator="" project="" runtime="" spot=0 reserved=0 mount="" setup="" retries=5
copy=1 delete=0 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="${2:?}"; shift 2 ;;
    --zone) zone="${2:?}"; shift 2 ;;
    --accelerator) accelerator="${2:?}"; shift 2 ;;
    --project) project="${2:?}"; shift 2 ;;
    --runtime) runtime="${2:?}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --reserved) reserved=1; shift ;;
    --mount) mount="${2:?}"; shift 2 ;;
    --setup) setup="${2:?}"; shift 2 ;;
    --retries) retries="${2:?}"; shift 2 ;;
    --no-copy) copy=0; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --; see --help)" ;;
  esac
done
[ -n "$name" ] || die "--name is required"
[ -n "$zone" ] || die "--zone is required"
[ -n "$accelerator" ] || die "--accelerator is required (e.g. v5p-128, v5litepod-16, v6e-8, v4-32)"
[ $# -gt 0 ] || die "expected the command after --, e.g. -- python -m bltjax.train --config ..."
[[ "$retries" =~ ^[0-9]+$ ]] || die "--retries: expected a non-negative integer, got $retries"
if [ -n "$mount" ] && [[ "$mount" != *:* ]]; then die "--mount: expected BUCKET:DIR, got $mount"; fi

runtime_for() {  # the TPU VM image of each generation (Cloud TPU documentation)
  case "$1" in
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "--accelerator $1: no default --runtime known; pass --runtime" ;;
  esac
}
[ -n "$runtime" ] || runtime="$(runtime_for "$accelerator")"

gcloud_scope=(--zone "$zone")
[ -n "$project" ] && gcloud_scope+=(--project "$project")
# Shell quoting for what is printed and for the command sent to the workers: plain words stay
# as they are, anything else is single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() {
  local out="" arg
  for arg in "$@"; do out+="$(quote "$arg") "; done
  printf '%s' "${out% }"
}
quoted_command="$(quote_all "$@")"

# Every command goes through run: printed (shell-quoted) first, executed unless --dry-run.
run() {
  quote_all "$@"
  echo
  [ "$dry_run" = 1 ] || "$@"
}
note() { echo "# $*"; }

remote() {  # runs a shell snippet on every worker
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_scope[@]}" --worker=all --command "$1"
}

slice_state() {
  gcloud compute tpus queued-resources describe "$name" "${gcloud_scope[@]}" --format='value(state.state)' \
    2>/dev/null || echo "ABSENT"
}

create_slice() {
  local capacity=()
  [ "$spot" = 1 ] && capacity+=(--spot)
  [ "$reserved" = 1 ] && capacity+=(--reserved)
  run gcloud compute tpus queued-resources create "$name" "${gcloud_scope[@]}" --node-id "$name" \
    --accelerator-type "$accelerator" --runtime-version "$runtime" ${capacity[@]+"${capacity[@]}"}
}

wait_active() {
  note "wait until 'gcloud compute tpus queued-resources describe $name --zone $zone' reports state ACTIVE"
  [ "$dry_run" = 1 ] && return 0
  local state
  while true; do
    state="$(slice_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|ABSENT) echo "$prog: slice $name is $state" >&2; return 1 ;;
      *) sleep 30 ;;
    esac
  done
}

delete_slice() {
  run gcloud compute tpus queued-resources delete "$name" "${gcloud_scope[@]}" --force --quiet
}

install() {
  if [ "$copy" = 1 ]; then
    local tarball="/tmp/bltjax-code-$name.tar.gz"
    run tar czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
      --exclude=./.pytest_cache .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:bltjax-code.tar.gz" "${gcloud_scope[@]}" --worker=all
    remote 'set -e; mkdir -p ~/bltjax && tar xzf ~/bltjax-code.tar.gz -C ~/bltjax && cd ~/bltjax && { python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user uv; } && bash launch/venv.sh tpu'
  fi
  if [ -n "$setup" ]; then
    remote "set -e; cd ~/bltjax && source .venv/bin/activate && $setup"
  fi
  if [ -n "$mount" ]; then
    local bucket="${mount%%:*}" dir="${mount#*:}"
    remote "set -e; mountpoint -q $dir || { sudo mkdir -p $dir && sudo chown \$(id -u):\$(id -g) $dir && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket $dir; }"
  fi
}

start() {
  remote "set -o pipefail; cd ~/bltjax && source .venv/bin/activate && mkdir -p ~/bltjax-logs && BLTJAX_DISTRIBUTED=auto $quoted_command 2>&1 | tee -a ~/bltjax-logs/$name.log"
}

note "$prog: $accelerator slice '$name' in $zone, runtime $runtime; up to $retries re-creations after pre-emption"
attempt=0
while true; do
  if [ "$dry_run" = 1 ]; then
    note "create the slice unless 'gcloud compute tpus queued-resources describe $name' finds it"
    create_slice
  elif [ "$(slice_state)" = "ABSENT" ]; then
    create_slice
  fi
  if ! wait_active; then
    [ "$attempt" -lt "$retries" ] || { echo "$prog: giving up after $attempt re-creations" >&2; exit 1; }
    attempt=$((attempt + 1)); delete_slice; continue
  fi
  install
  status=0
  start || status=$?
  if [ "$dry_run" = 1 ]; then
    note "exit status 0: done$([ "$delete" = 1 ] && echo ", then:")"
    [ "$delete" = 1 ] && delete_slice
    note "exit status 143 (SIGTERM: checkpoint saved) on an ACTIVE slice: start the command again"
    note "slice no longer ACTIVE (pre-empted): delete it and start again from the top (the workdir resumes)"
    note "either at most $retries times; any other failure stops the launcher with its exit status"
    exit 0
  fi
  if [ "$status" = 0 ]; then
    echo "$prog: the command finished on every worker"
    [ "$delete" = 1 ] && delete_slice
    exit 0
  fi
  state="$(slice_state)"
  if [ "$state" = "ACTIVE" ] && [ "$status" != 143 ]; then
    echo "$prog: the command failed with status $status on a healthy slice: not relaunching" >&2
    exit "$status"
  fi
  [ "$attempt" -lt "$retries" ] || { echo "$prog: pre-empted again after $attempt relaunches: giving up" >&2; exit "$status"; }
  attempt=$((attempt + 1))
  if [ "$state" = "ACTIVE" ]; then  # SIGTERM (e.g. a maintenance event) on a slice that survived
    echo "$prog: the command saved and stopped after SIGTERM: relaunching, attempt $attempt of $retries" >&2
  else
    echo "$prog: pre-empted (slice $state, status $status): re-creating the slice, attempt $attempt of $retries" >&2
    delete_slice
  fi
done
