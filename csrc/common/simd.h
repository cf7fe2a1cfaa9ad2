// Function multiversioning: on x86-64 Linux with GCC or Clang, hot loops are compiled for
// Haswell (AVX2, FMA, F16C) and for the baseline ISA, and the loader picks one at start-up.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define PYFT_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define PYFT_MULTIVERSION
#endif
