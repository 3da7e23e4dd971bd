#!/usr/bin/env bash
# Create a Cloud TPU VM (or queued resource), install opdjax on every worker, run the one entry
# point on all workers at once, read the logs, delete it. See launch/README.md.
#
#   export PROJECT=my-project ZONE=us-east5-a TPU_NAME=opd-v5p ACCELERATOR_TYPE=v5p-64
#   launch/gcloud_tpu.sh create [--queued] [--spot]
#   launch/gcloud_tpu.sh install [--repo-url URL [--branch B]]
#   launch/gcloud_tpu.sh run [--detach] --config configs/<name>.py [--config.a.b=value ...]
#   launch/gcloud_tpu.sh stop                  # end the latest run on every worker
#   launch/gcloud_tpu.sh logs [--worker N] [--follow]
#   launch/gcloud_tpu.sh exec 'shell command run in ~ on every worker'
#   launch/gcloud_tpu.sh status | delete [--queued]
#
# Settings: environment variables or flags (flags win), anywhere on the command line:
#   PROJECT / --project, ZONE / --zone, TPU_NAME / --tpu-name,
#   ACCELERATOR_TYPE / --accelerator-type (v5p-32, v6e-8, v5litepod-16, v4-32, ...),
#   RUNTIME_VERSION / --runtime-version (default from the accelerator: v2-alpha-tpuv5 for v5p,
#     v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4),
#   QR_NAME / --qr-name (queued resource id, default "$TPU_NAME-qr"),
#   REMOTE_DIR / --remote-dir (checkout on the workers, relative to ~, default opdjax),
#   RUN_NAME / --run-name (log file name, default run-<date>-<time>).
# --dry-run prints every gcloud command instead of running it (nothing is created or copied).
set -euo pipefail

JAX_VERSION="0.10.2"  # setup.py's pin; its [tpu] extra (jax[tpu]) adds the matching libtpu
LIBTPU_FIND_LINKS="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0
QUEUED=0
SPOT=0
DETACH=0
FOLLOW=0
WORKER=0
REPO_URL=""
BRANCH=""
CMD=""
ARGS=()

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gcloud_tpu.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------- arguments
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --follow|-f) FOLLOW=1 ;;
    --worker=*) WORKER="${1#*=}" ;;
    --worker) shift; WORKER="${1:?--worker needs a number}" ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --tpu-name=*) TPU_NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --qr-name=*) QR_NAME="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    -h|--help|help) usage; exit 0 ;;
    *)
      if [[ -z "$CMD" ]]; then CMD="$1"; else ARGS+=("$1"); fi ;;
  esac
  shift
done
[[ -n "$CMD" ]] || { usage; exit 2; }

REMOTE_DIR="${REMOTE_DIR:-opdjax}"
RUN_NAME="${RUN_NAME:-run-$(date +%Y%m%d-%H%M%S)}"

need() {  # need VAR...: every named setting must be set
  local v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || die "$v is not set (export $v=... or pass --$(echo "$v" | tr 'A-Z_' 'a-z-')=...)"
  done
}

default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

