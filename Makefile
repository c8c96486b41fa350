# dogo: `make demo` and `make test` each set up what they need first; on a fresh machine those two are all.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DOGO := $(VENV)/bin/dogo
STAMP := $(VENV)/.dogo-setup
FFCV_APT := libturbojpeg0-dev libopencv-dev pkg-config
DEMO_DATA := data/shapes64
NGPU ?= 1
IMAGENET ?=

.PHONY: setup gpu-check demo demo-check demo-disco test docs imagenet-r18-r50 imagenet-simclr-r18 imagenet-simclr-r50 imagenet-disco-r18 \
	cifar10-r18-r50 cifar10-r18-r34 cifar10-simclr-r18 cifar10-simclr-r50 cifar10-disco-r18 cifar10-byol-r18 \
	cifar10-byol-r18-simclr-r50 cifar10-r18-vits bench bench-pipeline photos convert clean

setup: $(STAMP)

# Re-run when pyproject.toml changes. FFCV compiles against libturbojpeg and OpenCV: install them with apt when
# they are missing and we are root; otherwise say what to install and set up everything else.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@extras=dev,dali,viz,timm,wandb; \
	if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then extras=$$extras,ffcv; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing FFCV's system packages: $(FFCV_APT)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FFCV_APT) >/dev/null \
	    && extras=$$extras,ffcv; \
	else \
	  echo "NOTE: the ffcv extra is skipped: install its system packages first (as root: apt-get install -y $(FFCV_APT)), then run make setup again"; \
	fi; \
	echo "installing dogo with extras [$$extras] into $(VENV)"; \
	$(PY) -m pip install -q -e ".[$$extras]"
	@touch $(STAMP)

$(DEMO_DATA): | $(STAMP)
	$(PY) -m dogo.pipelines.shapes $(DEMO_DATA)

# Pinned kernels and threads: float results depend on the kernels a CPU gets (AVX-512 or AVX2 convolutions and GEMMs
# round differently) and on the thread count, so the demo asks every CPU for AVX2 kernels (any x86-64 server since
# 2015) and 2 threads, and compiles the CPU-worker recipe's numba kernels for AVX2 (haswell) too; OpenCV's uint8
# resize is fixed-point, the same on every instruction set. That is not bit-identical on every CPU (an Intel Xeon's
# loss leaves the AMD EPYC's at step 10), so make demo-check compares within measured tolerances
# (benchmarks/demo_check.py).
DEMO_ENV := OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
ifeq ($(shell uname -m),x86_64)
DEMO_ENV += NUMBA_CPU_NAME=haswell
endif

# DoGo with a ResNet-18 and a ResNet-50 peer on the procedural dataset, then each peer's kNN top-1 against its
# random initialisation, and the training curves. resume=none: every `make demo` trains from scratch.
demo: $(STAMP) $(DEMO_DATA)
	$(DEMO_ENV) $(DOGO) train configs/demo.yaml checkpoint.resume=none
	$(DEMO_ENV) $(DOGO) eval knn runs/demo
	$(DOGO) plot curves runs/demo --out runs/demo/curves.png

# make demo, then its table against the committed result file, within the tolerances benchmarks/demo_check.py measures.
demo-check: demo
	$(PY) -m dogo.benchmarks.demo_check runs/demo/knn.json benchmarks/results/demo_knn_cpu2.json

# DisCo on the demo dataset: the demo's ResNet-50 (make demo first, if runs/demo has no checkpoint) distilled into a
# fresh ResNet-18, and the same ResNet-18 with SimCLR alone for the same steps; then both kNN tables.
demo-disco: $(STAMP) $(DEMO_DATA)
	@test -n "$$(ls runs/demo/checkpoints 2>/dev/null)" || $(MAKE) demo
	$(DEMO_ENV) $(DOGO) train configs/demo_disco.yaml checkpoint.resume=none
	$(DEMO_ENV) $(DOGO) train configs/demo_disco.yaml name=demo_simclr_r18 objective.name=simclr checkpoint.resume=none
	$(DEMO_ENV) $(DOGO) eval knn runs/demo_disco
	$(DEMO_ENV) $(DOGO) eval knn runs/demo_simclr_r18

# One pytest worker per core (pytest-xdist, `addopts` in pyproject.toml): the tests that start processes (dogo
# train, torchrun, gloo ranks) give each a fixed thread count and a free port, so they can share the machine.
test: $(STAMP)
	$(PY) -m pytest -q

# docs/config.md from the config dataclasses' comments, and the result tables of README.md and docs/ from
# benchmarks/results/ (tests/test_docs.py fails when either is stale)
docs: $(STAMP)
	$(PY) docs/config_doc.py
	$(PY) docs/results_tables.py

# A missing or malformed dataset, or a step that cannot fit in memory, stops here with what to change, before
# torchrun starts the ranks.
define require_imagenet
	@if [ -z "$(IMAGENET)" ]; then echo "error: set IMAGENET=/path/to/imagenet (holding train/ and val/ class folders)"; exit 2; fi
	@$(PY) -m dogo.pipelines.check folder "$(IMAGENET)"
endef

# $(call job,CONFIG,ARGS): the memory check for NGPU ranks, then the run under torchrun.
define job
	$(DOGO) train $(1) $(2) --dry-run --world-size $(NGPU)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPU) -m dogo train $(1) $(2)
endef

