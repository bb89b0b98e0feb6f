# walcast: `make` builds the extension; `make demo` and `make test` install what
# they need first (scripts/install-deps.sh), so both work on a fresh machine.

EXT      := target/release/libwalcast.so
PYTHON   := /usr/bin/python3
CARGO    ?= cargo

.PHONY: all build deps test-deps bench-deps demo test test-unit test-integration test-big test-crash-long torture bench clean

all: build

build: $(EXT)

$(EXT): Cargo.toml $(wildcard src/*.rs)
	$(CARGO) build --release

deps:
	bash scripts/install-deps.sh

test-deps:
	WALCAST_NEED_PYTEST=1 bash scripts/install-deps.sh

demo: deps build
	bash scripts/demo.sh

test: test-deps build test-unit test-integration

test-unit:
	$(CARGO) test --release --lib

test-integration: build
	$(PYTHON) -m pytest -q tests

# The 1 GiB transaction: capture and restore stream it; the test checks the
# restored file and the capture thread's peak memory.
test-big: test-deps build
	WALCAST_BIG_MB=1100 WALCAST_REPLICA_BIG_MB=1100 $(PYTHON) -m pytest -q tests/test_big_transaction.py tests/test_replica.py -k big

# A longer kill -9 run than `make test` does (200 crashes of a lone writer, 100
# of one of two concurrent writers).
test-crash-long: test-deps build
	WALCAST_CRASH_ITERATIONS=200 $(PYTHON) -m pytest -q tests/test_crash.py

# Crash torture at full size (tests/test_torture.py): 200 kill -9 of the
# primary's writer (also its publisher) and 200 of the replica's applier, with
# readers checking invariants throughout; `make test` runs 4 of each. Figures go
# to torture-report.jsonl, a failing run's files to torture-failures/.
TORTURE_ITERATIONS ?= 200
torture: test-deps build
	WALCAST_TORTURE_ITERATIONS=$(TORTURE_ITERATIONS) WALCAST_TORTURE_REPORT=torture-report.jsonl \
		$(PYTHON) -m pytest -q -s tests/test_torture.py

# The benchmark harness at full scale (BENCH_SCALE=full; about 20 minutes on 2
# cores): writes BENCHMARKS.md and BENCHMARKS-lag.png at the repository root.
# scripts/bench.py --help lists its options; BENCH_SCALE=smoke runs tiny sizes.
bench: bench-deps build
	$(PYTHON) scripts/bench.py --scale $(or $(BENCH_SCALE),full) --out BENCHMARKS.md

# What the benchmarks need on top of deps: matplotlib for the lag plot.
bench-deps:
	WALCAST_NEED_BENCH=1 bash scripts/install-deps.sh

clean:
	$(CARGO) clean
