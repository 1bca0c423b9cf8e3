#!/usr/bin/env bash
# Runs magicpose_jax training on every host of a Cloud TPU VM slice (v5e-8, v5p-64, ...).
# Every worker gets the same checkout and runs the same command; jax.distributed.initialize() (the CLI's
# --multihost) finds the other hosts through the TPU metadata. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [options] [-- EXTRA_TRAIN_FLAGS...]

Commands (each runs on every worker of the TPU VM with `gcloud compute tpus tpu-vm ssh --worker=all`):
  sync     copy this checkout (without .venv, .git, outputs) to ~/REMOTE_DIR on every worker
  setup    create REMOTE_DIR/.venv: requirements.txt, then jax[tpu]==JAX_VERSION, then the package (-e)
  train    start `python -m magicpose_jax.train --multihost --config CONFIG --workdir WORKDIR EXTRA...`
           detached (nohup, log in REMOTE_DIR/train.log, pid in REMOTE_DIR/train.pid); --foreground streams it
  up       sync + setup + train
  stop     SIGTERM the trainers: they finish the step, save a checkpoint and exit 0 (rerun `train` to resume)
  logs     follow REMOTE_DIR/train.log of worker 0 (--worker N for another)
  exec     run the shell command after `--` (quote it as one string) on every worker, e.g.
           -- 'gcloud storage rsync -r gs://BUCKET/tiktok ~/data/tiktok'  (data on each worker's local disk)

Options (environment variable in brackets):
  --tpu NAME          TPU VM name [TPU_NAME] (required)
  --zone ZONE         zone, e.g. us-west4-a [ZONE] (required)
  --project ID        GCP project [PROJECT] (default: gcloud's configured project)
  --config PATH       training config, relative to the repo [CONFIG] (default configs/stage1.py)
  --workdir DIR       run directory, the same path on every worker: a shared mount (Filestore NFS, or gcsfuse
                      with --implicit-dirs --rename-dir-limit=1000000), not gs:// [WORKDIR] (required by train)
  --remote-dir DIR    checkout location on the workers, relative to $HOME [REMOTE_DIR] (default magicpose_jax)
  --python EXE        Python >= 3.11 on the workers [PYTHON] (default python3.11; setup apt-installs it if missing)
  --jax-version V     [JAX_VERSION] (default 0.10.2, the version requirements.txt pins)
  --worker N          worker for `logs` (default 0)
  --foreground        `train` streams the output instead of detaching (Ctrl-C then kills the run unsaved)
  --dry-run           print the gcloud commands instead of running them
  -h, --help          this text

Everything after `--` goes to the trainer (train, up) or is the command (exec), e.g.
  launch/tpu_pod.sh up --tpu my-v5e --zone us-west4-a --workdir /mnt/runs/stage1 -- \
      --config.base.path=/mnt/models/stable-diffusion-v1-5 --config.data.path=/mnt/data/tiktok

Spot / preemptible TPUs: the trainer saves on SIGTERM (also sent by `stop`), and rerunning `train` with the same
--workdir resumes from the newest checkpoint. A preempted spot TPU VM is gone with its local disk: recreate it,
then `up` again; only what is on the shared --workdir survives, at most checkpoint_every steps are lost.
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

COMMAND="${1:-}"
case "$COMMAND" in
  -h|--help) usage; exit 0 ;;
  sync|setup|train|up|stop|logs|exec) shift ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$COMMAND' (expected sync, setup, train, up, stop, logs or exec; see --help)" ;;
esac

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/stage1.py}"
WORKDIR="${WORKDIR:-}"
REMOTE_DIR="${REMOTE_DIR:-magicpose_jax}"
PYTHON="${PYTHON:-python3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
WORKER=0
FOREGROUND=0
DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU_NAME="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --remote-dir) REMOTE_DIR="${2:?--remote-dir needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
    --jax-version) JAX_VERSION="${2:?--jax-version needs a value}"; shift 2 ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (trainer flags go after '--'; see --help)" ;;
  esac
done

[[ -n "$TPU_NAME" ]] || die "--tpu (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
if [[ "$COMMAND" == train || "$COMMAND" == up ]]; then
  [[ -n "$WORKDIR" ]] || die "--workdir (or WORKDIR) is required: a directory every worker sees at the same path"
  [[ "$WORKDIR" != gs://* ]] || die "--workdir $WORKDIR: the trainer writes POSIX paths; mount the bucket (gcsfuse) \
or use Filestore and pass the mount path"
fi
[[ "$COMMAND" != exec || ${#EXTRA[@]} -gt 0 ]] || die "exec needs a command after '--'"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_FLAGS+=(--project="$PROJECT")

run() {  # prints the command in --dry-run mode, runs it otherwise
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKERS SHELL_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

quote() { local out=""; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

do_sync() {
  local archive
  archive="${TMPDIR:-/tmp}/magicpose_jax_src.$$.tar.gz"
  run tar -czf "$archive" -C "$REPO" --exclude=.venv --exclude=.git --exclude=outputs --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:magicpose_jax_src.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  on_workers all "mkdir -p $(quote "$REMOTE_DIR") && tar -xzf magicpose_jax_src.tar.gz -C $(quote "$REMOTE_DIR") \
&& rm magicpose_jax_src.tar.gz"
  [[ "$DRY_RUN" == 1 ]] || rm -f "$archive"
}

do_setup() {
  local py
  py="$(quote "$PYTHON")"
  on_workers all "set -e; cd $(quote "$REMOTE_DIR")
command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; }
$py -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q -U $(quote "jax[tpu]==$JAX_VERSION")
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

do_train() {
  local cmd
  cmd=".venv/bin/python -m magicpose_jax.train --multihost $(quote --config "$CONFIG" --workdir "$WORKDIR" \
${EXTRA[@]+"${EXTRA[@]}"})"
  if [[ "$FOREGROUND" == 1 ]]; then
    on_workers all "cd $(quote "$REMOTE_DIR") && exec $cmd"
  else
    # setsid + nohup: the trainers outlive the ssh session; `stop` signals the recorded pids.
    # (not a `cd && ... &` list: that would background a subshell and record its pid instead of python's).
    on_workers all "cd $(quote "$REMOTE_DIR") || exit 1; setsid nohup $cmd > train.log 2>&1 < /dev/null &
echo \$! > train.pid; echo \"\$(hostname): started pid \$(cat train.pid), log ~/$(quote "$REMOTE_DIR")/train.log\""
  fi
}

case "$COMMAND" in
  sync) do_sync ;;
  setup) do_setup ;;
  train) do_train ;;
  up) do_sync; do_setup; do_train ;;
  stop) on_workers all "cd $(quote "$REMOTE_DIR") && [ -f train.pid ] && kill -TERM \$(cat train.pid) \
&& echo \"\$(hostname): sent SIGTERM to \$(cat train.pid)\" || echo \"\$(hostname): no train.pid\"" ;;
  logs) on_workers "$WORKER" "tail -n 100 -F $(quote "$REMOTE_DIR")/train.log" ;;
  exec) on_workers all "${EXTRA[*]}" ;;  # one string, run by the workers' shell
esac