quote() {  # print arguments as a shell would need them typed
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

gc() {  # run (or, with --dry-run, print) one gcloud command
  if ((DRY_RUN)); then echo "gcloud $(quote "$@")"; else gcloud "$@"; fi
}

loc() { echo "--zone=$ZONE" "--project=$PROJECT"; }

ssh_all() {  # ssh_all 'remote command': on every worker at once
  # shellcheck disable=SC2046
  gc compute tpus tpu-vm ssh "$TPU_NAME" $(loc) --worker=all --command="$1"
}

# The worker's index inside the slice (TPU VM metadata), for per-worker log names.
WORKER_ID='W=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

# ----------------------------------------------------------------------------------- commands
cmd_create() {
  need PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
  local runtime="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((QUEUED)); then
    # shellcheck disable=SC2046
    gc alpha compute tpus queued-resources create "${QR_NAME:-$TPU_NAME-qr}" --node-id="$TPU_NAME" $(loc) \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$runtime" "${spot[@]}"
    echo "queued: watch with '$0 status --queued' until the state is ACTIVE" >&2
  else
    # shellcheck disable=SC2046
    gc compute tpus tpu-vm create "$TPU_NAME" $(loc) --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$runtime" "${spot[@]}"
  fi
}

cmd_install() {
  need PROJECT ZONE TPU_NAME
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    local branch=()
    [[ -n "$BRANCH" ]] && branch=(--branch "$BRANCH")
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $(quote "${branch[@]}" "$REPO_URL") $REMOTE_DIR; fi"
  else
    # This checkout (tracked and untracked, not ignored files) as a tarball on every worker.
    local tarball="/tmp/opdjax-src-$$.tar.gz"
    if ((DRY_RUN)); then
      echo "git -C $REPO_ROOT ls-files -co --exclude-standard | tar -czf $tarball -T -"
    else
      (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -)
    fi
    # shellcheck disable=SC2046
    gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME:opdjax-src.tar.gz" $(loc) --worker=all
    ((DRY_RUN)) || rm -f "$tarball"
    fetch="mkdir -p $REMOTE_DIR && tar -xzf opdjax-src.tar.gz -C $REMOTE_DIR"
  fi
  # jax 0.10 and numpy 2.4 need Python >= 3.11; TPU VM images (Ubuntu 22.04) ship 3.10, so uv
  # fetches a 3.11 interpreter there.
  local venv="cd $REMOTE_DIR && if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
python3 -m venv .venv && .venv/bin/pip install -q -U pip && PIP='.venv/bin/pip install'; else \
(command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh) && export PATH=\$HOME/.local/bin:\$PATH && \
uv venv --python 3.11 .venv && PIP='uv pip install --python .venv/bin/python'; fi && \
\$PIP -e '.[tpu]' -f $LIBTPU_FIND_LINKS && \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
  ssh_all "set -e; $fetch && $venv"
}

cmd_run() {
  need PROJECT ZONE TPU_NAME
  ((${#ARGS[@]})) || die "run needs --config configs/<name>.py [--config.a.b=value ...]"
  # Per worker: logs/<run>.worker<W>.log and .pid (the python process, for `stop`).
  local setup="set -o pipefail; cd $REMOTE_DIR && mkdir -p logs && $WORKER_ID && \
LOG=logs/$RUN_NAME.worker\$W.log && PID=logs/$RUN_NAME.worker\$W.pid && \
echo \"worker \$W: \$(hostname) -> ~/$REMOTE_DIR/\$LOG\""
  local launch="echo \$BASHPID > \$PID; exec ${RUN_ENV:+env $RUN_ENV }.venv/bin/python launch/tpu_run.py $(quote "${ARGS[@]}")"
  if ((DETACH)); then
    # Ignoring SIGHUP (inherited through exec) keeps the run alive after ssh disconnects.
    ssh_all "$setup && { (trap '' HUP; $launch) > \$LOG 2>&1 < /dev/null & }"
    echo "detached: '$0 logs --follow' shows worker 0, '$0 stop' ends the run" >&2
  else
    # Every worker writes its own log; worker 0 also streams to this terminal.
    ssh_all "$setup && ($launch) 2>&1 | if [ \"\$W\" = 0 ]; then tee \$LOG; else cat > \$LOG; fi"
  fi
}

cmd_stop() {  # end the latest run's python process on every worker (by the pid it wrote)
  need PROJECT ZONE TPU_NAME
  ssh_all "cd $REMOTE_DIR && $WORKER_ID && P=\$(ls -t logs/*.worker\$W.pid 2>/dev/null | head -n 1) && \
[ -n \"\$P\" ] && kill \$(cat \$P) 2>/dev/null && echo \"worker \$W: stopped \$(cat \$P)\" || true"
}

cmd_logs() {
  need PROJECT ZONE TPU_NAME
  local tail="tail -n 200"
  ((FOLLOW)) && tail="tail -n 200 -f"
  # shellcheck disable=SC2046
  gc compute tpus tpu-vm ssh "$TPU_NAME" $(loc) --worker="$WORKER" \
    --command="$tail \$(ls -t ~/$REMOTE_DIR/logs/*.worker$WORKER.log | head -n 1)"
}

cmd_exec() {
  need PROJECT ZONE TPU_NAME
  ((${#ARGS[@]} == 1)) || die "exec takes one quoted shell command"
  ssh_all "${ARGS[0]}"
}

cmd_status() {
  need PROJECT ZONE TPU_NAME
  # shellcheck disable=SC2046
  if ((QUEUED)); then gc alpha compute tpus queued-resources describe "${QR_NAME:-$TPU_NAME-qr}" $(loc); fi
  # shellcheck disable=SC2046
  gc compute tpus tpu-vm describe "$TPU_NAME" $(loc)
}

cmd_delete() {
  need PROJECT ZONE TPU_NAME
  if ((QUEUED)); then
    # --force also deletes the TPU VM the queued resource made.
    # shellcheck disable=SC2046
    gc alpha compute tpus queued-resources delete "${QR_NAME:-$TPU_NAME-qr}" $(loc) --force --quiet
  else
    # shellcheck disable=SC2046
    gc compute tpus tpu-vm delete "$TPU_NAME" $(loc) --quiet
  fi
}

case "$CMD" in
  create|install|run|stop|logs|exec|status|delete) "cmd_$CMD" ;;
  *) usage >&2; die "unknown command '$CMD'" ;;
esac
