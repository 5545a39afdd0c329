# Two entry points for a fresh machine (Python 3.11):
#   make demo  - create .venv, train the Keras example, preempt it (SIGTERM), rerun it (it resumes),
#                chain a second job from its read-only output, list the checkpoints
#   make test  - create .venv, .venv-tf215 and .venv-jax, run the whole test suite in them
#   make bench - the benchmark table of docs/benchmarks.md (~10 min; not part of `make test`)
PYTHON ?= python3
VENV ?= .venv
VENV_TF215 ?= .venv-tf215
VENV_JAX ?= .venv-jax
# Exact pins for the test environments: torch==2.13.0 has a CPU wheel on these machines (an open
# range would pull a multi-GB CUDA build), and tensorflow-cpu must never meet `tensorflow`.
MAIN_PINS = tensorflow-cpu==2.21.0 torch==2.13.0 "keras>=3.15,<3.16" "h5py<3.15"
TF215_PINS = tensorflow==2.15.1 tensorflow-estimator==2.15.0 keras==2.15.0
# The Keras front-end on the jax backend, with neither TensorFlow nor torch installed.
JAX_PINS = "jax[cpu]==0.10.2" "keras>=3.15,<3.16" "h5py<3.15"
# Most of the suite's time is subprocesses importing a framework and training (crash, preemption,
# docs and example tests): two pytest workers keep both cores busy, each test file on one worker
# (a document's blocks in tests/test_docs.py build on each other). PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
KERAS_TESTS = tests/test_keras.py tests/test_kerasio.py tests/test_keras_peer.py \
	tests/test_compat_keras.py tests/test_keras_crash.py tests/test_callbacks_state.py \
	tests/test_fastforward.py tests/test_restore.py tests/test_async_save.py

.PHONY: demo test test-main test-estimator test-jax lint bench clean

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

$(VENV_JAX)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_JAX)
	$(VENV_JAX)/bin/pip install --quiet --upgrade pip
	$(VENV_JAX)/bin/pip install --quiet $(JAX_PINS) -e ".[keras,dev]"
	@# The point of this environment: nothing may pull TensorFlow or torch in behind our back.
	$(VENV_JAX)/bin/python -c "import importlib.util as u, sys; \
		sys.exit([m for m in ('tensorflow', 'torch') if u.find_spec(m)] or None)"
	touch $@

demo: $(VENV)/.installed
	@# Job 2 leaves runs/demo read-only only while it runs; an interrupted demo may not undo it.
	[ ! -d runs/demo ] || chmod -R u+w runs/demo
	rm -rf runs/demo runs/demo-next
	@echo "== job 1: 6 epochs, preempted (SIGTERM) after epoch 3"
	$(VENV)/bin/python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --stop-after-epoch 3 \
		|| echo "== job 1 ended with exit status $$? (SIGTERM: the simulated preemption)"
	@echo "== job 1 restarted by the scheduler with the same command: continues at epoch 4"
	$(VENV)/bin/python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --stop-after-epoch 3
	@echo "== job 2 of a chain: starts from runs/demo (made read-only), writes runs/demo-next"
	chmod -R a-w runs/demo
	$(VENV)/bin/python examples/keras_mnist_cnn.py --output runs/demo-next --epochs 8 \
		--resume-from runs/demo; status=$$?; chmod -R u+w runs/demo; exit $$status

test: test-main test-estimator test-jax

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not estimator" tests

test-estimator: $(VENV_TF215)/.installed
	$(VENV_TF215)/bin/python -m pytest -q -m estimator -p no:cacheprovider tests/test_estimator.py tests/test_docs.py \
		tests/test_preemption.py tests/test_examples.py

test-jax: $(VENV_JAX)/.installed
	KERAS_BACKEND=jax $(VENV_JAX)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -p no:cacheprovider $(KERAS_TESTS)

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check keras_ckpt tests examples benchmarks

clean:
	rm -rf $(VENV) $(VENV_TF215) $(VENV_JAX) runs
