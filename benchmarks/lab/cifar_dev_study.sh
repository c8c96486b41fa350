#!/usr/bin/env bash
# The CIFAR-10 study on a small real split (the dev set: 1,522 train, 761 test photos), as benchmarks/results/README.md reports it:
#   1. SimCLR ResNet-18 for 30 minutes of training on our 2-core CPU (18 epochs), kNN monitored every 2 epochs;
#   2. SimCLR ResNet-18 and DoGo ResNet-18 + ResNet-34 (KL weight 0.1 per row for each peer), 3 seeds each, at equal
#      steps (4 epochs);
#   3. the seed-0 search over the DoGo KL that chose that weight: DoGo's own weights (100 and 1 on its mean over the
#      B x B entries: 1.5625 and 0.015625 per row at batch 64), and temperature 0.5 with weight 0.5 each; and DoGo
#      ResNet-18 + ResNet-50 at DoGo's per-row weights for batch 256 (0.39 and 0.0039), 3 seeds;
#   4. a SimCLR ResNet-50 teacher trained for TEACHER_STEPS, then DisCo ResNet-18 from it at the students' steps;
#      a ResNet-50 teacher on a cosine schedule; DisCo from a ResNet-18 teacher that is ahead of the student; and
#      DisCo from the constant-rate ResNet-50 teacher stopped at 12 epochs, 3 seeds;
#   5. kNN and linear probe of every run's networks, their random initialisation and raw pixels (dogo eval table),
#      and everything collected into benchmarks/results/cifar_dev_*_cpu2.json (python -m dogo.benchmarks.lab.study).
# Usage: benchmarks/lab/cifar_dev_study.sh CIFAR_DIR [OUT_DIR]   (about 6 hours on 2 cores)
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
train configs/cifar10_simclr_r18.yaml name=simclr_r18_30min_strength1 $COMMON schedule.max_steps=414 \
  augment.brightness=0.8 augment.contrast=0.8 augment.saturation=0.8 augment.hue=0.2 eval.knn_every_epochs=2 \
  log.every=23  # DoGo's colour strength 1.0 (the later overrides win)
# DoGo with a weak KL: at DoGo's own weights the ResNet-18 spends its updates matching a peer no better than itself
KL01="peers.r18.kl_weight=0.1 peers.r34.kl_weight=0.1"
for seed in 0 1 2; do
  train configs/cifar10_simclr_r18.yaml name=simclr_r18_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS \
    eval.knn_every_epochs=2 log.every=23
  train configs/cifar10_r18_r34.yaml name=dogo_r34_w01_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS $KL01 \
    eval.knn_every_epochs=2 log.every=23
done
# The seed-0 search over the KL (and the ResNet-50 peer at DoGo's per-row weights, seeds 0-2)
train configs/cifar10_r18_r34.yaml name=dogo_r34_w156_s0 $COMMON seed=0 schedule.max_steps=$STEPS \
  peers.r18.kl_weight=1.5625 peers.r34.kl_weight=0.015625 eval.knn_every_epochs=2 log.every=23
train configs/cifar10_r18_r34.yaml name=dogo_r34_t05w05_s0 $COMMON seed=0 schedule.max_steps=$STEPS \
  objective.tau_kl=0.5 peers.r18.kl_weight=0.5 peers.r34.kl_weight=0.5 eval.knn_every_epochs=2 log.every=23
for seed in 0 1 2; do
  train configs/cifar10_r18_r50.yaml name=dogo_r18_r50_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS \
    peers.r50.zero_init_residual=true eval.knn_every_epochs=2 log.every=23
done
# DisCo: a ResNet-50 teacher trained TEACHER_STEPS (the lr is constant, so its first N steps are the N-step run)
TEACHER_STEPS=414
train configs/cifar10_simclr_r50.yaml name=simclr_r50_teacher_$TEACHER_STEPS $COMMON seed=0 \
  schedule.max_steps=$TEACHER_STEPS eval.knn_every_epochs=6
train configs/cifar10_disco_r18_from_r50.yaml name=disco_r18_s0 $COMMON seed=0 schedule.max_steps=$STEPS \
  teacher.checkpoint=$OUT/simclr_r50_teacher_$TEACHER_STEPS objective.distill_weight=0.5 eval.knn_every_epochs=2 \
  log.every=23
train configs/cifar10_disco_r18_from_r50.yaml name=disco_r18_w005_s0 $COMMON seed=0 schedule.max_steps=$STEPS \
  teacher.checkpoint=$OUT/simclr_r50_teacher_$TEACHER_STEPS objective.distill_weight=0.05 eval.knn_every_epochs=2 \
  log.every=23
