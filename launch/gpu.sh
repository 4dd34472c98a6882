#!/usr/bin/env bash
# Train on GPUs: one node with all its GPUs, or several nodes of a SLURM allocation.
#
#   launch/gpu.sh [--dry-run] -- TRAIN_ARGS...                          one process, every visible GPU
#   launch/gpu.sh --slurm [--per-gpu] [--dry-run] -- TRAIN_ARGS...      inside an sbatch/salloc allocation
#
# Single node: one JAX process drives all GPUs it can see (CUDA_VISIBLE_DEVICES picks them).
# SLURM: `srun` starts one process per node (default; each drives all GPUs of its node) or, with --per-gpu, one per
# GPU (--gpus-per-task=1, so each process sees exactly its own GPU). The coordinator is the allocation's first node
# (port CG3D_PORT, default derived from the job id); CG3D_NUM_PROCESSES is the task count and CG3D_PROCESS_ID each
# task's SLURM_PROCID (see cg3d_jax/distributed.py). Requirements: `pip install "jax[cuda13]" -r requirements.txt` (cuda12 for drivers older than 580).
# Rerunning the same command after a failure or preemption resumes from the newest checkpoint in --workdir.
#
#   sbatch --nodes=4 --gpus-per-node=8 --wrap "launch/gpu.sh --slurm -- --config pretrain_pointbert \
#       --workdir /shared/runs/pointbert --config.data.data_dir=/shared/tensorflow_datasets"
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

slurm=0 per_gpu=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --slurm) slurm=1; shift ;;
    --per-gpu) per_gpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "error: unknown option '$1' (training arguments go after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "error: no training arguments after -- (at least --config and --workdir)" >&2; usage; }
((per_gpu && !slurm)) && { echo "error: --per-gpu needs --slurm" >&2; usage; }

python=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run() {
  echo "$(printf '%q ' "$@")"
  if ((!dry_run)); then exec "$@"; fi
}

if ((!slurm)); then
  run "$python" -m cg3d_jax.train "$@"
  exit 0
fi

[[ -n ${SLURM_JOB_ID:-} ]] || { echo "error: --slurm must run inside a SLURM allocation (sbatch or salloc)" >&2; exit 2; }
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
port=${CG3D_PORT:-$((SLURM_JOB_ID % 4096 + 61440))}
if ((per_gpu)); then
  gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  gpus_per_node=${gpus_per_node##*:}  # "a100:8" -> "8"
  [[ $gpus_per_node =~ ^[0-9]+$ ]] || { echo "error: cannot tell the GPUs per node; allocate with --gpus-per-node=N" >&2; exit 2; }
  tasks=(--ntasks=$((nodes * gpus_per_node)) --ntasks-per-node="$gpus_per_node" --gpus-per-task=1)
  num_processes=$((nodes * gpus_per_node))
else
  tasks=(--ntasks="$nodes" --ntasks-per-node=1)
  num_processes=$nodes
fi
export CG3D_COORDINATOR=$first_node:$port CG3D_NUM_PROCESSES=$num_processes
# SLURM_PROCID differs per task, so it is read inside each task.
run srun "${tasks[@]}" --kill-on-bad-exit=1 bash -c \
  'CG3D_PROCESS_ID=$SLURM_PROCID exec "$0" -m cg3d_jax.train "$@"' "$python" "$@"
