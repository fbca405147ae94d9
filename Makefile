# namegen: `make train export serve` builds and serves a model; `make test` runs the tests.
# Every target but help and the clean ones creates .venv and installs the pinned requirements first (re-done
# when requirements.txt changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ART := artifacts
PRESET ?= baseline
TRAIN_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 50051
PROVIDER ?= auto
SERVE_ARGS ?=
LOAD_ARGS ?= --concurrency 1,8,64 --duration 10
REPORT_ARGS ?=
PYTEST_ARGS ?=
STUBS := service/namegen_pb/namegen_pb2_grpc.py

.PHONY: help venv data proto train export verify bench lr-sweep serve load load-report test test-all clean distclean

help:
	@echo "make train export   train the model (PRESET=baseline|better) and compile it to ONNX"
	@echo "make serve          serve it over gRPC on $(HOST):$(PORT) (builds what is missing first)"
	@echo "make verify | bench parity report torch vs ONNX Runtime | sampling throughput benchmark"
	@echo "make load           load-test a running server (LOAD_ARGS='$(LOAD_ARGS)')"
	@echo "make load-report    the README's load-test table: a fresh server per row, ~4 min (REPORT_ARGS)"
	@echo "make lr-sweep       learning-rate search plot"
	@echo "make data | proto   fetch and checksum names.txt | generate the gRPC stubs"
	@echo "make test           the test suite (what CI runs); make test-all includes slow tests"
	@echo "make clean          remove artifacts/ and the stubs (distclean: also .venv and data/names.txt)"

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(STAMP)

data: $(STAMP)
	$(PY) -m data.names

$(STUBS): proto/namegen.proto service/gen_proto.py $(STAMP)
	$(PY) -m service.gen_proto --force

proto: $(STUBS)

# `make train` always trains; `export`/`serve` train only when no checkpoint exists yet.
train: $(STAMP)
	$(PY) -m trainer.train --preset $(PRESET) --out-dir $(ART) $(TRAIN_ARGS)

$(ART)/model.pt: | $(STAMP)
	$(PY) -m trainer.train --preset $(PRESET) --out-dir $(ART) $(TRAIN_ARGS)

# PRESET chooses what `make train` trains; an existing checkpoint is used as it is. Say so when PRESET was
# given and names another preset than the checkpoint's (from its metrics.json).
PRESET_NOTE = @case "$(origin PRESET)" in "command line"|environment) \
	test -f $(ART)/metrics.json && ! grep -q '"preset": "$(PRESET)"' $(ART)/metrics.json && \
	echo "note: $(ART)/model.pt was not trained with PRESET=$(PRESET), which only applies to training;" \
	"run \`make train export PRESET=$(PRESET)\` to train and use it"; esac; true

export: $(ART)/model.pt
	$(PRESET_NOTE)
	$(PY) -m export.export --checkpoint $(ART)/model.pt --out-dir $(ART)

# Re-exported when the checkpoint or the code that builds the graphs changes (a pull that changes the
# sampler). One export writes model.onnx and sampler.onnx; the rule names one, so `make -j` runs it once.
EXPORT_SRC := $(filter-out export/verify.py export/bench.py,$(wildcard export/*.py)) \
	trainer/model.py trainer/checkpoint.py trainer/dataset.py
$(ART)/sampler.onnx: $(ART)/model.pt $(EXPORT_SRC)
	$(PY) -m export.export --checkpoint $(ART)/model.pt --out-dir $(ART)

verify: $(ART)/sampler.onnx
	$(PY) -m export.verify --model-dir $(ART)

bench: $(ART)/sampler.onnx
	$(PY) -m export.bench --model-dir $(ART)

lr-sweep: $(STAMP)
	$(PY) -m trainer.lr_sweep --out $(ART)/plots/lr_sweep.png

serve: $(ART)/sampler.onnx $(STUBS)
	$(PRESET_NOTE)
	$(PY) -m service.server --model-dir $(ART) --host $(HOST) --port $(PORT) --provider $(PROVIDER) $(SERVE_ARGS)

load: $(STUBS)
	$(PY) -m service.loadtest --target $(HOST):$(PORT) $(LOAD_ARGS)

# Starts its own servers (127.0.0.1, ephemeral ports), one per row; writes $(ART)/load_report.json.
load-report: $(ART)/sampler.onnx $(STUBS)
	$(PY) -m service.load_report --model-dir $(ART) --json $(ART)/load_report.json $(REPORT_ARGS)

test: $(STAMP) $(STUBS)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) $(STUBS)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(ART) service/namegen_pb .pytest_cache

distclean: clean
	rm -rf $(VENV) data/names.txt
