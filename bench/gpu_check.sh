#!/usr/bin/env bash
# Proves PMAD's GPU path in one prepared run of at most 8 minutes on one GPU: one line
# per check (PASS/FAIL with its figures), exit status 1 if any check fails.
#
#   bash bench/gpu_check.sh                      # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --peak_tflops 989    # a GPU missing from the peak table
#   bash bench/gpu_check.sh --dry-run            # CPU parts only (CI): tiny sizes,
#                                                # command lines built but not run
#
# Checks (bench/gpu_check.py): ViT-B bf16 training at batch 32 and 128 (img/s, MFU);
# fp16 with the loss scaler; no host sync in a step (sync debug mode 'error'); fused
# attention gradients against the math backend; DALL-E tokens on the GPU against the
# CPU; --cache_images' batches on the GPU against the DataLoader's; run_test.py on the
# GPU against the CPU; 2 ranks of torchrun (NCCL with 2 GPUs, else gloo). Each check
# runs in its own process under its own time limit, so one hang or crash cannot take the
# others (or the 8 minutes) with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then
        exec "$PY" bench/gpu_check.py all "$@"   # one process: every check's CPU part
    fi
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0
# seconds per check; 440 in all, and each check is killed at most 5 s after its limit:
# 480 s, 8 minutes, at worst
for spec in train_bf16:90 fp16_scaler:40 sync_free:40 attention_grads:30 \
            dalle_tokens:40 image_cache:20 run_test:115 torchrun:65; do
    check=${spec%%:*}
    limit=${spec##*:}
    line=$(timeout --kill-after=5 "$limit" "$PY" bench/gpu_check.py "$check" \
           --workdir "$WORK" "$@" 2>"$WORK/$check.err")
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "$line"
    else
        # its own FAIL line says why; anything else (a PASS printed before a crash or
        # the time limit) is no pass
        case $line in
            # no GPU: every other check would say the same; one line, then stop
            "FAIL no CUDA device"*) echo "$line"; exit 1 ;;
            FAIL*) echo "$line" ;;
            *) echo "FAIL $check: exit $rc$([ $rc -eq 124 ] && echo " (over its ${limit} s)")$(
                   [ -n "$line" ] && echo " after: $line"): $(tail -n 2 "$WORK/$check.err" |
                   tr '\n' ' ')" ;;
        esac
        status=1
    fi
done
exit $status
