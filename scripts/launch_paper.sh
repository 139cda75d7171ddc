#!/usr/bin/env bash
# Launch one of the paper's runs (configs/paper_*.yaml) on 8, 32 or 128 GPUs, 8 GPUs per node.
#   bash scripts/launch_paper.sh CONFIG GPUS [HYDRA_OVERRIDES...]
#   bash scripts/launch_paper.sh paper_base 8 task.data=/data/gpt2-bin          # one node
#   # 32 or 128 GPUs: run on every node with NODE_RANK=0..N-1 and MASTER_ADDR=<node 0>
#   NODE_RANK=0 MASTER_ADDR=node0 bash scripts/launch_paper.sh paper_base 128 task.data=/data/gpt2-bin
# On SLURM use scripts/slurm_paper.sbatch instead. With --base-experts 0 (the paper's configs),
# E = number of GPUs: paper_base has 128 experts on 128 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch_paper.sh CONFIG GPUS [overrides...]}
GPUS=${2:?usage: launch_paper.sh CONFIG GPUS [overrides...]}
shift 2
PER_NODE=${GPUS_PER_NODE:-8}
NODES=$(( (GPUS + PER_NODE - 1) / PER_NODE ))
if (( NODES * PER_NODE != GPUS )); then
  echo "launch_paper.sh: GPUS=$GPUS is not a multiple of GPUS_PER_NODE=$PER_NODE" >&2
  exit 2
fi
COMMON=(--config-dir configs --config-name "$CONFIG" "distributed_training.distributed_world_size=$GPUS" "$@")
if (( NODES == 1 )); then
  exec fairseq-hydra-train "${COMMON[@]}"  # fairseq spawns one process per GPU (NCCL)
fi
exec torchrun --nnodes "$NODES" --nproc_per_node "$PER_NODE" --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  -m fairseq_cli.hydra_train "${COMMON[@]}"
