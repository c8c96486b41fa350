#!/usr/bin/env bash
# The CIFAR-10 study on a small real split (the dev set: 1,522 train, 761 test photos), as the README reports it:
#   1. SimCLR ResNet-18 for 30 minutes of training on our 2-core CPU (18 epochs), kNN monitored every 2 epochs;
#   2. SimCLR ResNet-18 and DoGo ResNet-18 + ResNet-50, 3 seeds each, at equal steps (4 epochs);
#   3. a SimCLR ResNet-50 teacher at the same steps, then DisCo ResNet-18 from it at the same steps again;
#   4. kNN and linear probe of every run's networks, their random initialisation and raw pixels (dogo eval table:
#      the SimCLR runs in cifar_dev_table_cpu2.json, the DoGo and teacher runs in cifar_dev_table_distill_cpu2.json,
#      DisCo in cifar_dev_table_disco_cpu2.json, as they were measured in separate sittings);
#   5. everything collected into benchmarks/results/cifar_dev_search_cpu2.json (python -m dogo.benchmarks.study).
# Usage: benchmarks/cifar_dev_study.sh CIFAR_DIR [OUT_DIR]   (about 2.5 hours on 2 cores)
# A run whose folder already holds a finished run (a "done" event in its metrics.jsonl) is not trained again, so the
# study can be spread over several sittings; delete a run's folder to train it anew.
set -euo pipefail
CIFAR=${1:?usage: $0 CIFAR_DIR [OUT_DIR]}
OUT=${2:-runs/cifar_dev_study}
DOGO=${DOGO:-.venv/bin/dogo}
PY=${PY:-.venv/bin/python}
# Small-data settings, the same for every run: batch 64 (more updates per image on a short budget), Adam 3e-4 per
# step (lr is per 256 images: 1.2e-3 at 64), colour distortion strength 0.5 (SimCLR's CIFAR-10 setting; at DoGo's
# 1.0 the same SimCLR ResNet-18 was 7 points lower after 4 epochs: benchmarks/results/cifar_dev_search_cpu2.json),
# channels_last (faster on CPUs too), kNN at k = 20 (the bank holds ~150 images per class).
COMMON="data.path=$CIFAR out_dir=$OUT data.batch_size=64 optim.lr=1.2e-3 precision.channels_last=on
  augment.brightness=0.4 augment.contrast=0.4 augment.saturation=0.4 augment.hue=0.1
  eval.knn_k=20 eval.knn_temperature=0.07 log.progress=off checkpoint.resume=none checkpoint.every_steps=0"
STEPS=92  # 4 epochs of the 1,522 training images

train() {  # train CONFIG name=NAME ...: unless $OUT/NAME already finished
  local name=${2#name=}
  if grep -qs '"event": "done"' "$OUT/$name/metrics.jsonl"; then echo "$OUT/$name: finished before, kept"; return; fi
  $DOGO train "$@"
}

train configs/cifar10_simclr_r18.yaml name=simclr_r18_30min $COMMON schedule.max_steps=414 \
  eval.knn_every_epochs=2 log.every=23
for seed in 0 1 2; do
  train configs/cifar10_simclr_r18.yaml name=simclr_r18_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS \
    eval.knn_every_epochs=2 log.every=23
  train configs/cifar10_r18_r50.yaml name=dogo_r18_r50_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS \
    peers.r50.zero_init_residual=true eval.knn_every_epochs=2 log.every=23
done
train configs/cifar10_simclr_r50.yaml name=simclr_r50_teacher $COMMON schedule.max_steps=$STEPS \
  eval.knn_every_epochs=2 log.every=23
train configs/cifar10_disco_r18_from_r50.yaml name=disco_r18_s0 $COMMON seed=0 schedule.max_steps=$STEPS \
  teacher.checkpoint=$OUT/simclr_r50_teacher objective.distill_weight=0.5 eval.knn_every_epochs=2 log.every=23

table() {  # table OUT.json RUN...: kNN and linear probe of the runs' networks, random init, raw pixels
  local out=$1; shift
  $DOGO eval table $(for r in "$@"; do echo "$OUT/$r"; done) --set "data.path=$CIFAR" --set eval.knn_k=20 \
    --set eval.knn_temperature=0.07 --json "$out"
}
SIMCLR="simclr_r18_30min simclr_r18_s0 simclr_r18_s1 simclr_r18_s2"
DISTILL="dogo_r18_r50_s0 dogo_r18_r50_s1 dogo_r18_r50_s2 simclr_r50_teacher"
table benchmarks/results/cifar_dev_table_cpu2.json $SIMCLR
table benchmarks/results/cifar_dev_table_distill_cpu2.json $DISTILL
table benchmarks/results/cifar_dev_table_disco_cpu2.json disco_r18_s0
$PY -m dogo.benchmarks.study benchmarks/results/cifar_dev_search_cpu2.json --base configs/cifar10_simclr_r18.yaml \
  --runs $(for r in $SIMCLR $DISTILL disco_r18_s0; do echo "$OUT/$r"; done) \
  --tables benchmarks/results/cifar_dev_table_{cpu2,distill_cpu2,disco_cpu2}.json \
  --note "CIFAR-10 dev set (1,522 train / 761 test real photos): benchmarks/cifar_dev_study.sh"
