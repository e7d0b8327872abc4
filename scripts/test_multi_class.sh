#!/usr/bin/env bash
# Evaluate a PMAD checkpoint in the multi-class setting (all classes of DATA_PATH), under
# both protocols: `clean` (leak-free, default of run_test.py) and `paper` (the published
# numbers' protocol, which chooses with the test labels).
#
#   bash scripts/test_multi_class.sh
#   PROTOCOLS=paper bash scripts/test_multi_class.sh --save_heatmaps 4
#
# Paths come from environment variables (defaults below; relative paths are taken from
# the repository root; PYTHON names the interpreter, python3 by default); extra
# arguments are passed on to run_test.py (the clean protocol's own flags, such as
# --mask_ratio or --combine, with PROTOCOLS=clean: the paper protocol refuses them).
# MODEL, TOKENIZER (e.g. vit_tokenizer) and TOKENIZER_WEIGHT_PATH are passed only when
# set: by default run_test.py takes the model, image size, layer scale, normalisation and
# tokenizer kind from the checkpoint's training arguments (the paper's for a released file
# without them), and the tokenizer file it records where it is here, else weights/tokenizer.
# Results: OUTPUT_DIR/<protocol>/results.{json,md,csv}.
set -euo pipefail
cd "$(dirname "$0")/.."

SETTING=${SETTING:-multi_class}
if [[ " $* " == *" --from_obj_to_texture "* && "$SETTING" != obj2tex ]]; then
    echo "error: --from_obj_to_texture selects objects -> textures, not SETTING=$SETTING:" \
         "run bash scripts/test_cross_class.sh --from_obj_to_texture (its checkpoint and" \
         "output folder)" >&2  # the original's switch: another setting, its own defaults
    exit 2
fi
DATA_PATH=${DATA_PATH:-data/mvtec_anomaly_detection}
CKPT=${CKPT:-weights/vit_base_16_checkpoint_962_955.pth}
# the released ProtoFlow file of the setting, as the authors' test code loads them
case "$SETTING" in
    multi_class) released_protoflow=weights/protoflow/weights_multi_class.pt ;;
    obj2tex) released_protoflow=weights/protoflow/weights_texture.pt ;;
    *) released_protoflow= ;;
esac
if [[ -z "${PROTOFLOW_WEIGHTS:-}" && -z "$released_protoflow" ]]; then
    echo "error: SETTING=$SETTING has no released ProtoFlow file (the authors released" \
         "weights_multi_class.pt and weights_texture.pt only; one trained on all classes" \
         "would have seen the unseen ones): train one on the seen classes (\`python" \
         "run_protoflow.py train ... --setting $SETTING\`, README \"ProtoFlow\") and pass" \
         "PROTOFLOW_WEIGHTS=FILE" >&2
    exit 2
fi
PROTOFLOW_WEIGHTS=${PROTOFLOW_WEIGHTS:-$released_protoflow}
PROTOTYPES_DIR=${PROTOTYPES_DIR:-weights/prototypes}
OUTPUT_DIR=${OUTPUT_DIR:-output_dir/test_${SETTING}}
PROTOCOLS=${PROTOCOLS:-clean paper}
given=()
[[ -n "${MODEL:-}" ]] && given+=(--model "$MODEL")
[[ -n "${TOKENIZER:-}" ]] && given+=(--tokenizer_model "$TOKENIZER")
[[ -n "${TOKENIZER_WEIGHT_PATH:-}" ]] && given+=(--tokenizer_weight_path "$TOKENIZER_WEIGHT_PATH")

for protocol in $PROTOCOLS; do
    "${PYTHON:-python3}" run_test.py \
        --setting "$SETTING" \
        --ckpt "$CKPT" \
        --data_path "$DATA_PATH" \
        --protoflow_weights "$PROTOFLOW_WEIGHTS" \
        --prototypes_dir "$PROTOTYPES_DIR" \
        --protocol "$protocol" \
        --output_dir "$OUTPUT_DIR/$protocol" \
        ${given[@]+"${given[@]}"} "$@"
done
