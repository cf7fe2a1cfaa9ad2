// Counter-based randomness: results depend only on (seed, counters), never on thread scheduling.
#pragma once

#include <cstdint>
#include <vector>

namespace pyft {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint64_t hash_combine(uint64_t a, uint64_t b) { return splitmix64(a ^ splitmix64(b)); }

/// Uniform float in [0, 1) from a 64-bit hash.
inline float uniform01(uint64_t h) { return static_cast<float>(h >> 40) * (1.0f / 16777216.0f); }

/// Small sequential generator for shuffles.
struct SplitMix {
  uint64_t state;
  explicit SplitMix(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Unbiased integer in [0, bound) (Lemire's method).
  uint64_t below(uint64_t bound) {
    uint64_t x = next();
    __uint128_t m = static_cast<__uint128_t>(x) * bound;
    uint64_t l = static_cast<uint64_t>(m);
    if (l < bound) {
      uint64_t t = (0 - bound) % bound;
      while (l < t) {
        x = next();
        m = static_cast<__uint128_t>(x) * bound;
        l = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

/// The sample order of one epoch: a Fisher-Yates shuffle seeded by (seed, epoch).
/// Exposed to Python as `pyft._core.epoch_permutation` so reference loops can replay it.
inline void epoch_permutation(uint64_t seed, int64_t epoch, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  SplitMix g(hash_combine(seed, static_cast<uint64_t>(epoch) + 0x5eed));
  for (int64_t i = n - 1; i > 0; --i) {
    int64_t j = static_cast<int64_t>(g.below(static_cast<uint64_t>(i) + 1));
    int64_t t = out[i];
    out[i] = out[j];
    out[j] = t;
  }
}

/// The rows a trainer visits in one epoch: the seeded permutation (or 0..n-1 without shuffling),
/// mapped through `rows` when training on a subset (`rows` null: all rows).
inline void epoch_rows(bool shuffle, uint64_t seed, int64_t epoch, int64_t n, const int64_t* rows,
                       int64_t* out) {
  if (shuffle) {
    epoch_permutation(seed, epoch, n, out);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
  }
  if (rows)
    for (int64_t i = 0; i < n; ++i) out[i] = rows[out[i]];
}

}  // namespace pyft
