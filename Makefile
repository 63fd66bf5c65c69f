# The two set-up commands of README.md: `make run` and `make test`.
# Both install the Debian packages the project needs (idempotently), configure and build.

BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
GOLDEN_DIR ?= $(abspath ../shared/golden)
CMAKE_FLAGS ?=
RUN_FLAGS ?=

.PHONY: all deps configure build test test-gcc build-asan build-tsan run bench benchmarks fuzz clean train-demo soak \
  test-sanitize test-asan test-tsan

all: build

deps:
	@scripts/install_deps.sh

$(BUILD_DIR)/build.ninja: | deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
	  -DDS_GOLDEN_DIR=$(GOLDEN_DIR) $(CMAKE_FLAGS)

configure: deps $(BUILD_DIR)/build.ninja

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# The README's test command and CI's (.ci/run): the whole suite in the gcc -O3 build (~9 min on
# 2 cores after its build), then the concurrency tests under ThreadSanitizer (test-tsan: 126
# tests, ~4 min; its clang build ~11 min when ccache cannot help, see below). The whole suite
# under AddressSanitizer + UndefinedBehaviorSanitizer is `make test-asan` (695 tests, ~21 min,
# plus a ~36 min build on a checkout ccache has not seen): not in CI yet. The precompiled headers
# (and, for clang, CMake's -Xclang -include <absolute path> flag) carry the build tree's absolute
# path, so ccache cannot reuse a build for a checkout at another path; there every tree builds
# cold (gcc ~39, ASan ~36, TSan ~11 min) and, with the ASan suite, CI would need 1.5-2 hours.
test: test-gcc
	$(MAKE) test-tsan

# The suite in the gcc build only (no sanitizer build): the quick loop while developing.
test-gcc: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# Serves the embedded default model on :50051 (metrics on :9464) until Ctrl-C / SIGTERM.
# Extra server flags: make run RUN_FLAGS="--port=6000 --log_format=json".
run: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target diffusion-server
	$(BUILD_DIR)/server/diffusion-server $(RUN_FLAGS)

# Retrains the embedded default (flux-tiny, its circles->stars LoRA, the quality test's shape
# classifier) with tools/train and installs the results in models/flux/demo/ (about 20 minutes on 2
# cores; keep the machine otherwise idle). Extra flags: make train-demo TRAIN_FLAGS="--seed=1".
TRAIN_FLAGS ?=
train-demo: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target train-flux-tiny
	rm -rf $(BUILD_DIR)/train-demo
	$(BUILD_DIR)/tools/train/train-flux-tiny --out=$(BUILD_DIR)/train-demo $(TRAIN_FLAGS)
	DS_FLUX_TINY_EVAL_DIR=$(abspath $(BUILD_DIR))/train-demo \
	  cmake --build $(BUILD_DIR) -j $(JOBS) --target flux_tiny_quality_test
	DS_FLUX_TINY_EVAL_DIR=$(abspath $(BUILD_DIR))/train-demo $(BUILD_DIR)/tools/train/flux_tiny_quality_test
	rm -rf models/flux/demo/flux-tiny
	cp -r $(BUILD_DIR)/train-demo/flux-tiny models/flux/demo/flux-tiny
	cp $(BUILD_DIR)/train-demo/flux-tiny-stars.safetensors \
	  $(BUILD_DIR)/train-demo/shape-classifier.safetensors \
	  $(BUILD_DIR)/train-demo/training-report.json models/flux/demo/

# The benchmark suite: every performance figure next to its same-run reference, written to
# BENCHMARKS.md (machine, command, tables). Extra flags: make benchmarks BENCH_FLAGS="--threads=1".
BENCH_FLAGS ?=
benchmarks: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target benchmarks
	$(BUILD_DIR)/bench/benchmarks --report=BENCHMARKS.md $(BENCH_FLAGS)

# The detailed per-area benchmark binaries (each prints its own breakdown).
bench: build
	$(BUILD_DIR)/bench/flux_forward_bench
	$(BUILD_DIR)/bench/safetensors_mmap_bench
	$(BUILD_DIR)/bench/single_file_bench
	$(BUILD_DIR)/bench/lora_bench
	$(BUILD_DIR)/bench/pipeline_bench
	$(BUILD_DIR)/bench/server_bench
	$(BUILD_DIR)/bench/adapter_store_bench
	$(BUILD_DIR)/bench/cache_bench
	$(BUILD_DIR)/bench/layerwise_casting_bench

# Soak test (tests/soak_test.cc): the real server under mixed traffic (Generate with random adapter
# stacks, LoadLoRA/UnloadLoRA churn, metadata calls, deliberate bad requests) for SOAK_SECONDS;
# fails on RSS drift > 5% after warm-up, fd growth > 2 or any unexpected error.
SOAK_SECONDS ?= 600
soak: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target soak_test diffusion-server
	DS_SOAK_SECONDS=$(SOAK_SECONDS) OMP_NUM_THREADS=1 $(BUILD_DIR)/tests/soak_test

# Sanitizer suites (clang; cmake/sanitizers.cmake, run-time options and third-party suppressions in
# sanitizers/): the whole test suite under AddressSanitizer + UndefinedBehaviorSanitizer, with
# the bounded libFuzzer runs of fuzz/ (label `fuzz`), then the tests labelled `concurrency` under
# ThreadSanitizer. `make test` runs the second.
ASAN_DIR ?= build-asan
TSAN_DIR ?= build-tsan
SAN_CONFIGURE = CC=clang CXX=clang++ cmake -S . -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS_RELEASE=-O1 -DDS_GOLDEN_DIR=$(GOLDEN_DIR) $(CMAKE_FLAGS)
SAN_ENV = ASAN_OPTIONS=$(shell cat sanitizers/asan.options) \
  UBSAN_OPTIONS=$(shell cat sanitizers/ubsan.options) \
  LSAN_OPTIONS=suppressions=$(abspath sanitizers/lsan.supp):print_suppressions=0 \
  TSAN_OPTIONS=$(shell cat sanitizers/tsan.options):suppressions=$(abspath sanitizers/tsan.supp)
test-sanitize: test-asan test-tsan
build-asan: deps
	$(SAN_CONFIGURE) -B $(ASAN_DIR) -DDS_SANITIZE=address
	cmake --build $(ASAN_DIR) -j $(JOBS)
test-asan: build-asan
	cd $(ASAN_DIR) && $(SAN_ENV) ctest --output-on-failure -j $(JOBS)
# A longer fuzzing campaign (every libFuzzer target for FUZZ_SECONDS each, two at a time) in the
# ASan build; prints the executions per target. make fuzz FUZZ_SECONDS=600
FUZZ_SECONDS ?= 300
fuzz: deps
	$(SAN_CONFIGURE) -B $(ASAN_DIR) -DDS_SANITIZE=address
	cmake --build $(ASAN_DIR) -j $(JOBS) --target safetensors_header_fuzz lora_format_fuzz \
	  single_file_fuzz tokenizer_fuzz image_decode_fuzz generate_request_fuzz
	scripts/fuzz_campaign.sh $(ASAN_DIR) $(FUZZ_SECONDS) $(JOBS)
build-tsan: deps
	$(SAN_CONFIGURE) -B $(TSAN_DIR) -DDS_SANITIZE=thread
	cmake --build $(TSAN_DIR) -j $(JOBS) --target concurrency_tests
test-tsan: build-tsan
	cd $(TSAN_DIR) && $(SAN_ENV) ctest -L concurrency --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD_DIR)
