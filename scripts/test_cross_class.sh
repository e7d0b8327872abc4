#!/usr/bin/env bash
# Evaluate a cross-class PMAD checkpoint on the classes it never saw, both protocols:
#
#   bash scripts/test_cross_class.sh                          # textures -> objects
#   FROM_OBJ_TO_TEXTURE=1 bash scripts/test_cross_class.sh    # objects -> textures
#   bash scripts/test_cross_class.sh --from_obj_to_texture    # the same (original switch)
#
# CKPT defaults to the released checkpoint of the chosen direction; everything else as in
# scripts/test_multi_class.sh.
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
for arg in "$@"; do  # run_test.py takes it too, as the same --setting obj2tex
    [[ "$arg" == "--from_obj_to_texture" ]] && obj2tex=1
done
if (( obj2tex )); then
    export SETTING=obj2tex; default_ckpt=weights/checkpoint_976_931.pth
else
    export SETTING=tex2obj; default_ckpt=weights/checkpoint_844_894.pth
fi
export CKPT=${CKPT:-$default_ckpt}
exec bash "$(dirname "$0")/test_multi_class.sh" "$@"
