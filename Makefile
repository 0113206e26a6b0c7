# kvlab: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVLAB := $(VENV)/bin/kvlab
# cpu: the CPU build of vLLM (pinned, with torch 2.13.0+cpu); gpu: the official vLLM for CUDA nodes.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.kvlab-setup-$(EXTRA)

.PHONY: setup system-deps test test-fast demo experiment report clean help

help:
	@echo "make demo        install, run experiments/cpu-smoke.yaml end to end, plan experiments/sim-h100.yaml on the simulator, build the report, print where it is"
	@echo "make test        install, run every test (the slow real-vLLM ones too)"
	@echo "make experiment  MODEL=deepseek-v2-lite QUANT=bf16 [ENGINE=] [WORKLOAD=] [USERS=] [DURATION=] [WARMUP=] [GPU=] [BASELINE=]"
	@echo "                 one cell into $(RESULTS)/MODEL-QUANT/DIGEST, then one report over every run in $(RESULTS); prints its path last"
	@echo "make report      one report over every run under $(REPORT_RESULTS)/ [BASELINE=MODEL/QUANT]; prints its path last"
	@echo "make setup       only install ($(VENV), extra '$(EXTRA)')"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/constraints-gpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	# torch first, from the pinned CPU wheel, so that nothing pulls a CUDA build of torch.
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[cpu,dev,ray]'
	# The CPU build of vLLM pulls a torchvision that fails at import and breaks vLLM's start.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	# vLLM 0.32.0 (the release the memory model mirrors) and the rest pinned; torch and the CUDA
	# libraries are left to vLLM's own pins (requirements/constraints-gpu.txt says why).
	$(PY) -m pip install -q -c requirements/constraints-gpu.txt -e '.[gpu,dev,ray]'
endif
	@touch $@

# Debian packages the integration tests use: a real Prometheus server, headless Chromium.
SYSTEM_DEPS := prometheus chromium
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  ($$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing) >/dev/null \
	  || { echo "could not install$$missing: install them (Debian/Ubuntu: apt-get install$$missing)"; exit 1; }; \
	fi

# Two pytest workers (pytest-xdist): the tests that start real vLLM run one after another on one
# worker (they share the twins and most of the CPU), every other test file on either.
TEST_WORKERS ?= 2
test: setup system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The main job on the embedded default: the MLA twin against GQA twins on the CPU build of vLLM
# (what MLA and an fp8 KV cache save in memory, measured), then the same models at bf16, fp8
# weights and fp8 KV on a simulated H100 in virtual time (what that buys in throughput, latency,
# sessions per GPU and $: kvlab plan on the simulator, every figure labelled simulated with its
# step-time source), then one report of both. The last line printed is the report.
DEMO_SPEC ?= experiments/cpu-smoke.yaml
DEMO_OUT ?= results/cpu-smoke
DEMO_SIM_SPEC ?= experiments/sim-h100.yaml
DEMO_SIM_OUT ?= results/sim-h100
demo: setup
	$(KVLAB) compare llama-3.1-8b qwen2.5-7b deepseek-v2-lite --gpu h100 --gpu-memory-utilization 0.9 --max-model-len 32768
	$(KVLAB) experiment run $(DEMO_SPEC) --out $(DEMO_OUT)
	$(KVLAB) plan --spec $(DEMO_SIM_SPEC) --tolerance 0.1 --out $(DEMO_SIM_OUT)/plan
	$(KVLAB) report $(DEMO_OUT) $(DEMO_SIM_OUT) --out $(DEMO_OUT)/report

# One cell: make experiment MODEL=deepseek-v2-lite QUANT=fp8 [ENGINE=vllm|vllm-cpu|sim] [WORKLOAD=agent]
#           [USERS=4] [DURATION=60] [WARMUP=10] [GPU=h100] [BASELINE=MODEL/QUANT]. Without a GPU the engine is
# the CPU build (it says so). The cell goes to $(RESULTS)/MODEL-QUANT/DIGEST; then one comparison report
# over every run in $(RESULTS) (each `make experiment` adds its model to it) is built or updated in
# $(RESULTS)/report: the last line printed is its index.html.
MODEL ?= deepseek-v2-lite
QUANT ?= bf16
USERS ?= 4
DURATION ?= 60
RESULTS ?= results/one
experiment: setup
	$(KVLAB) experiment one --model $(MODEL) --quant $(QUANT) --users $(USERS) --duration $(DURATION) \
	  $(if $(WARMUP),--warmup $(WARMUP)) $(if $(ENGINE),--engine $(ENGINE)) $(if $(WORKLOAD),--workload $(WORKLOAD)) \
	  $(if $(GPU),--gpu $(GPU)) --results $(RESULTS)
	$(KVLAB) report $(RESULTS) $(if $(BASELINE),--baseline $(BASELINE))

# One report over every run under results/ (specs' folders, make experiment's, plans) in results/report.
REPORT_RESULTS ?= results
report: setup
	$(KVLAB) report $(REPORT_RESULTS) $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) .pytest_cache
