# vmfs-crypt: `make test` runs the tests, `make demo` the main job, `make bench` the benchmarks.
# Each target installs what is missing on a fresh Debian machine (run as root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse2 qemu-utils qemu-system-x86 fio botan nasm gocryptfs
STAMP := $(VENV)/.installed

.PHONY: deps test test-unit demo bench kms clean

deps: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test,kmip]'
	touch $(STAMP)

test: deps
	$(PY) -m pytest -q -p no:cacheprovider tests

# The FUSE-free tiers (no mount, no CLI processes, no QEMU, no key server): seconds.
test-unit: deps
	$(PY) -m pytest -q -p no:cacheprovider -m "not cli and not fuse and not qemu and not kmip" tests

demo: deps
	bash scripts/demo.sh

bench: deps
	$(PY) scripts/bench.py

kms: deps
	$(PY) scripts/kms.py

clean:
	rm -rf $(VENV) build *.egg-info
