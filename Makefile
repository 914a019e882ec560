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
	ca-certificates:/etc/ssl/certs/ca-certificates.crt

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

build: deps
	$(CARGO) build --release --locked

demo: build
	$(KILN) build recipes/golden.toml

TEST := $(CARGO) test --release --locked

# Integration test binaries (tests/NAME.rs), in two groups that run side by
# side in `make test`. The shared group builds into one warm store
# ($$KILN_TEST_STORE, default /var/tmp/kiln-test-store) whose base layer
# `cli` builds first, so the cold base is built once; the private group
# builds into stores of its own (cold builds for reproducibility, seeded
# copies for crash and disk-full cases). Every test that builds in the warm
# store is in the shared group: two runs of apt on one store's shared apt
# cache at once would contend for its lock. Inside a binary, tests run one at a
# time: kiln builds are heavy and the machine may have two cores.
TESTS_SHARED  := build lock bad_input drift smoke volumes firmware
TESTS_PRIVATE := record reliability
TESTS_ALL     := cli $(TESTS_SHARED) $(TESTS_PRIVATE)

# The edit-run loop: no boots. `cli` builds golden's base once into the warm
# store (about a minute on a fresh machine), then reuses it.
check: build
	$(TEST) --bins
	$(TEST) --test cli -- --test-threads=1
	$(TEST) --test bad_input -- --test-threads=1 quick_

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

bench: build
	$(CARGO) bench --locked --bench kiln

lint:
	$(CARGO) clippy --release --all-targets --locked -- -D warnings
	$(CARGO) fmt --check

clean:
	$(CARGO) clean
	rm -rf out
