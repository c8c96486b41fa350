#!/usr/bin/env bash
# The evaluation protocols side by side on the CIFAR-10 dev photos (1,522 train, 761 test): the SimCLR ResNet-18 of
# the CIFAR study (benchmarks/lab/cifar_dev_study.sh: simclr_r18_s0, 92 steps = 4 epochs at its small-data settings),
# its random initialisation and raw pixels, with
#   - kNN under both presets: dino (k=20, T=0.07) and lightly (k=200, T=0.1);
#   - the linear probe under both protocols: fast (AdamW on cached features) and standard (SGD on cropped and flipped
#     images through the frozen backbone, 100 epochs).
# Writes benchmarks/results/eval_protocols_{fast_dino,fast_lightly,standard_dino}_cpu2.json.
# Usage: benchmarks/lab/eval_protocols_study.sh CIFAR_DIR [OUT_DIR]   (about an hour on 2 cores)
set -euo pipefail
CIFAR=${1:?usage: $0 CIFAR_DIR [OUT_DIR]}
OUT=${2:-runs/eval_protocols}
DOGO=${DOGO:-.venv/bin/dogo}
RUN=$OUT/simclr_r18_s0
if ! grep -qs '"event": "done"' "$RUN/metrics.jsonl"; then
  $DOGO train configs/cifar10_simclr_r18.yaml name=simclr_r18_s0 data.path=$CIFAR out_dir=$OUT data.batch_size=64 \
    optim.lr=1.2e-3 precision.channels_last=on augment.brightness=0.4 augment.contrast=0.4 augment.saturation=0.4 \
    augment.hue=0.1 seed=0 schedule.max_steps=92 eval.knn_every_epochs=0 log.progress=off log.every=23 \
    checkpoint.resume=none checkpoint.every_steps=0
fi
R=benchmarks/results
$DOGO eval table $RUN --protocol fast --set eval.knn_protocol=dino --json $R/eval_protocols_fast_dino_cpu2.json
$DOGO eval table $RUN --protocol fast --set eval.knn_protocol=lightly --json $R/eval_protocols_fast_lightly_cpu2.json
$DOGO eval table $RUN --protocol standard --set eval.knn_protocol=dino --json $R/eval_protocols_standard_dino_cpu2.json
