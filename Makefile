# vmfs-crypt: `make test` runs the tests, `make demo` the main job, `make bench` the benchmarks.
# Each target installs what is missing on a fresh Debian machine (run as root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse2 qemu-utils qemu-system-x86 fio botan nasm gocryptfs libssl-dev libfuse3-dev pkg-config gcc python3.11
# libvirt for the libvirt recipe's test (tests/test_host.py), without its recommends (dnsmasq, ...)
APT_NORECOMMENDS := libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
STAMP := $(VENV)/.installed

.PHONY: deps test test-unit demo bench bench-quick bench-guest kms man posix clean install uninstall

deps: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@missing=""; for p in $(APT_NORECOMMENDS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (no recommends):$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test,kmip]'
	touch $(STAMP)

# Everything, with the compiled core; then the data-path tests again on the Python reference
# path (VMFS_CRYPT_NATIVE=0): make test passes with and without the compiled core; then the C
# data-path harness under ThreadSanitizer (about 20 s).
PY_PATH_TESTS := tests/test_xts.py tests/test_format_independent.py tests/test_mount_posix.py tests/test_datapath_mount.py \
  tests/test_safety_fs.py
test: deps
	$(PY) -m pytest -q -p no:cacheprovider tests
	VMFS_CRYPT_NATIVE=0 $(PY) -m pytest -q -p no:cacheprovider $(PY_PATH_TESTS)
	$(MAKE) --no-print-directory test-native-tsan

# The FUSE-free tiers (no mount, no CLI processes, no QEMU, no key server): seconds.
test-unit: deps
	$(PY) -m pytest -q -p no:cacheprovider -m "not cli and not fuse and not qemu and not kmip" tests

demo: deps
	bash scripts/demo.sh

# Benchmarks (issue 13; docs/PERFORMANCE.md, Method). Not part of `make test`. Run at a quiet
# moment: other load makes the figures noise (the scripts warn). BENCH_ARGS passes options on,
# e.g. make bench BENCH_ARGS="--targets vmfs-enc,gocryptfs --rounds 5".
# bench: host fio matrix, qemu-img convert vs LUKS, offline encrypt/rekey/decrypt, online deep rekey, cipher, RSS, KMIP (~28 min)
# bench-quick: the same as a smoke run (1 round, 2 s jobs, 256 MiB; ~6 min); not figures
# bench-guest: fio inside a Debian guest on each target's disk under QEMU (~10 min with KVM, ~25 with TCG)
BENCH_ARGS ?=
bench: deps
	$(PY) scripts/bench.py $(BENCH_ARGS)

bench-quick: deps
	$(PY) scripts/bench.py --quick $(BENCH_ARGS)

bench-guest: deps
	$(PY) scripts/bench_guest.py $(BENCH_ARGS)

kms: deps
	$(PY) scripts/kms.py

# The man page, built from the click commands (scripts/manpage.py): man -l build/vmfs-crypt.1
man: deps
	$(PY) scripts/manpage.py build/vmfs-crypt.1

# pjdfstest (issue 12) through a throw-away mount, in an encrypted and a plain folder: failures by
# category. PJDFSTEST is a checkout you built (README, "POSIX conformance"); about 8 minutes.
PJDFSTEST ?=
posix: deps
	$(PY) scripts/posix.py $(if $(PJDFSTEST),"$(PJDFSTEST)") $(POSIX_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# install (issue 9): a `vmfs-crypt` launcher in $(SBINDIR) that runs this checkout's venv, where
# mount.fuse3 (mount -t fuse.vmfs-crypt, fstab) and systemd find it (mount gives its helpers
# no PATH: /bin/sh's default one has /usr/local/sbin), and the systemd units. DESTDIR works.
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
UNITDIR ?= $(PREFIX)/lib/systemd/system
VMFS_CRYPT_BIN ?= $(CURDIR)/$(VENV)/bin/vmfs-crypt
UNITS := packaging/systemd/vmfs-crypt-agent.service packaging/systemd/vmfs-crypt@.service
install: deps
	@if [ -e $(DESTDIR)$(SBINDIR)/vmfs-crypt ] && ! grep -q 'vmfs-crypt launcher' $(DESTDIR)$(SBINDIR)/vmfs-crypt; then \
	  echo "$(DESTDIR)$(SBINDIR)/vmfs-crypt exists and is not our launcher; not replacing it" >&2; exit 1; fi
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR)
	sed 's#@VMFS_CRYPT@#$(VMFS_CRYPT_BIN)#' packaging/vmfs-crypt.launcher > $(DESTDIR)$(SBINDIR)/vmfs-crypt.tmp
	chmod 755 $(DESTDIR)$(SBINDIR)/vmfs-crypt.tmp && mv $(DESTDIR)$(SBINDIR)/vmfs-crypt.tmp $(DESTDIR)$(SBINDIR)/vmfs-crypt
	for u in $(UNITS); do sed 's#/usr/local/sbin/vmfs-crypt#$(SBINDIR)/vmfs-crypt#' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); done
	install -d -m 700 $(DESTDIR)/etc/vmfs-crypt
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(DESTDIR)$(SBINDIR)/vmfs-crypt (runs $(VMFS_CRYPT_BIN)) and the units in $(DESTDIR)$(UNITDIR)"