# disco_seeds NAME TEACHER_RUN [OVERRIDE...]: DisCo ResNet-18 from a finished run, weight 0.5, the students' steps,
# seeds 0-2 (runs NAME_s0, NAME_s1, NAME_s2)
disco_seeds() {
  local name=$1 teacher=$2; shift 2
  for seed in 0 1 2; do
    train configs/cifar10_disco_r18_from_r50.yaml name=${name}_s$seed $COMMON seed=$seed schedule.max_steps=$STEPS \
      teacher.checkpoint=$OUT/$teacher objective.distill_weight=0.5 eval.knn_every_epochs=2 log.every=23 "$@"
  done
}
# Does a decaying lr make the ResNet-50 a better teacher? Cosine from 1.2e-3 to 0 over 12 epochs, 1 epoch warm-up
train configs/cifar10_simclr_r50.yaml name=simclr_r50_teacher_cos_276 $COMMON seed=0 schedule.max_steps=276 \
  schedule.final_lr_ratio=0.0 schedule.warmup_epochs=1 eval.knn_every_epochs=4 log.every=23
# Does DisCo help when the teacher is ahead of the student? A SimCLR ResNet-18 teacher of 18 epochs (not DisCo's
# ResNet-50, which learns slower here) distilled into a ResNet-18 at the students' steps
train configs/cifar10_simclr_r18.yaml name=simclr_r18_teacher_414 $COMMON seed=0 schedule.max_steps=414 \
  eval.knn_every_epochs=6 log.every=23
disco_seeds disco_r18_from_r18 simclr_r18_teacher_414 teacher.peer=r18
# The constant-rate ResNet-50 teacher stopped at 12 epochs, where the 414-step run's monitor was highest (34.6%; the
# same settings as that run's first 276 steps), and DisCo from it, seeds 0-2
train configs/cifar10_simclr_r50.yaml name=simclr_r50_teacher_276 $COMMON seed=0 schedule.max_steps=276 \
  eval.knn_every_epochs=6 log.every=23
disco_seeds disco_r18_from_r50_276 simclr_r50_teacher_276

table() {  # table OUT.json RUN...: kNN and linear probe of the runs' networks, random init, raw pixels
  local out=$1; shift
  $DOGO eval table $(for r in "$@"; do echo "$OUT/$r"; done) --set "data.path=$CIFAR" --set eval.knn_k=20 \
    --set eval.knn_temperature=0.07 --json "$out"
}
collect() {  # collect OUT.json TABLE RUN...: the runs' settings and kNN curves, with their table
  local out=$1 tables=$2; shift 2
  $PY -m dogo.benchmarks.lab.study "$out" --base configs/cifar10_simclr_r18.yaml \
    --runs $(for r in "$@"; do echo "$OUT/$r"; done) --tables $tables \
    --note "CIFAR-10 dev set (1,522 train / 761 test real photos): benchmarks/lab/cifar_dev_study.sh"
}
SEEDS="simclr_r18_s0 simclr_r18_s1 simclr_r18_s2 dogo_r34_w01_s0 dogo_r34_w01_s1 dogo_r34_w01_s2"
SEARCH="dogo_r34_w156_s0 dogo_r34_t05w05_s0"
R50="dogo_r18_r50_s0 dogo_r18_r50_s1 dogo_r18_r50_s2"
DISCO="simclr_r50_teacher_$TEACHER_STEPS disco_r18_s0 disco_r18_w005_s0"
TEACHERS="simclr_r50_teacher_cos_276 simclr_r18_teacher_414 disco_r18_from_r18_s0 disco_r18_from_r18_s1
  disco_r18_from_r18_s2"
TEACHER50="simclr_r50_teacher_276 disco_r18_from_r50_276_s0 disco_r18_from_r50_276_s1 disco_r18_from_r50_276_s2"
table benchmarks/results/cifar_dev_table_cpu2.json simclr_r18_30min simclr_r18_30min_strength1
table benchmarks/results/cifar_dev_table_seeds_cpu2.json $SEEDS $SEARCH
table benchmarks/results/cifar_dev_table_distill_cpu2.json $R50
table benchmarks/results/cifar_dev_table_disco_cpu2.json $DISCO
table benchmarks/results/cifar_dev_table_teachers_cpu2.json $TEACHERS
table benchmarks/results/cifar_dev_table_teacher50_cpu2.json $TEACHER50
collect benchmarks/results/cifar_dev_search_cpu2.json benchmarks/results/cifar_dev_table_cpu2.json simclr_r18_30min \
  simclr_r18_30min_strength1
collect benchmarks/results/cifar_dev_dogo_search_cpu2.json \
  "benchmarks/results/cifar_dev_table_seeds_cpu2.json benchmarks/results/cifar_dev_table_distill_cpu2.json" \
  $SEEDS $SEARCH $R50
collect benchmarks/results/cifar_dev_disco_cpu2.json benchmarks/results/cifar_dev_table_disco_cpu2.json $DISCO
collect benchmarks/results/cifar_dev_teachers_cpu2.json benchmarks/results/cifar_dev_table_teachers_cpu2.json $TEACHERS
collect benchmarks/results/cifar_dev_teacher50_cpu2.json benchmarks/results/cifar_dev_table_teacher50_cpu2.json \
  $TEACHER50
