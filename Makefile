# `make test` and `make demo` set everything up themselves: a local virtual environment in .venv,
# the CPU build of torch pinned below, the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv nginx chromium test demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Debian's nginx for the load-balancer tests: the system's, or the package unpacked into .venv (no root, no service).
NGINX_LOCAL := $(VENV)/nginx/usr/sbin/nginx
nginx: venv
	@command -v nginx >/dev/null 2>&1 || test -x $(NGINX_LOCAL) || ( mkdir -p $(VENV)/nginx && cd $(VENV)/nginx && \
	  { apt-get download nginx 2>/dev/null || { apt-get update -qq && apt-get download nginx; }; } && \
	  dpkg -x nginx_*.deb . && rm -f nginx_*.deb )

# Debian's Chromium and its WebDriver for the web app's browser tests (no browser download), and Mesa's EGL, which
# VTK renders the views with off-screen. Installed as root (CI); elsewhere the browser tests say what is missing.
BROWSER_PKGS := chromium chromium-driver libegl1 libegl-mesa0 libgl1-mesa-dri
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; }; \
	  else echo "make chromium: not root; install Debian's $(BROWSER_PKGS) for the browser tests"; fi

test: venv nginx chromium
	$(PY) -m pytest -q Testing

# The shipped default model segments the shipped sample data from simulated clicks (labelmaps, PNG, JSON in out/demo).
demo: venv
	$(PY) -m MemorizingSAMLib.cli demo --out out/demo

lint: venv
	$(VENV)/bin/ruff check MemorizingSAMLib MemorizingSAM Testing benchmarks scripts
	$(VENV)/bin/ruff format --check MemorizingSAMLib MemorizingSAM Testing benchmarks scripts

bench: venv
	$(PY) benchmarks/bench_models.py --json

clean:
	rm -rf $(VENV) build *.egg-info
