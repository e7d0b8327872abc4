#!/usr/bin/env bash
# Train PMAD's ViT-B/16 in the multi-class setting (all classes of DATA_PATH; the 15 of
# MVTec AD), with the paper's hyperparameters (docs/method.md 4).
#
#   bash scripts/train_multi_class.sh                       # 1 GPU
#   NPROC=8 bash scripts/train_multi_class.sh               # 8 GPUs of this machine
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 bash scripts/train_multi_class.sh
#   SETTING=leave_one_out bash scripts/train_multi_class.sh --unseen_classes screw
#
# Paths and the setting come from environment variables (defaults below; relative paths
# are taken from the repository root; PYTHON names the interpreter of a one-process run,
# python3 by default; layer scale: the model's own, 0.1 for ViT-B as the original
# passes, 1e-5 for ViT-L); any argument is passed on to run_pretraining.py after the
# defaults, so it wins (e.g. --epochs 100, --amp fp16, --no_init). Re-running the same
# command resumes from the newest complete checkpoint in OUTPUT_DIR.
# scripts/train_cross_class.sh runs this with SETTING set.
set -euo pipefail
cd "$(dirname "$0")/.."

SETTING=${SETTING:-multi_class}
if [[ " $* " == *" --from_obj_to_texture "* && "$SETTING" != obj2tex ]]; then
    echo "error: --from_obj_to_texture selects objects -> textures, not SETTING=$SETTING:" \
         "run bash scripts/train_cross_class.sh --from_obj_to_texture (its checkpoint and" \
         "output folder)" >&2  # the original's switch: another setting, its own defaults
    exit 2
fi
DATA_PATH=${DATA_PATH:-data/Mvtec-ImageNet}
OUTPUT_DIR=${OUTPUT_DIR:-output_dir/${SETTING}}
LOG_DIR=${LOG_DIR:-log_dir/${SETTING}}
MODEL=${MODEL:-vit_base_patch16_224_8k_vocab}
TOKENIZER=${TOKENIZER:-dall-e}
TOKENIZER_WEIGHT_PATH=${TOKENIZER_WEIGHT_PATH:-weights/tokenizer}
INIT_CKPT=${INIT_CKPT:-weights/beit_base_patch16_224_pt22k.pth}
BATCH_SIZE=${BATCH_SIZE:-4}
NPROC=${NPROC:-1}
NNODES=${NNODES:-1}

if (( NNODES > 1 )); then
    DIST=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK on each machine}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
          --master_port "${MASTER_PORT:-29500}")
else
    DIST=(--standalone)
fi

ARGS=(run_pretraining.py
    --setting "$SETTING" \
    --model "$MODEL" \
    --data_path "$DATA_PATH" \
    --output_dir "$OUTPUT_DIR" \
    --log_dir "$LOG_DIR" \
    --tokenizer_model "$TOKENIZER" \
    --tokenizer_weight_path "$TOKENIZER_WEIGHT_PATH" \
    --init_ckpt "$INIT_CKPT" \
    --batch_size "$BATCH_SIZE" \
    --lr 1.5e-3 --min_lr 1e-5 --warmup_epochs 10 --epochs 300 \
    --clip_grad 3.0 --drop_path 0.1 \
    --mask_ratio 0.3 --dynamic_masking_start 100 --save_ckpt_freq 20 \
    --imagenet_default_mean_and_std \
    "$@")

if [[ "$NPROC" == 1 && "$NNODES" == 1 ]]; then  # NPROC may be torchrun's auto or gpu
    # one process needs no launcher: run_pretraining.py's own error line and exit code
    # (2 for a mistake) reach the caller, not torchrun's report of a failed child
    exec "${PYTHON:-python3}" "${ARGS[@]}"
fi
exec torchrun --nproc_per_node "$NPROC" "${DIST[@]}" "${ARGS[@]}"
