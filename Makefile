.PHONY: deps build release test demo bench

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

demo: deps release
	VMHA_FS_BIN=target/release/vmha-fs scripts/demo-fs.sh

bench: deps release
	./target/release/vmha-bench fio --out bench/results.json