imagenet-r18-r50: $(STAMP)
	$(require_imagenet)
	$(call job,configs/imagenet_r18_r50.yaml,data.path=$(IMAGENET))

imagenet-simclr-r18: $(STAMP)
	$(require_imagenet)
	$(call job,configs/imagenet_simclr_r18.yaml,data.path=$(IMAGENET))

imagenet-simclr-r50: $(STAMP)
	$(require_imagenet)
	$(call job,configs/imagenet_simclr_r50.yaml,data.path=$(IMAGENET))

# DisCo: a frozen ResNet-50 (default: the run of make imagenet-simclr-r50) distilled into a MoCo v2 ResNet-18.
TEACHER ?= runs/imagenet_simclr_r50
TEACHER_PEER ?= r50
imagenet-disco-r18: $(STAMP)
	$(require_imagenet)
	$(call job,configs/disco_r18_from_r50.yaml,data.path=$(IMAGENET) teacher.checkpoint=$(TEACHER) teacher.peer=$(TEACHER_PEER))

# CIFAR-10 (or CIFAR-100) held on the device: DoGo ResNet-18 + ResNet-50, or SimCLR ResNet-18 alone, with DoGo's own
# CIFAR settings. CIFAR=/path/to/cifar-10-batches-py (the python version, unpacked) or an image folder with
# train/<class>/*.jpg and val/<class>/*.jpg.
CIFAR ?=
define require_cifar
	@if [ -z "$(CIFAR)" ]; then echo "error: set CIFAR=/path/to/cifar-10-batches-py (the python version, unpacked) or an image folder"; exit 2; fi
	@$(PY) -m dogo.pipelines.check held "$(CIFAR)"
endef

cifar10-r18-r50: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_r18_r50.yaml,data.path=$(CIFAR))

cifar10-r18-r34: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_r18_r34.yaml,data.path=$(CIFAR))

cifar10-simclr-r18: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_simclr_r18.yaml,data.path=$(CIFAR))

cifar10-byol-r18: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_byol_r18.yaml,data.path=$(CIFAR))

cifar10-byol-r18-simclr-r50: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_byol_r18_simclr_r50.yaml,data.path=$(CIFAR))

cifar10-r18-vits: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_r18_vits.yaml,data.path=$(CIFAR))

cifar10-simclr-r50: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_simclr_r50.yaml,data.path=$(CIFAR))

# DisCo on CIFAR: the run of make cifar10-simclr-r50 (or TEACHER=RUN_OR_CKPT), frozen, into a SimCLR ResNet-18.
CIFAR_TEACHER ?= runs/cifar10_simclr_r50
cifar10-disco-r18: $(STAMP)
	$(require_cifar)
	$(call job,configs/cifar10_disco_r18_from_r50.yaml,data.path=$(CIFAR) teacher.checkpoint=$(CIFAR_TEACHER))

# Training-step throughput (images/s per device) of the DoGo engine on device-made synthetic batches.
bench: $(STAMP)
	$(DOGO) bench train configs/bench_r18_r50.yaml

# Input pipelines: two-view images/s of the folder, FFCV and DALI backends against the decode-only ceiling and the
# torchvision DataLoader, on 2,000 photo JPEGs of 500x375 (made once from scikit-image's sample photos).
PHOTOS := data/photos500
photos: $(PHOTOS)
$(PHOTOS): | $(STAMP)
	$(PY) -m dogo.benchmarks.lab.photos $(PHOTOS) --images 2000

bench-pipeline: $(STAMP) $(PHOTOS)
	@test -f $(PHOTOS)/train.beton || $(DOGO) convert $(PHOTOS)/train $(PHOTOS)/train.beton --write-mode jpg --jpeg-quality 90
	$(DOGO) bench pipeline --backend folder --data $(PHOTOS)/train
	$(DOGO) bench pipeline --backend ffcv --data $(PHOTOS)/train --beton $(PHOTOS)/train.beton
	$(DOGO) bench pipeline --backend dali --data $(PHOTOS)/train

# An image-folder split to FFCV's .beton, e.g. make convert SRC=/imagenet/train DST=/data/train.beton ARGS="--max-resolution 512"
SRC ?=
DST ?=
convert: $(STAMP)
	@if [ -z "$(SRC)" ] || [ -z "$(DST)" ]; then echo "usage: make convert SRC=/path/to/split DST=/path/out.beton [ARGS='--max-resolution 512 ...']"; exit 2; fi
	$(DOGO) convert $(SRC) $(DST) $(ARGS)

clean:
	rm -rf $(VENV) runs

# Everything GPU-side proved and measured in at most 6 minutes: its steps' time limits add up to 5 min 40 s
# (benchmarks/gpu_check.sh; results in benchmarks/results/gpu_<device>_<date>/), with the torch the machine already
# has: PY=python3 make gpu-check. CIFAR=path/to/cifar-10-batches-py adds SimCLR against DoGo on real photos (40 s more).
GPU_CHECK_PY := $(or $(shell printenv PY),$(wildcard $(PY)),$(PYTHON))
gpu-check:
	@PY="$(if $(filter command line,$(origin PY)),$(PY),$(GPU_CHECK_PY))" CIFAR="$(CIFAR)" bash benchmarks/gpu_check.sh; \
	rc=$$?; [ $$rc = 3 ] && exit 0; exit $$rc  # 3: no GPU here, said in one line
