#!/usr/bin/env bash
# Run one command against a Ray cluster started on this machine (docs/ray-cluster.md):
# a head without CPUs (the driver: ServerApp and FedMe's pool inference) and one worker node
# with the machine's cores (the client actors), in a private temp dir, stopped afterwards.
#
#   bash benchmarks/ray_loopback.sh .venv/bin/python benchmarks/round_time.py --shapes 28 \
#       --clients 1000 --pools 500 --rounds 4 --fraction-train 0.1 --methods fedme
#
# The command runs with RAY_ADDRESS set, so Flower's Ray backend joins the cluster.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
RAY=.venv/bin/ray
CPUS=${WORKER_CPUS:-$(nproc)}
T=$(mktemp -d /tmp/fedapps-ray-XXXX)
PORT=$(.venv/bin/python -c 'from fedapps.launch import free_port; print(free_port())')
setsid $RAY start --head --port "$PORT" --num-cpus 0 --temp-dir "$T" --include-dashboard false \
  --disable-usage-stats --block > "$T/head.log" 2>&1 & HEAD=$!
# --block: each `ray start` keeps its node's processes in its process group, killed at the end;
# waiting for them keeps a chained next run from overlapping the shutdown
trap 'kill -TERM -- -$HEAD ${WORKER:+-$WORKER} 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 60); do $RAY status --address "127.0.0.1:$PORT" > /dev/null 2>&1 && break; sleep 1; done
# the clients (Ray workers) at the priority of everything else, not Ray's default niceness 15
RAY_worker_niceness=0 setsid $RAY start --address "127.0.0.1:$PORT" --num-cpus "$CPUS" --temp-dir "$T" \
  --disable-usage-stats --block > "$T/worker.log" 2>&1 & WORKER=$!
joined=""
for _ in $(seq 60); do
  if $RAY status --address "127.0.0.1:$PORT" 2>/dev/null | grep -q "0.0/$CPUS.0 CPU"; then
    joined=yes; break
  fi
  sleep 1
done
[ -n "$joined" ] || { echo "error: the worker node did not join within 60 s; see $T/*.log" >&2; exit 1; }
$RAY status --address "127.0.0.1:$PORT" | grep -E "node_|CPU" || true
echo "ray cluster 127.0.0.1:$PORT (logs in $T); running: $*"
RAY_ADDRESS="127.0.0.1:$PORT" "$@"
