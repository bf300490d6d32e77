#!/usr/bin/env bash
# Runs an ares_jax stage on every worker of a Cloud TPU VM slice: one process per host, all
# started at once by `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [-- MAIN_ARGS...]
#
# Example, a v5p-64 slice (8 hosts x 4 chips), run from the repository root:
#   launch/tpu_pod.sh --project=my-project ares-v5p-64 us-east5-a \
#     configs/aepo.py:preset=paper_7b,topology=v5p-64 gs://my-bucket/runs/aepo_7b \
#     -- --config.model.path=/home/me/Qwen2.5-VL-7B-AdaCS --config.data.train_files=...
#
# What it does (every command is printed first; --dry-run prints them and runs nothing):
#   1. packs this checkout (tracked and untracked files that git does not ignore) and copies it
#      to every worker (`tpu-vm scp --worker=all`), where it is unpacked into REPO_DIR;
#   2. on every worker: creates REPO_DIR/.venv with PYTHON and installs jax[tpu] and
#      requirements.txt into it;
#   3. on every worker: runs `python -m ares_jax.main --config=CONFIG --workdir=WORKDIR ...` with
#      ARES_DISTRIBUTED=1, so that each process calls jax.distributed.initialize() and JAX reads
#      the slice's layout from the TPU metadata server (ares_jax/parallel/distributed.py).
# It creates, deletes and changes no TPU or bucket.
#
# WORKDIR must be the same directory on every worker (checkpoints are written by all hosts,
# metrics and the export by host 0): a path on a shared file system, or gs://BUCKET/PATH, which
# each worker mounts with gcsfuse (it must be installed on the workers' image) at
# ~/gcs/BUCKET and passes as ~/gcs/BUCKET/PATH.
#
# Options:
#   --project=PROJECT  gcloud project (default: gcloud's configured project)
#   --repo-dir=DIR     the repository on the workers, relative to the home directory or absolute
#                      (default: ares_jax)
#   --no-sync          the repository is already at REPO_DIR on every worker; copy nothing
#   --no-install       install nothing (REPO_DIR/.venv, or PYTHON, already has the packages)
#   --python=PYTHON    Python 3.11 or newer on the workers, for the virtualenv (default: python3)
#   --dry-run          print the commands and run nothing
#   -h, --help         this text

set -euo pipefail

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# One word for a shell command line: as it is if it needs no quotes, else in single quotes.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (a line a shell can run as it is), then runs it unless this is a dry run.
run() {
  local word line="+"
  for word in "$@"; do
    line+=" $(q "$word")"
  done
  echo "$line"
  if [[ "$dry_run" == 0 ]]; then
    "$@"
  fi
}

# The command line each worker runs (one string, for `gcloud ... ssh --command`).
remote_command() {
  local q_repo q_config q_workdir q_python q_archive args="" arg
  q_repo=$(q "$repo_dir")
  q_config=$(q "$config")
  q_python=$(q "$python")
  q_archive=$(q "$remote_archive")
  for arg in "${main_args[@]+"${main_args[@]}"}"; do
    args+=" $(q "$arg")"
  done
  local cmd="set -euo pipefail"
  if [[ "$sync" == 1 ]]; then
    cmd+="; mkdir -p $q_repo && tar -xzf $q_archive -C $q_repo && rm -f $q_archive"
  fi
  cmd+="; cd $q_repo"
  if [[ "$install" == 1 ]]; then
    cmd+="; $q_python -m venv .venv && .venv/bin/pip install -q --upgrade pip"
    cmd+=" && .venv/bin/pip install -q 'jax[tpu]>=0.10,<0.13' -r requirements.txt"
  fi
  cmd+="; py=.venv/bin/python; [ -x \"\$py\" ] || py=$q_python"
  if [[ "$workdir" == gs://* ]]; then
    local path=${workdir#gs://} bucket
    bucket=${path%%/*}
    if [[ "$path" == */* ]]; then path=${path#*/}; else path=""; fi
    local q_bucket q_mount q_path
    q_bucket=$(q "$bucket")
    q_mount="\$HOME/gcs/$q_bucket"
    q_path=$(q "$path")
    cmd+="; command -v gcsfuse >/dev/null || { echo \"error: gcsfuse is not installed on \$(hostname); install it or pass a shared path as WORKDIR.\" >&2; exit 2; }"
    cmd+="; mkdir -p $q_mount; mountpoint -q $q_mount || gcsfuse --implicit-dirs $q_bucket $q_mount"
    q_workdir="$q_mount/$q_path"
  else
    q_workdir=$(q "$workdir")
  fi
  cmd+="; ARES_DISTRIBUTED=1 exec \"\$py\" -m ares_jax.main --config=$q_config --workdir=$q_workdir$args"
  printf '%s' "$cmd"
}

main() {
  dry_run=0 sync=1 install=1 python=python3 repo_dir=ares_jax
  local project="" positional=()
  main_args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) dry_run=1 ;;
      --no-sync) sync=0 ;;
      --no-install) install=0 ;;
      --project=*) project=${1#*=} ;;
      --repo-dir=*) repo_dir=${1#*=} ;;
      --python=*) python=${1#*=} ;;
      -h | --help) usage; exit 0 ;;
      --) shift; main_args=("$@"); break ;;
      -*) die "unknown option $1; see --help." ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  [[ ${#positional[@]} -eq 4 ]] ||
    die "expected TPU_NAME ZONE CONFIG WORKDIR, got ${#positional[@]} argument(s); see --help."
  local name=${positional[0]} zone=${positional[1]}
  config=${positional[2]} workdir=${positional[3]}
  [[ "$config" == *.py* ]] || die "CONFIG must be a config file, e.g. configs/aepo.py:smoke; got '$config'."
  [[ -n "$repo_dir" ]] || die "--repo-dir must not be empty."

  local scope=(--zone="$zone")
  if [[ -n "$project" ]]; then scope+=(--project="$project"); fi
  remote_archive="/tmp/ares_jax-$name.tgz"

  if [[ "$sync" == 1 ]]; then
    local root
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) ||
      die "--no-sync is needed when this script is not in a git checkout."
    archive=$(mktemp "${TMPDIR:-/tmp}/ares_jax.XXXXXX.tgz")
    trap 'rm -f "$archive"' EXIT
    echo "# pack $root (files git tracks or does not ignore) into $archive"
    if [[ "$dry_run" == 0 ]]; then
      (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        tar --null -czf "$archive" -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$name:$remote_archive" \
      "${scope[@]}" --worker=all
  fi
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
    --command="$(remote_command)"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
