# HASTE pipeline. `make help` lists the targets. Every target installs .venv on first use.
PYTHON  ?= python3
VENV    ?= .venv
CONFIG  ?= configs/demo.yaml
CACHE   ?= cache
RUN     ?= runs/demo
SRC     ?= data
VAE     ?= stabilityai/sd-vae-ft-ema
OUT     ?= export
ARGS    ?=
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1   # the index's CUDA build (runs on CPU); see README
BIN     := $(VENV)/bin
HASTE   := $(BIN)/haste
STAMP   := $(VENV)/.installed

.PHONY: help install test test-fast lint preprocess verify train eval import-edm2 export-edm2 demo demo-trigger demo-t2i bench bench-preprocess bench-train bench-eval bench-codecs bench-text bench-probe import-uvit clean

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv and install the project with dev extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)  ## fast + slow CPU tests (what CI runs)
	$(BIN)/pytest -q

test-fast: $(STAMP)  ## fast CPU tests only
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pipeline trainer stages tests benchmarks

preprocess: $(STAMP)  ## build the cache: CONFIG, CACHE, ARGS
	$(HASTE) preprocess --config $(CONFIG) --set out=$(CACHE) $(ARGS)
	$(HASTE) cache info $(CACHE)

verify: $(STAMP)  ## sha256 + decode + fresh-model check of the cache: CACHE
	$(HASTE) cache verify $(CACHE)

train: $(STAMP)  ## train on the cache: CONFIG, CACHE, RUN, ARGS (rerun to resume)
	$(HASTE) train --config $(CONFIG) --set data.cache=$(CACHE) --set run_dir=$(RUN) $(ARGS)

eval: $(STAMP)  ## sample the newest checkpoint of RUN + metrics: CONFIG, RUN, ARGS (rerun to resume)
	$(HASTE) eval --config $(CONFIG) --set run_dir=$(RUN) $(ARGS)

import-edm2: $(STAMP)  ## import an edm2/REPA/HASTE dataset SRC (images/ + vae-sd/, VAE) into CACHE: CONFIG, ARGS
	$(HASTE) import edm2 $(SRC) --vae $(VAE) --config $(CONFIG) --set out=$(CACHE) $(ARGS)

import-uvit: $(STAMP)  ## import U-ViT/HASTE coco256_features SRC (+ ARGS="--images coco/train2014") into CACHE: CONFIG
	$(HASTE) import uvit $(SRC) --vae $(VAE) --config $(CONFIG) --set out=$(CACHE) $(ARGS)

export-edm2: $(STAMP)  ## write CACHE's newest latents group as $(OUT)/images + $(OUT)/vae-sd (edm2 layout, sorted source order)
	$(HASTE) export edm2 $(CACHE) $(OUT)

demo: preprocess train eval  ## the whole demo chain on CPU: preprocess -> train (Phase I -> II) -> eval
	@echo ""
	@echo "demo done. cache: $(CACHE)/   run: $(RUN)/"
	@echo "  training previews  $(RUN)/samples/step-*.png    losses  $(RUN)/loss.png, $(RUN)/stats.jsonl"
	@echo "  eval               $$(ls -d $(RUN)/eval/*/ | tail -1)  (grid.png, samples.npz, metrics.json)"

demo-trigger: $(STAMP)  ## the demo with the gradient-angle trigger instead of a fixed tau: preprocess -> train, probe.png
	$(MAKE) preprocess CONFIG=configs/demo-trigger.yaml CACHE=$(CACHE)
	$(MAKE) train CONFIG=configs/demo-trigger.yaml CACHE=$(CACHE) RUN=runs/demo-trigger
	@echo ""
	@echo "demo-trigger done. run: runs/demo-trigger/"
	@echo "  cosine per t and mean vs step  runs/demo-trigger/probe.png   decision  runs/demo-trigger/stop.json"
	@echo "  losses (Phase II from the fired step, dashed)  runs/demo-trigger/loss.png"

demo-t2i: $(STAMP)  ## text-to-image demo on CPU: synthetic captioned images -> MM-DiT (Phase I -> II) -> eval grid by prompt
	$(MAKE) preprocess CONFIG=configs/demo-t2i.yaml CACHE=cache-t2i
	$(MAKE) train CONFIG=configs/demo-t2i.yaml CACHE=cache-t2i RUN=runs/demo-t2i
	$(MAKE) eval CONFIG=configs/demo-t2i.yaml RUN=runs/demo-t2i
	@echo ""
	@echo "demo-t2i done. cache: cache-t2i/   run: runs/demo-t2i/"
	@echo "  training previews (captions listed below)  runs/demo-t2i/samples/step-*.png    losses  runs/demo-t2i/loss.png"
	@echo "  eval  $$(ls -d runs/demo-t2i/eval/*/ | tail -1)grid.png  (rows 1-4: seen combinations, 5-8: held out)"

bench: bench-preprocess bench-train bench-eval bench-codecs bench-text  ## every benchmark, then one report (JSON + markdown + PNG)
	$(BIN)/python benchmarks/report.py

bench-preprocess: $(STAMP)  ## preprocess images/s vs bare model compute
	$(BIN)/python benchmarks/bench_preprocess.py $(ARGS)

bench-train: $(STAMP)  ## step time: cached Phase I / Phase II vs denoise-only vs official online teacher (SiT-B/2, MM-DiT); probe share
	$(BIN)/python benchmarks/bench_train.py $(ARGS)
	$(BIN)/python benchmarks/bench_train.py --model MMDiT-12/2 $(ARGS)
	$(BIN)/python benchmarks/bench_probe.py   # the trigger's probe: its share of training time (bench-probe)

bench-eval: $(STAMP)  ## sampling images/s (NFE stated) vs the official batch RNG; feature extraction images/s
	$(BIN)/python benchmarks/bench_eval.py $(ARGS)
	$(BIN)/python benchmarks/bench_eval_features.py

bench-codecs: $(STAMP)  ## teacher codecs: bytes/image vs fidelity (x1/x5/x20, stress), encode/decode img/s, loader vs step
	$(BIN)/python benchmarks/bench_codecs.py $(ARGS)

bench-text: $(STAMP)  ## text group: bytes/image (COCO, 10M web), fp16 vs fp32 error, CLIP-L captions/s, import + loader
	$(BIN)/python benchmarks/bench_text.py $(ARGS)

bench-probe: $(STAMP)  ## the termination probe's share of training time at the paper's settings (extrapolated, stated)
	$(BIN)/python benchmarks/bench_probe.py $(ARGS)

clean:  ## remove the demo cache and runs (not .venv)
	rm -rf $(CACHE) cache-t2i runs benchmarks/results
