# Everything a fresh machine needs: `make demo` and `make test` set up what they use.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# A local CPU build of torch; an unpinned torch would pull gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: install sshd tpu-demo demo test test-unit sample-data slurm-up slurm-down lint format bench clean

install: $(STAMP)

$(STAMP):
	@echo "== setting up $(VENV) (python packages)"
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[torch,tracking,tpu,jax,dev]" --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $@

sample-data: install
	$(PYTHON) -m trainers.core.sample_data didemo msrvtt msrvtt_qa

demo: install sample-data
	$(PYTHON) -m launcher -m trainer=singularity dataset=didemo,msrvtt

# The emulated TPU workers are real sshd processes (openssh-server, installed with apt-get if missing).
sshd:
	infra/ensure_sshd.sh

slurm-up:
	infra/local_slurm.sh up

slurm-down:
	infra/local_slurm.sh down

# JAX's threads and the data loaders' fork() do not mix in one process: tests/jax runs apart.
# TEST_WORKERS pytest-xdist workers share the other tests (tests/conftest.py keeps the ones that
# share the Slurm cluster or the fake TPU VMs on one worker); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install sshd slurm-up
	$(PYTHON) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --ignore=tests/jax
	$(PYTHON) -m pytest -q -ra --durations=5 tests/jax

test-unit: install
	$(PYTHON) -m pytest -q -ra -n $(TEST_WORKERS) -m "not slurm" --ignore=tests/jax

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install slurm-up
	$(PYTHON) benchmarks/help_time.py
	$(PYTHON) benchmarks/submit_cost.py
	$(PYTHON) benchmarks/registry_cost.py
	$(PYTHON) benchmarks/decode_sampling.py
	$(PYTHON) benchmarks/fanout.py
	$(PYTHON) benchmarks/ckpt_staging.py
	$(PYTHON) benchmarks/lmdb_read.py

# A TPU "cloud" on this machine (fake Cloud TPU API + sshd workers + fake-gcs-server), and a 2-host
# Reserve run on it: python -m launcher trainer=reserve backend=tpu_pod site=local_tpu
tpu-demo: install sshd
	infra/local_tpu.sh up
	$(PYTHON) -m launcher trainer=reserve backend=tpu_pod site=local_tpu

clean:
	-infra/local_tpu.sh down
	rm -rf $(VENV) .state runs .pytest_cache
