// Function multiversioning: on x86-64 Linux with GCC or Clang, hot loops are compiled for
// x86-64-v3 (AVX2, FMA, F16C) and for the baseline ISA, and the loader picks one at start-up by
// CPU features. ("arch=haswell" would select by CPU model and miss AMD and newer Intel parts.)
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define PYFT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYFT_MULTIVERSION
#endif
