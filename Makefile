# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU wheel from local disk; on a GPU cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-study clean

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[hf,plot,tb,test,eval,wandb]"
	@$(PY) -c "import transformer_engine" 2>/dev/null && [ "$$($(PY) -c 'import torch;print(torch.cuda.is_available())')" = "False" ] \
		&& { echo "transformer_engine is installed on a CPU-only torch: megatron-core cannot import; remove it"; exit 1; } || true
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/olmoe demo

# The Slurm tests need a cluster: when none answers and this is root, the local two-node cluster
# (slurm/local/up.sh, which installs the Slurm packages if missing) is brought up for the run and
# down after it; OLMOE_TEST_SLURM=0 skips that (the slurm tests then skip with their reason).
test: $(STAMP)
	@started=0; \
	if [ "$${OLMOE_TEST_SLURM:-1}" != 0 ] && ! timeout 10 sinfo >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  if slurm/local/up.sh; then started=1; else echo "the local Slurm cluster did not start: the slurm tests skip"; fi; \
	fi; \
	status=0; $(PY) -m pytest -q tests || status=$$?; \
	if [ $$started = 1 ]; then slurm/local/down.sh || true; fi; \
	exit $$status

# The paper's granularity and LB pairs as one study on this machine (about 30 min on 2 cores).
bench-study: $(STAMP)
	$(PY) benchmarks/study_paper_pairs.py

clean:
	rm -rf $(VENV) *.egg-info runs .pytest_cache
