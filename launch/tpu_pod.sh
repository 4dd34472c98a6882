#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4-32, v5e-64, ...): sync the code, install, run.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --project PROJECT [options] -- TRAIN_ARGS...
#   e.g. launch/tpu_pod.sh --tpu cg3d-v4-32 --zone us-central2-b --project my-proj -- \
#          --config pretrain_pointbert --workdir gs://my-bucket/cg3d/pointbert \
#          --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#
# Steps (each a gcloud command; --dry-run prints them instead of running them):
#   1. only with --create: create the TPU VM (--accelerator-type, --version, --spot);
#   2. copy the repository's files (git ls-files of this checkout, uncommitted edits included) to every worker;
#   3. install requirements.txt with jax[tpu] instead of the CPU jax (and without torch, which training never uses);
#   4. run `python3 -m cg3d_jax.train TRAIN_ARGS` on all workers at once (--worker=all). JAX finds the pod itself.
#      Without TRAIN_ARGS the script stops after step 3 (e.g. to create and prepare a slice).
# Rerunning the same command after a preemption resumes from the newest checkpoint in --workdir.
# Options: --skip-sync, --skip-install, --remote-dir DIR (default cg3d_jax, under each worker's home).
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

tpu= zone= project= dry_run=0 create=0 sync=1 install=1 spot=0
accelerator=v4-32 version=tpu-ubuntu2204-base remote_dir=cg3d_jax
while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --create) create=1; shift ;;
    --accelerator-type) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-sync) sync=0; shift ;;
    --skip-install) install=0; shift ;;
    --remote-dir) remote_dir=$2; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "error: unknown option '$1' (training arguments go after --)" >&2; usage ;;
  esac
done
for name in tpu zone project; do
  [[ -n ${!name} ]] || { echo "error: --$name is required" >&2; usage; }
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
where=(--zone="$zone" --project="$project")

# Prints a command the way a shell would read it back; runs it unless --dry-run.
run() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
  if ((!dry_run)); then "$@"; fi
}

quoted_train_args=$(printf '%q ' "$@")

if ((create)); then
  extra=()
  ((spot)) && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type="$accelerator" \
    --version="$version" "${extra[@]}"
fi

if ((sync)); then
  archive=${TMPDIR:-/tmp}/cg3d_jax_code.tar.gz
  # The files git knows about (tracked, or new and not ignored): code and configs, never data or workdirs.
  run bash -c "cd '$repo_root' && git ls-files -z --cached --others --exclude-standard | \
xargs -0 tar -czf '$archive'"
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:cg3d_jax_code.tar.gz" --worker=all "${where[@]}"
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" \
    --command="rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir && tar -xzf ~/cg3d_jax_code.tar.gz -C ~/$remote_dir"
fi

if ((install)); then
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" \
    --command="cd ~/$remote_dir && grep -v -E '^(jax|torch)([^a-z_-]|$)' requirements.txt > /tmp/cg3d_requirements_tpu.txt \
&& python3 -m pip install -q -U 'jax[tpu]>=0.7' -r /tmp/cg3d_requirements_tpu.txt"
fi

if [[ $# -eq 0 ]]; then
  echo "no training arguments after --: the workers are ready, nothing was started" >&2
  exit 0
fi

# Every worker runs the same command; the output of all of them streams back here and into ~/cg3d_train.log.
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" \
  --command="set -o pipefail; cd ~/$remote_dir && python3 -m cg3d_jax.train $quoted_train_args 2>&1 | tee -a ~/cg3d_train.log"
