.PHONY: test build bench

build:
	cargo build --workspace --bins

# The test suite: unit tests, protocol property tests and the integration tests with
# real FUSE mounts and TCP between a primary and a secondary on this machine.
test:
	cargo build --workspace --bins
	cargo test --workspace -- --test-threads=2

bench:
	cargo build --release --workspace --bins
	./target/release/vmha-bench --out bench/results.json
