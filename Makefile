.PHONY: deps build release test demo demo-fs bench bench-failover deb

deps:
	.ci/install-deps

build:
	cargo build --workspace --bins

release:
	cargo build --release --workspace --bins

# The test suite: unit tests, protocol property tests and the integration tests with
# real FUSE mounts and TCP between a primary and a secondary on this machine.
test: deps build
	cargo test --workspace -- --test-threads=2

# Two simulated nodes (namespaces, own libvirtd), vmhad on both, the counter
# guest on node1 replicated to node2; node1 crashes, node2 boots it without
# losing an acknowledged write (scripts/demo.sh).
demo: deps build
	scripts/demo.sh

# The replicated filesystem alone: primary + secondary over loopback.
demo-fs: deps release
	VMHA_FS_BIN=target/release/vmha-fs scripts/demo-fs.sh

bench: deps release
	./target/release/vmha-bench fio --out bench/results.json

# Failover time after a node crash (5 runs) and false failovers while fio
# saturates the tc-shaped replication link for 60 s (production link up, then
# down), with DESIGN.md's default timeouts; prints the tables.
bench-failover: deps release
	./target/release/vmha-bench failover --out bench/results-failover.json

# Incremental resync of 1 % and 10 % of a 4 GiB image vs the full copy vs
# `rsync --inplace --no-whole-file`, over a veth shaped to 1 Gbit/s (receiver in a
# network namespace); needs ~13 GiB free in /var/tmp. Results: bench/RESULTS.md.
.PHONY: bench-resync
bench-resync: deps release
	./target/release/vmha-bench-resync --out bench/results-resync.json

# The floor of a durable 4k write kept on two copies of this one disk, without
# FUSE, network or vmha (issue 11): write both copies, then sync both, in
# lockstep, against one copy; three rounds, patterns alternated.
.PHONY: bench-durable-floor
bench-durable-floor: deps release
	./target/release/vmha-bench durable-floor --out bench/results-durable-floor.json

# 32 modules on the two simulated nodes (idle QEMU domains, a writer thread per
# module), vmhad's default timing (200 ms heartbeats): idle CPU (three windows),
# memory, threads and packets per module; then node1 crashes and every module
# fails over at once (kill -> ALONE, kill -> writes again, kill -> VM started).
.PHONY: bench-scale
bench-scale: deps release
	./target/release/vmha-bench scale --out bench/results-scale.json

# Debian package target/vmha_<version>-1_amd64.deb (cargo-deb): the three
# binaries, the systemd units, /etc/vmha/vmha.toml (commented example), man
# pages and bash/zsh completions generated from the binaries' clap definitions
# (`BINARY --generate-docs DIR`), logrotate for the event logs. Release build
# by default; CI packs the debug binaries it already built:
# `make deb DEB_PROFILE=dev DEB_FLAGS="--fast --strip"`.
DEB_PROFILE ?= release
DEB_FLAGS ?=
DEB_BIN_DIR = target/$(if $(filter dev,$(DEB_PROFILE)),debug,$(DEB_PROFILE))
deb: deps
	cargo build --profile $(DEB_PROFILE) -p vmha-fs -p vmha-controller -p vmctl --bins
	rm -rf $(DEB_BIN_DIR)/vmha-docs target/vmha_*.deb
	for bin in vmhad vmha-fs vmctl; do $(DEB_BIN_DIR)/$$bin --generate-docs $(DEB_BIN_DIR)/vmha-docs || exit 1; done
	gzip -9n $(DEB_BIN_DIR)/vmha-docs/man/*.1
	cargo deb -p vmha-controller --no-build --profile $(DEB_PROFILE) $(DEB_FLAGS) -o target/

# Issue 12 items 3 and 4: a million small files (created in the backing dir before
# the mount, both nodes on an 8 GiB sparse XFS loop image with 1 KiB blocks, deleted
# afterwards: first write, full sync, 1 % changed while the peer is down,
# reintegration, verify, VmHWM and open descriptors) and a 2 TiB sparse image
# (2 GiB spread over it, 1 % of that rewritten degraded, dirty-map/activity-log
# memory, reintegration). Needs ~4 GB free in /var/tmp.
.PHONY: bench-files bench-bigimage
bench-files: deps release
	./target/release/vmha-bench-bigdata --out bench/results-files-1m.json files --count 1000000 --xfs-gib 8
# Item 4: a 2 TiB sparse image, the same writes on a 16 GiB one (memory does not
# follow the image size), an 8 GiB filled image (needs 31 GiB free: two copies +
# 15 GiB kept free; deleted afterwards).
bench-bigimage: deps release
	./target/release/vmha-bench-bigdata --out bench/results-sparse-2t.json sparse --size-gib 2048 --written-mib 2048
	./target/release/vmha-bench-bigdata --out bench/results-sparse-16g.json sparse --size-gib 16 --written-mib 2048
	./target/release/vmha-bench-bigdata --out bench/results-filled-8g.json filled --size-gib 8

# Guest downtime of a swap, live vs stop/start, 5 runs each, on two simulated
# nodes running the counter guest (needs root). Results: bench/RESULTS.md.
.PHONY: bench-swap
bench-swap: deps release
	./target/release/vmha-bench swap --out bench/results-swap.json
