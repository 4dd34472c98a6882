#!/usr/bin/env bash
# A simulated pod on one machine: N processes on localhost form one JAX cluster (CPU devices, gloo collectives).
#
#   launch/local_multihost.sh N DEVICES_PER_PROCESS -- ARGS...
#   e.g. launch/local_multihost.sh 2 4 -- --config demo --workdir /tmp/cg3d_pod
#
# Runs `python -m cg3d_jax.train ARGS` N times with CG3D_COORDINATOR / CG3D_NUM_PROCESSES / CG3D_PROCESS_ID set
# (see cg3d_jax/distributed.py) and DEVICES_PER_PROCESS simulated CPU devices each. Every process logs to
# $LOG_DIR/process_<i>.log. If one process fails, the others are stopped; the exit status is the first failure's
# (0 when all succeed).
#
# Environment: CG3D_LOG_DIR (default: a new temporary folder), CG3D_PORT (default: a free port),
#   CG3D_MODULE (default cg3d_jax.train), PYTHON (default python3), CG3D_HEARTBEAT_TIMEOUT_S (passed on).
set -uo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- ARGS..." >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
num_processes=$1
devices=$2
shift 2
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2; usage; }
[[ $devices =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICES_PER_PROCESS must be a positive integer, got '$devices'" >&2; usage; }
if [[ $# -gt 0 ]]; then
  [[ $1 == -- ]] || { echo "error: expected -- before the training arguments, got '$1'" >&2; usage; }
  shift
fi

python=${PYTHON:-python3}
module=${CG3D_MODULE:-cg3d_jax.train}
log_dir=${CG3D_LOG_DIR:-$(mktemp -d -t cg3d_multihost.XXXXXX)}
mkdir -p "$log_dir"
# Bind to port 0 to get a free one; another program could take it before process 0 does (rare; then rerun).
port=${CG3D_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

pids=()
stop_all() {
  local pid waited
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for ((waited = 0; waited < 10; waited++)); do
    kill -0 "${pids[@]}" 2>/dev/null || break  # true while any of them still runs
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'echo "interrupted: stopping all processes" >&2; stop_all; exit 130' INT TERM

echo "starting $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  (
    cd "$repo_root" || exit 1
    export CG3D_COORDINATOR=127.0.0.1:$port CG3D_NUM_PROCESSES=$num_processes CG3D_PROCESS_ID=$i
    export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    # Replace any device count already in XLA_FLAGS (XLA would take one of them, not necessarily ours).
    flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
    export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devices"
    exec "$python" -m "$module" "$@"
  ) >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
  echo "$!" >"$log_dir/process_$i.pid"
done

# Wait for the processes one by one as they end; the first failure stops the rest.
declare -A live  # pid -> process index
for i in "${!pids[@]}"; do live[${pids[$i]}]=$i; done
status=0
while ((${#live[@]} > 0)); do
  ended=
  wait -n -p ended "${!live[@]}"
  rc=$?
  [[ -n ${ended:-} ]] || break  # nothing left to wait for
  i=${live[$ended]}
  unset "live[$ended]"
  echo "process $i exited with status $rc" >&2
  if ((rc != 0)); then
    status=$rc
    echo "last lines of $log_dir/process_$i.log:" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
    echo "stopping the other processes" >&2
    stop_all
    wait 2>/dev/null
    break
  fi
done
if ((status == 0)); then
  echo "all $num_processes processes finished; logs in $log_dir" >&2
fi
exit "$status"
