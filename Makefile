# kiln — entry points for a fresh Debian machine, as root:
#   make demo   install what is missing, build kiln, build and boot recipes/golden.toml
#   make check  the edit-run loop: unit tests, CLI output snapshots, every
#               bad-input case that needs no build (no boots; minutes)
#   make test   install what is missing, run every test (CI runs this and make lint)
# Also: make deps, make build, make bench, make lint.

CARGO ?= cargo
KILN  := target/release/kiln

# Debian package : a file it provides. `make deps` installs the packages
# whose file is missing, with one `apt-get update` first.
DEPS := \
	cryptsetup-bin:/usr/sbin/veritysetup \
	mmdebstrap:/usr/bin/mmdebstrap \
	e2fsprogs:/usr/sbin/mke2fs \
	e2fsprogs:/usr/sbin/debugfs \
	fdisk:/usr/sbin/sfdisk \
	mtools:/usr/bin/mcopy \
	dosfstools:/usr/sbin/mkfs.fat \
	binutils:/usr/bin/objcopy \
	systemd-boot-efi:/usr/lib/systemd/boot/efi/linuxx64.efi.stub \
	ovmf:/usr/share/OVMF/OVMF_CODE_4M.fd \
	qemu-system-x86:/usr/bin/qemu-system-x86_64 \
	qemu-utils:/usr/bin/qemu-img \
	dpkg-dev:/usr/bin/dpkg-scanpackages \
	apt-utils:/usr/bin/apt-ftparchive \
	ca-certificates:/etc/ssl/certs/ca-certificates.crt \
	sbsigntool:/usr/bin/sbsign \
	openssl:/usr/bin/openssl \
	skopeo:/usr/bin/skopeo \
	tar:/usr/bin/tar \
	zstd:/usr/bin/zstd \
	docker-registry:/usr/bin/docker-registry \
	apache2-utils:/usr/bin/htpasswd \
	openssh-client:/usr/bin/ssh \
	openssh-client:/usr/bin/ssh-keygen \
	python3-venv:/usr/lib/python3.11/ensurepip/__init__.py \
	python3-pip:/usr/lib/python3/dist-packages/pip/__init__.py

# Python tools from PyPI that Debian 12 does not package, in one venv made
# with Debian's own python3 (a python3 earlier on PATH, e.g. pyenv's, is not
# used): virt-fw-vars enrolls a Secure Boot certificate into a throwaway
# OVMF VARS copy (kiln looks for it on PATH, then here), securesystemslib is
# the independent DSSE verifier the signing tests check kiln against.
PYTOOLS     := /opt/kiln/venv
PYTOOLS_REQ := securesystemslib[crypto]==1.6.0 virt-firmware==26.10

.PHONY: all deps build demo check test test-groups test-shared test-private test-files unit bench lint clean

all: build

# qemu-system-x86 and qemu-utils must come from the same release: a newer
# qemu-utils (e.g. from backports) breaks qemu-system-common, so when QEMU is
# missing both are installed together, pinned to the host's own release.
deps:
	@missing=""; \
	for pair in $(DEPS); do \
		pkg=$${pair%%:*}; file=$${pair#*:}; \
		[ -e "$$file" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		. /etc/os-release; \
		case "$$missing" in *qemu-system-x86*|*qemu-utils*) \
			missing="$$(echo $$missing | tr ' ' '\n' | grep -v '^qemu-' | sort -u | tr '\n' ' ') qemu-system-x86 qemu-utils/$$VERSION_CODENAME";; esac; \
		echo "make deps: installing$$missing"; \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades $$missing; \
	else \
		echo "make deps: every package kiln needs is installed"; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "make deps: cargo (Rust) is required; install it with rustup"; exit 1; }
	@if [ -x $(PYTOOLS)/bin/virt-fw-vars ] && [ -x $(PYTOOLS)/bin/python ] \
		&& $(PYTOOLS)/bin/python -c 'import securesystemslib.signer' 2>/dev/null; then \
		echo "make deps: Python tools are installed in $(PYTOOLS)"; \
	else \
		echo "make deps: installing Python tools into $(PYTOOLS): $(PYTOOLS_REQ)"; \
		rm -rf $(PYTOOLS) && /usr/bin/python3 -m venv $(PYTOOLS) && \
		$(PYTOOLS)/bin/pip install -q --disable-pip-version-check $(PYTOOLS_REQ); \
	fi

