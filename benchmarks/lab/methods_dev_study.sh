#!/usr/bin/env bash
# BYOL on the CIFAR-10 dev photos (1,522 train, 761 test), at the CIFAR study's small-data settings
# (benchmarks/lab/cifar_dev_study.sh: batch 64, Adam 3e-4 per step, colour strength 0.5, 92 steps = 4 epochs):
#   1. BYOL ResNet-18 alone (configs/cifar10_byol_r18.yaml);
#   2. DoGo: a BYOL ResNet-18 beside a SimCLR ResNet-34 (configs/cifar10_r18_r34.yaml with the ResNet-18 on BYOL:
#      the ResNet-34 costs 1.4x a ResNet-18 per step here where a ResNet-50 costs 3.5x), KL weight 0.1 per row each
#      (the study's choice at this budget);
#   3. DisCo: a BYOL ResNet-18 student of that run's frozen ResNet-34 peer;
#   4. the same for a timm ViT-Tiny (configs/cifar10_r18_vits.yaml: DoGo ResNet-18 + ViT-Tiny; DisCo ResNet-18 from
#      that run's ViT);
#   5. kNN and linear probe of every network, its random initialisation and raw pixels (dogo eval table).
# Usage: benchmarks/lab/methods_dev_study.sh CIFAR_DIR [OUT_DIR]   (about 50 minutes on 2 cores)
set -euo pipefail
CIFAR=${1:?usage: $0 CIFAR_DIR [OUT_DIR]}
OUT=${2:-runs/methods_dev_study}
DOGO=${DOGO:-.venv/bin/dogo}
COMMON="data.path=$CIFAR out_dir=$OUT data.batch_size=64 optim.lr=1.2e-3 precision.channels_last=on
  augment.brightness=0.4 augment.contrast=0.4 augment.saturation=0.4 augment.hue=0.1 seed=0
  eval.knn_k=20 eval.knn_temperature=0.07 eval.knn_every_epochs=0 log.progress=off log.every=23
  checkpoint.resume=none checkpoint.every_steps=0 schedule.max_steps=92"
train() {  # train CONFIG name=NAME ...: unless $OUT/NAME already finished
  local name=${2#name=}
  if grep -qs '"event": "done"' "$OUT/$name/metrics.jsonl"; then echo "$OUT/$name: finished before, kept"; return; fi
  $DOGO train "$@"
}
train configs/cifar10_byol_r18.yaml name=byol_r18 $COMMON
train configs/cifar10_r18_r34.yaml name=dogo_byol_r18_simclr_r34 $COMMON peers.r18.ssl=byol \
  peers.r18.kl_weight=0.1 peers.r34.kl_weight=0.1
train configs/cifar10_disco_r18_from_r50.yaml name=disco_byol_r18_from_r34 $COMMON peers.r18.ssl=byol \
  objective.distill_weight=0.5 teacher.checkpoint=$OUT/dogo_byol_r18_simclr_r34 teacher.peer=r34 \
  peers.r18.head_hidden=4096 peers.r18.head_out=128
train configs/cifar10_r18_vits.yaml name=dogo_r18_vit $COMMON peers.r18.kl_weight=0.1 peers.vit.kl_weight=0.1
train configs/cifar10_disco_r18_from_r50.yaml name=disco_r18_from_vit $COMMON objective.distill_weight=0.5 \
  teacher.checkpoint=$OUT/dogo_r18_vit teacher.peer=vit
$DOGO eval table $OUT/byol_r18 $OUT/dogo_byol_r18_simclr_r34 $OUT/disco_byol_r18_from_r34 --epochs 100 \
  --json benchmarks/results/methods_dev_byol_cpu2.json
$DOGO eval table $OUT/dogo_r18_vit $OUT/disco_r18_from_vit --epochs 100 \
  --json benchmarks/results/methods_dev_vit_cpu2.json
