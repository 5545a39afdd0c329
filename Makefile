# Two entry points for a fresh machine (Python 3.11):
#   make demo  - create .venv, train the Keras example, interrupt it, resume it, list the checkpoints
#   make test  - create .venv and .venv-tf215, run the whole test suite in both
PYTHON ?= python3
VENV ?= .venv
VENV_TF215 ?= .venv-tf215
# Exact pins for the test environments: torch==2.13.0 has a CPU wheel on these machines (an open
# range would pull a multi-GB CUDA build), and tensorflow-cpu must never meet `tensorflow`.
MAIN_PINS = tensorflow-cpu==2.21.0 torch==2.13.0 "keras>=3.15,<3.16" "h5py<3.15"
TF215_PINS = tensorflow==2.15.1 tensorflow-estimator==2.15.0 keras==2.15.0

.PHONY: demo test test-main test-estimator lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(MAIN_PINS) -e ".[keras,torch,dev]"
	touch $@

$(VENV_TF215)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TF215)
	$(VENV_TF215)/bin/pip install --quiet --upgrade pip
	$(VENV_TF215)/bin/pip install --quiet $(TF215_PINS) "pytest>=7" "scikit-learn>=1.3" -e .
	touch $@

demo: $(VENV)/.installed
	rm -rf runs/demo
	@echo "== run 1: 6 epochs requested, preempted after epoch 3"
	$(VENV)/bin/python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --stop-after-epoch 3 \
		|| echo "== run 1 died with exit code $$? (the simulated preemption)"
	@echo "== run 2: same command with --resume: continues at epoch 4"
	$(VENV)/bin/python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --resume
	@echo "== what is kept"
	$(VENV)/bin/keras-ckpt ls runs/demo

test: test-main test-estimator

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not estimator" tests

test-estimator: $(VENV_TF215)/.installed
	$(VENV_TF215)/bin/python -m pytest -q -m estimator -p no:cacheprovider tests/test_estimator.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check keras_ckpt tests examples benchmarks

clean:
	rm -rf $(VENV) $(VENV_TF215) runs
