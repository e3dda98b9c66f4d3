#!/usr/bin/env bash
# Runs one bltjax command on every host of TPU slices of a GKE cluster, through xpk.
#
#   bash launch/xpk.sh --cluster C --workload NAME --tpu-type v5p-128 [options] [--dry-run] -- \
#       python -m bltjax.train --config experiments/blt_1b.py --workdir /mnt/bltjax/runs/1b ...
#
# xpk builds a container from this checkout (--script-dir .) on top of --base-docker-image, or
# uses a ready --docker-image, and starts a JobSet with one pod per TPU host. Each pod installs
# bltjax with launch/venv.sh tpu (a Python >= 3.11 venv with the tpu extra, through constraints.txt;
# skipped with --docker-image: the image must already hold them, and its python3 must be >= 3.11,
# which the pod checks first) and runs the command with BLTJAX_DISTRIBUTED=auto: jax joins the pods
# from the TPU_WORKER_* variables GKE sets. With --num-slices N > 1, xpk joins the slices over DCN
# (its MEGASCALE_* variables) and a bltjax.train or bltjax.compile command gets
# --config.mesh.num_slices=N appended (unless it sets it), so the mesh spans the slices on its DCN
# axis (bltjax/training/sharding.py). --max-restarts makes the JobSet restart every pod after a failure or a pre-emption; the
# workdir then resumes from its last checkpoint, so it must be on storage every pod sees and that
# outlives them (a GCS FUSE or Filestore volume attached to the cluster).
#
# Options:
#   --project P --zone Z       gcloud project and zone of the cluster (default: gcloud's)
#   --num-slices N             slices (multi-slice over DCN; default 1)
#   --base-docker-image IMG    image to build on (default python:3.11)
#   --docker-image IMG         run this image as it is (no build, no install)
#   --max-restarts N           JobSet restarts after failure or pre-emption (default 5)
#   --priority P               xpk workload priority (e.g. low, medium, high)
#   --follow                   stream the pods' logs after creating the workload (kubectl)
#   --dry-run                  print the commands, run nothing
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
prog="launch/xpk.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "$prog: $*" >&2; exit 2; }

cluster="" workload="" tpu_type="" project="" zone="" num_slices=1 base_image="python:3.11" image="" restarts=5
priority="" follow=0 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster="${2:?}"; shift 2 ;;
    --workload) workload="${2:?}"; shift 2 ;;
    --tpu-type) tpu_type="${2:?}"; shift 2 ;;
    --project) project="${2:?}"; shift 2 ;;
    --zone) zone="${2:?}"; shift 2 ;;
    --num-slices) num_slices="${2:?}"; shift 2 ;;
    --base-docker-image) base_image="${2:?}"; shift 2 ;;
    --docker-image) image="${2:?}"; shift 2 ;;
    --max-restarts) restarts="${2:?}"; shift 2 ;;
    --priority) priority="${2:?}"; shift 2 ;;
    --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --; see --help)" ;;
  esac
done
[ -n "$cluster" ] || die "--cluster is required"
[ -n "$workload" ] || die "--workload is required"
[ -n "$tpu_type" ] || die "--tpu-type is required (e.g. v5p-128, v5litepod-256, v6e-256)"
[ $# -gt 0 ] || die "expected the command after --, e.g. -- python -m bltjax.train --config ..."
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices: expected a positive integer, got $num_slices"
[[ "$restarts" =~ ^[0-9]+$ ]] || die "--max-restarts: expected a non-negative integer, got $restarts"

quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() {
  local out="" arg
  for arg in "$@"; do out+="$(quote "$arg") "; done
  printf '%s' "${out% }"
}
run() {
  quote_all "$@"
  echo
  [ "$dry_run" = 1 ] || "$@"
}

scope=()
[ -n "$project" ] && scope+=(--project "$project")
[ -n "$zone" ] && scope+=(--zone "$zone")
# The venv lives outside the copied checkout (--script-dir . may carry this machine's own .venv).
install='export BLTJAX_VENV=/opt/bltjax-venv && bash launch/venv.sh tpu && export PATH="$BLTJAX_VENV/bin:$PATH" && '
image_args=(--base-docker-image "$base_image" --script-dir .)
if [ -n "$image" ]; then
  install='python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "launch/xpk.sh: the image'"'"'s python3 is older than 3.11, which bltjax needs" >&2; exit 2; } && '
  image_args=(--docker-image "$image")
fi
command=("$@")
if [ "$num_slices" -gt 1 ] && [[ " $* " =~ " bltjax."(train|compile)" " ]] && [[ " $* " != *" --config.mesh.num_slices"* ]]; then
  command+=("--config.mesh.num_slices=$num_slices")  # the mesh's DCN axis spans the slices
fi
extra=()
[ -n "$priority" ] && extra+=(--priority "$priority")
pod_command="set -e; ${install}BLTJAX_DISTRIBUTED=auto $(quote_all "${command[@]}")"

echo "# $prog: workload '$workload' on cluster '$cluster': $num_slices x $tpu_type, up to $restarts restarts"
run xpk workload create --cluster "$cluster" --workload "$workload" --tpu-type "$tpu_type" \
  --num-slices "$num_slices" "${image_args[@]}" --max-restarts "$restarts" ${extra[@]+"${extra[@]}"} \
  ${scope[@]+"${scope[@]}"} --command "$pod_command"
if [ "$follow" = 1 ]; then
  run kubectl logs --follow --prefix --max-log-requests=1000 --selector "jobset.sigs.k8s.io/jobset-name=$workload"
else
  echo "# follow it: xpk workload list --cluster $cluster --filter-by-job $workload  (or rerun with --follow)"
fi
