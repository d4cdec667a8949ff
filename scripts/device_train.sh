#!/usr/bin/env bash
# Train the spine model on a lent GPU machine (the `device` tool) with the recipe of the README's
# Training section, and bring the checkpoint back.
#
#   bash scripts/device_train.sh prepare [CHECKPOINT]   # here, on the CPU machine
#   bash scripts/device_train.sh run MINUTES            # there, as the device command
#
# The GPU image has PyTorch with CUDA, numpy, scipy, onnx and tqdm but no SimpleITK (and its
# 51 MB wheel does not fit the 64 MiB the device tool carries), so `prepare` resamples the
# training cases (../shared/data/real minus the held-out ones) onto the 2 mm training grid here
# and saves them as .device/volumes/*.volume.npz (`train --save-volumes`); phantoms are drawn
# on that grid directly, without SimpleITK. CHECKPOINT (default: the shipped model.pt; a
# checkpoint of an earlier device run continues it) is copied to .device/start.pt. .device/ is
# git-ignored; the device tool carries it when told:
#   run(command="bash scripts/device_train.sh run 8", carry=[".device"], timeout_s=600)
# The checkpoints (last.pt, best.pt), the training curve and the log come back under $OUT. To go
# on, copy $OUT/run/last.pt to .device/start.pt and run again (`--resume` keeps the optimizer, the
# epoch count and the elapsed minutes: MINUTES is the total budget); to ship it:
#   spinecontextseg export-onnx last.pt -o SpineContextSegLib/resources/models/spine --patch 64 64 64 --overlap 0.25 --threshold 0.5
# A dry run here: PATH=.venv-test/bin:$PATH DEVICE=cpu BATCH=1 ITERATIONS=2 PHANTOMS=1 VALIDATION_PHANTOMS=0 bash scripts/device_train.sh run 0.01
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.device

case "${1:-}" in
  prepare)
    start=${2:-SpineContextSegLib/resources/models/spine/model.pt}
    mkdir -p "$STAGE"
    grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
    rm -rf "$STAGE/volumes"
    spinecontextseg train --data ../shared/data/real --exclude verse_sub-verse014 --exclude ts_example_ct_dicom \
      --spacing 2 --save-volumes "$STAGE/volumes"
    cp "$start" "$STAGE/start.pt"
    du -sh "$STAGE"
    ;;
  run)
    minutes=${2:?minutes of training}
    out=${OUT:-runs/device}/run
    mkdir -p "$out"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    # a checkpoint of an earlier run (it has the optimizer's state) continues; model weights start a new run
    if python3 -c "import sys, torch; sys.exit(0 if 'optimizer' in torch.load('$STAGE/start.pt', map_location='cpu', weights_only=False) else 1)"; then
      start=(--resume "$STAGE/start.pt")
    else
      start=(--init-weights "$STAGE/start.pt")
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    python3 -m SpineContextSegLib.cli train --data "$STAGE/volumes" \
      --validation-fraction 0 --phantoms "${PHANTOMS:-32}" --phantom-fraction 0.6 --phantom-refresh 4 --validation-phantoms "${VALIDATION_PHANTOMS:-2}" \
      --spacing 2 --patch 64 64 64 --batch-size "${BATCH:-8}" --iterations-per-epoch "${ITERATIONS:-100}" --device "${DEVICE:-cuda}" \
      --scale-range 0.75 1.35 --lr 2e-4 --epochs 400 --max-minutes "$minutes" --seed 11 \
      "${start[@]}" -o "$out" 2>&1 | tee "$out/train.log"
    ;;
  *)
    sed -n 2,22p "$0"
    exit 2
    ;;
esac
