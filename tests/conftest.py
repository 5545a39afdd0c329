import importlib.util
import os

# Keras picks its backend once per process, at import. Without KERAS_BACKEND the tests (and the
# jobs they start, which inherit it) run the first installed one: TensorFlow in the main
# environment, JAX in the jax-only one (`make test-jax` also sets it explicitly).
if "KERAS_BACKEND" not in os.environ:
    _installed = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None]
    os.environ["KERAS_BACKEND"] = _installed[0] if _installed else "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