build: deps
	$(CARGO) build --release --locked

demo: build
	$(KILN) build recipes/golden.toml

TEST := $(CARGO) test --release --locked

# Integration test binaries (tests/NAME.rs), in two lanes that run side by
# side in `make test`, each one binary at a time (inside a binary, tests run
# one at a time: kiln builds are heavy and the machine may have two cores).
# Most tests build into one warm store ($$KILN_TEST_STORE, default
# /var/tmp/kiln-test-store) whose base layer `cli` builds first, so the cold
# base is built once; record and reliability build into stores of their own
# (cold builds for reproducibility, seeded copies for crash and disk-full
# cases). Both lanes may use the warm store at once: kiln's per-entry locks
# and its lock on the store's apt caches make concurrent runs wait rather
# than collide. The lanes are balanced by measured time (README, Testing).
TESTS_SHARED  := build lock bad_input smoke firmware sign access remote fleet
TESTS_PRIVATE := record reliability secure_boot volumes drift sealed formats
TESTS_ALL     := cli $(TESTS_SHARED) $(TESTS_PRIVATE)

# The edit-run loop: no boots. `cli` builds golden's base once into the warm
# store (about a minute on a fresh machine), then reuses it.
check: build
	$(TEST) --bins
	$(TEST) --test cli -- --test-threads=1
	$(TEST) --test bad_input -- --test-threads=1 quick_
	$(TEST) --test sign -- --test-threads=1 quick_
	$(TEST) --test remote -- --test-threads=1 quick_
	$(TEST) --test access -- --test-threads=1 quick_
	$(TEST) --test fleet -- --test-threads=1 quick_

# Everything, for CI.
test: build test-files
	$(TEST) --bins
	$(TEST) --tests --no-run
	$(TEST) --test cli -- --test-threads=1
	$(MAKE) --no-print-directory -j2 --output-sync=target test-groups

test-groups: test-shared test-private

test-shared:
	@for t in $(TESTS_SHARED); do \
		echo "== tests/$$t.rs"; \
		$(TEST) --test $$t -- --test-threads=1 || exit 1; \
	done

test-private:
	@for t in $(TESTS_PRIVATE); do \
		echo "== tests/$$t.rs"; \
		$(TEST) --test $$t -- --test-threads=1 || exit 1; \
	done

# A test file that no group names would never run: refuse it.
test-files:
	@for f in tests/*.rs; do \
		t=$$(basename $$f .rs); \
		case " $(TESTS_ALL) " in *" $$t "*) ;; \
		*) echo "make: $$f is in no test group; add it to TESTS_SHARED or TESTS_PRIVATE in the Makefile"; exit 1;; esac; \
	done

unit:
	$(CARGO) test --locked --bins

# kiln as it was when issue 15 was filed (the last commit of the first
# round: the kiln its "kiln now" column measured), for the bench's "before"
# column (group `speed`): built once from git into the bench's directory.
# Until 2026-12-01 evening this was 1a16b85, kiln after issue 10's work.
BENCH_DIR     ?= /var/tmp/kiln-bench
BEFORE_COMMIT := 880baec
BEFORE_KILN   := $(BENCH_DIR)/before-$(BEFORE_COMMIT)/target/release/kiln

bench: build $(BEFORE_KILN)
	KILN_BENCH_DIR=$(BENCH_DIR) KILN_BENCH_BEFORE=$(BEFORE_KILN) $(CARGO) bench --locked --bench kiln

$(BEFORE_KILN):
	rm -rf $(BENCH_DIR)/before-$(BEFORE_COMMIT)
	mkdir -p $(BENCH_DIR)/before-$(BEFORE_COMMIT)
	git archive $(BEFORE_COMMIT) | tar -x -C $(BENCH_DIR)/before-$(BEFORE_COMMIT)
	cd $(BENCH_DIR)/before-$(BEFORE_COMMIT) && $(CARGO) build --release --locked

lint:
	$(CARGO) clippy --release --all-targets --locked -- -D warnings
	$(CARGO) fmt --check

clean:
	$(CARGO) clean
	rm -rf out
