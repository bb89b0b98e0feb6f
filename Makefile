# walcast: `make` builds the extension; `make demo` and `make test` install what
# they need first (scripts/install-deps.sh), so both work on a fresh machine.

EXT      := target/release/libwalcast.so
PYTHON   := /usr/bin/python3
CARGO    ?= cargo

.PHONY: all build deps test-deps bench-deps fuzz-deps fuzz fuzz-seeds demo test test-unit test-integration test-big test-crash-long test-resource-faults-long netfaults torture bench clean

all: build

build: $(EXT)

$(EXT): Cargo.toml $(wildcard src/*.rs) vendor/nng-sys/nng/src/core/listener.c
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
	$(PYTHON) -m pytest -q --tb=short -rf tests

# The 1 GiB transaction: capture and restore stream it; the test checks the
# restored file and the capture thread's peak memory.
test-big: test-deps build
	WALCAST_BIG_MB=1100 WALCAST_REPLICA_BIG_MB=1100 $(PYTHON) -m pytest -q tests/test_big_transaction.py tests/test_replica.py -k big

# A longer kill -9 run than `make test` does (200 crashes of a lone writer, 100
# of one of two concurrent writers).
test-crash-long: test-deps build
	WALCAST_CRASH_ITERATIONS=200 $(PYTHON) -m pytest -q tests/test_crash.py

# Intermittent torn I/O errors on the primary's log, 20 times over (`make test`
# runs it once, with the other resource-fault tests).
test-resource-faults-long: test-deps build
	WALCAST_RESFAULT_ROUNDS=20 $(PYTHON) -m pytest -q tests/test_resource_faults.py -k intermittent

# Replication through a faulty network (tests/relay.py) for longer than `make
# test` does: 5 minutes of 10% loss + 0.1% corruption (and dup, reorder, delay,
# truncation) with a link cut every 45 s, then 5 cuts and 5 partitions of 7 s.
# The test's WALCAST_NETFAULTS_* variables override these (see its docstring).
netfaults: test-deps build
	WALCAST_NETFAULTS_SECONDS=$(or $(WALCAST_NETFAULTS_SECONDS),300) \
	WALCAST_NETFAULTS_CUT_EVERY=$(or $(WALCAST_NETFAULTS_CUT_EVERY),45) \
	WALCAST_NETFAULTS_CUTS=$(or $(WALCAST_NETFAULTS_CUTS),5) \
	$(PYTHON) -m pytest -q -s tests/test_network_faults.py

# Crash torture at full size (tests/test_torture.py): 200 kill -9 of the
# primary's writer (also its publisher) and 200 of the replica's applier, with
# readers checking invariants throughout; `make test` runs 4 of each. Figures go
# to torture-report.jsonl, a failing run's files to torture-failures/.
TORTURE_ITERATIONS ?= 200
# The primary's log is first grown to this many GB: restarts then face a long log.
TORTURE_LOG_GB ?= 5
torture: test-deps build
	WALCAST_TORTURE_ITERATIONS=$(TORTURE_ITERATIONS) WALCAST_TORTURE_LOG_GB=$(TORTURE_LOG_GB) \
		WALCAST_TORTURE_REPORT=torture-report.jsonl \
		$(PYTHON) -m pytest -q -s tests/test_torture.py

# The benchmark harness at full scale (BENCH_SCALE=full; about 20 minutes on 2
# cores): writes BENCHMARKS.md and BENCHMARKS-lag.png at the repository root.
# scripts/bench.py --help lists its options; BENCH_SCALE=smoke runs tiny sizes.
bench: bench-deps build
	$(PYTHON) scripts/bench.py --scale $(or $(BENCH_SCALE),full) --out BENCHMARKS.md

# What the benchmarks need on top of deps: matplotlib for the lag plot.
bench-deps:
	WALCAST_NEED_BENCH=1 bash scripts/install-deps.sh

# The fuzz targets in fuzz/ (a separate cargo workspace, never built by `make
# test`), each run for FUZZ_SECONDS (default 300) on fresh seeds plus whatever
# corpus earlier runs left in fuzz/corpus/. Stable Rust is enough:
# RUSTC_BOOTSTRAP=1 lets it take the sanitizer flags cargo-fuzz passes.
# FUZZ_TARGETS picks targets; FUZZ_SANITIZER=none builds without ASan (faster).
# A crash stops the run; its input is in fuzz/artifacts/<target>/.
FUZZ_SECONDS   ?= 300
FUZZ_TARGETS   ?= wire_decode frame_header log_scan log_tail catchup_request catchup_index catchup_damaged_log replica_stream seal_open
FUZZ_SANITIZER ?= address
FUZZ_ENV       := RUSTC_BOOTSTRAP=1

fuzz: fuzz-deps fuzz-seeds
	for t in $(FUZZ_TARGETS); do \
	  (cd fuzz && $(FUZZ_ENV) $(CARGO) fuzz run --sanitizer $(FUZZ_SANITIZER) $$t -- \
	     -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10) || exit 1; \
	done

# Seed inputs (real messages and log files) for every target, in fuzz/corpus/,
# and the inputs of every crash found so far (fuzz/regressions/<target>/).
fuzz-seeds:
	cd fuzz && $(CARGO) run --release --bin make_seeds -- corpus && cp -r regressions/. corpus/

fuzz-deps:
	WALCAST_NEED_FUZZ=1 bash scripts/install-deps.sh

clean:
	$(CARGO) clean