uninstall:
	@if grep -q 'vmfs-crypt launcher' $(DESTDIR)$(SBINDIR)/vmfs-crypt 2>/dev/null; then rm -f $(DESTDIR)$(SBINDIR)/vmfs-crypt; fi
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))

# -- native data path (vmfs_crypt._native, native/*.c) ---------------------------------------
# `pip install -e .` builds the extension in place; rebuild it when its sources change.
# test-native-asan: the C harnesses (native/tests) and tests/test_native.py against an
# AddressSanitizer + UBSan build of the extension (a copy of the package in build/native-asan).
NATIVE_ASAN := build/native-asan
NATIVE_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
NATIVE_CC := gcc -std=gnu11 -Wall -Wextra -Werror -Wconversion -Wsign-conversion -Wshadow $(NATIVE_SAN) -Inative
NATIVE_LIBS = $$(pkg-config --libs libcrypto) -lpthread
NIST_XTS = $$($(PY) -c "import cryptography_vectors as v, os; print(os.path.join(os.path.dirname(v.__file__), 'ciphers/AES/XTS/tweak-dataunitseqno/XTSGenAES256.rsp'))")

.PHONY: test-native-asan test-native-tsan

$(STAMP): setup.py $(wildcard native/*.c native/*.h)

test-native-asan: deps
	mkdir -p $(NATIVE_ASAN)
	$(NATIVE_CC) native/tests/test_xts_batch.c native/xts_batch.c -o $(NATIVE_ASAN)/test_xts_batch $(NATIVE_LIBS)
	$(NATIVE_CC) $$(pkg-config --cflags fuse3) native/tests/test_datapath.c native/datapath.c native/xts_batch.c \
	  native/fuse_entry.c -o $(NATIVE_ASAN)/test_datapath $(NATIVE_LIBS)
	$(NATIVE_ASAN)/test_xts_batch $(NIST_XTS)
	$(NATIVE_ASAN)/test_datapath
	@if pkg-config --exists fuse; then \
	  $(NATIVE_CC) $$(pkg-config --cflags fuse) -c native/tests/fuse2_probe.c -o $(NATIVE_ASAN)/fuse2_probe.o && \
	  $(NATIVE_CC) $$(pkg-config --cflags fuse3) native/tests/test_fuse_abi.c $(NATIVE_ASAN)/fuse2_probe.o \
	    native/datapath.c native/xts_batch.c native/fuse_entry.c -o $(NATIVE_ASAN)/test_fuse_abi $(NATIVE_LIBS) && \
	  $(NATIVE_ASAN)/test_fuse_abi; \
	else echo "test_fuse_abi skipped: no libfuse 2 headers (libfuse-dev)"; fi
	rm -rf $(NATIVE_ASAN)/pkg
	VMFS_CRYPT_NATIVE_SANITIZE=1 $(PY) setup.py -q build_ext --force --build-lib $(NATIVE_ASAN)/pkg --build-temp $(NATIVE_ASAN)/obj
	$(PY) -c "import shutil; shutil.copytree('vmfs_crypt', '$(NATIVE_ASAN)/pkg/vmfs_crypt', dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.so', '__pycache__'))"
	@# --capture=sys: a sanitizer report goes to the real stderr (fd capture would swallow it)
	cd $(NATIVE_ASAN)/pkg && PYTHONPATH=$(CURDIR)/$(NATIVE_ASAN)/pkg PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 \
	  LD_PRELOAD=$$(gcc -print-file-name=libasan.so) VMFS_CRYPT_NATIVE_EXPECT=$(CURDIR)/$(NATIVE_ASAN)/pkg \
	  $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider --capture=sys $(CURDIR)/tests/test_native.py

# test-native-tsan: the data-path harness under ThreadSanitizer (the sector-span locks, the
# helper thread for large requests, the hot zone; issue 13); any report fails it.
test-native-tsan:
	mkdir -p $(NATIVE_ASAN)
	gcc -std=gnu11 -Wall -Wextra -Werror -fsanitize=thread -g -O1 -Inative $$(pkg-config --cflags fuse3) \
	  native/tests/test_datapath.c native/datapath.c native/xts_batch.c native/fuse_entry.c \
	  -o $(NATIVE_ASAN)/test_datapath_tsan $(NATIVE_LIBS)
	TSAN_OPTIONS=halt_on_error=1 $(NATIVE_ASAN)/test_datapath_tsan
