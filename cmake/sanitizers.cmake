# Sanitizer builds (clang only): configure a separate build directory with
#   CC=clang CXX=clang++ cmake -DDS_SANITIZE=address ...   AddressSanitizer + UndefinedBehaviorSanitizer
#                                                          (+ libFuzzer coverage: fuzz/ targets built)
#   CC=clang CXX=clang++ cmake -DDS_SANITIZE=thread ...    ThreadSanitizer
# `make test-sanitize` does both and runs the suites (the whole suite under address, the tests
# labelled `concurrency` under thread). Run-time options and suppressions (third-party code only:
# LibTorch, gRPC, Protobuf, OpenMP are not instrumented) are in sanitizers/.
set(DS_SANITIZE "" CACHE STRING "Sanitizer build: '' (none), 'address' (ASan+UBSan) or 'thread' (TSan)")
set_property(CACHE DS_SANITIZE PROPERTY STRINGS "" address thread)

if(DS_SANITIZE STREQUAL "")
  return()
endif()
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR "DS_SANITIZE=${DS_SANITIZE} needs clang (CXX=clang++), not ${CMAKE_CXX_COMPILER_ID}")
endif()

if(DS_SANITIZE STREQUAL "address")
  # fuzzer-no-link: coverage instrumentation for the libFuzzer targets that link our libraries.
  set(_ds_san_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined
                    -fsanitize=fuzzer-no-link)
  set(_ds_san_link -fsanitize=address,undefined)
elseif(DS_SANITIZE STREQUAL "thread")
  set(_ds_san_flags -fsanitize=thread)
  set(_ds_san_link -fsanitize=thread)
else()
  message(FATAL_ERROR "DS_SANITIZE must be empty, 'address' or 'thread', not '${DS_SANITIZE}'")
endif()
add_compile_options(${_ds_san_flags} -fno-omit-frame-pointer -gline-tables-only)
add_link_options(${_ds_san_link})
# Test discovery runs the binaries; at ctest time they get the sanitizer options of the
# environment (the Makefile's), at build time they would not.
set(DS_TEST_DISCOVERY_MODE PRE_TEST)
message(STATUS "sanitizer build: ${DS_SANITIZE}")
