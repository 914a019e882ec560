# kiln — two entry points for a fresh Debian machine, as root:
#   make demo   install what is missing, build kiln, build and boot recipes/golden.toml
#   make test   install what is missing, run every test
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

.PHONY: all deps build demo test unit bench lint clean

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

# Unit tests need no root and no tools; the integration tests (tests/*.rs)
# run the real tools, share one warm store, and run one at a time.
test: build
	$(CARGO) test --release --locked --bins
	$(CARGO) test --release --locked --tests -- --test-threads=1

unit:
	$(CARGO) test --locked --bins

bench: build
	$(CARGO) bench --locked --bench kiln

lint:
	$(CARGO) clippy --all-targets --locked -- -D warnings

clean:
	$(CARGO) clean
	rm -rf out
