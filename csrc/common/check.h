// Argument checking for the native core.
//
// PYFT_CHECK throws std::invalid_argument (ValueError in Python) with a printf-style message that
// names the argument, what was expected and what was given. Never use it inside an OpenMP region:
// an exception escaping a parallel region terminates the process.
#pragma once

#include <cstdarg>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace pyft {

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
inline std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return std::string(buf);
}

}  // namespace pyft

#define PYFT_CHECK(cond, ...)                                  \
  do {                                                         \
    if (!(cond)) throw std::invalid_argument(::pyft::format(__VA_ARGS__)); \
  } while (0)

#define PYFT_CHECK_RUNTIME(cond, ...)                          \
  do {                                                         \
    if (!(cond)) throw std::runtime_error(::pyft::format(__VA_ARGS__)); \
  } while (0)
