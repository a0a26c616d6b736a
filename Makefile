.PHONY: deps build release test demo demo-fs bench bench-failover

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
