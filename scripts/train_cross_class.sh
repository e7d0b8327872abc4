#!/usr/bin/env bash
# Train PMAD's ViT-B/16 in a cross-class setting (docs/method.md 4):
#
#   bash scripts/train_cross_class.sh                          # textures -> objects
#   FROM_OBJ_TO_TEXTURE=1 bash scripts/train_cross_class.sh    # objects -> textures
#   bash scripts/train_cross_class.sh --from_obj_to_texture    # the same (original switch)
#
# textures -> objects trains on carpet, grid, leather, tile, wood; objects -> textures on
# the 10 objects. Everything else (NPROC, NNODES, DATA_PATH, OUTPUT_DIR, TOKENIZER,
# TOKENIZER_WEIGHT_PATH, INIT_CKPT, extra arguments) as in scripts/train_multi_class.sh;
# OUTPUT_DIR defaults to output_dir/obj2tex or output_dir/tex2obj.
set -euo pipefail

obj2tex=0
# lower case by tr, not ${var,,}: macOS ships bash 3.2
direction=$(printf '%s' "${FROM_OBJ_TO_TEXTURE:-0}" | tr '[:upper:]' '[:lower:]')
case "$direction" in
    0|""|false|no|off) ;;
    1|true|yes|on) obj2tex=1 ;;
    *) echo "error: FROM_OBJ_TO_TEXTURE=$FROM_OBJ_TO_TEXTURE: give 1 (objects -> textures) or 0" \
            "(textures -> objects)" >&2; exit 2 ;;
esac
for arg in "$@"; do
    [[ "$arg" == "--from_obj_to_texture" ]] && obj2tex=1
done

if (( obj2tex )); then
    export SETTING=obj2tex
    [[ " $* " == *" --from_obj_to_texture "* ]] || set -- --from_obj_to_texture "$@"
else
    export SETTING=tex2obj
fi
exec bash "$(dirname "$0")/train_multi_class.sh" "$@"
