#pragma once

// Steady-state allocation tests: a call with the same shapes as the previous one must not
// allocate. Eigen's malloc guard turns any heap allocation by Eigen into an exception, and a
// replaced global operator new counts every other one (std::string, std::vector, ...): a
// NoMalloc scope fails if any happened inside it. Every allocation test executable has exactly
// one translation unit, which includes this header first, because EIGEN_RUNTIME_NO_MALLOC changes
// Eigen's inline functions (one test executable per family, none mixed with the ordinary tests)
// and because the operator new replacement must be defined once per program.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ((x) ? (void)0 : throw std::runtime_error("Eigen assertion failed: " #x))

#include "support.hpp"

namespace mmkd_test {

inline std::atomic<long> operator_new_calls{0};

struct NoMalloc {
  //! `count_new` = false for a scope that throws on purpose (an exception allocates).
  explicit NoMalloc(bool count_new = true) : start(operator_new_calls.load()), count(count_new) {
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoMalloc() {
    const long calls = operator_new_calls.load() - start;
    Eigen::internal::set_is_malloc_allowed(true);
    if (count) {
      INFO("operator new calls in steady state");
      CHECK(calls == 0);
    }
  }
  long start;
  bool count;
};

}  // namespace mmkd_test

// Counting replacements of every global allocation function, so that each new/delete pair goes
// through the same allocator (the sanitizers report a pair split between ours and theirs).
namespace mmkd_test {
inline void* counted_alloc(std::size_t n) noexcept {
  ++operator_new_calls;
  return std::malloc(n ? n : 1);
}
inline void* counted_aligned_alloc(std::size_t n, std::align_val_t a) noexcept {
  ++operator_new_calls;
  const std::size_t align = static_cast<std::size_t>(a);
  const std::size_t size = ((n ? n : 1) + align - 1) / align * align;  // aligned_alloc's rule
  return std::aligned_alloc(align, size);
}
}  // namespace mmkd_test

void* operator new(std::size_t n) {
  if (void* p = mmkd_test::counted_alloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  return ::operator new(n);
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  return mmkd_test::counted_alloc(n);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return mmkd_test::counted_alloc(n);
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = mmkd_test::counted_aligned_alloc(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return ::operator new(n, a);
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return mmkd_test::counted_aligned_alloc(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return mmkd_test::counted_aligned_alloc(n, a);
}
// malloc and aligned_alloc memory are both released by free.
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}

// Each executable checks that its guard is live: an allocation under it throws.
TEST_CASE("the malloc guard is live", "[alloc]") {
  mmkd_test::NoMalloc guard(false);
  CHECK_THROWS(mmkd::Matrix<float>(10, 10));
}

// ... and so is the operator new count.
TEST_CASE("the operator new count is live", "[alloc]") {
  const long before = mmkd_test::operator_new_calls.load();
  auto* s = new std::string(100, 'x');  // past the small-string buffer
  CHECK(mmkd_test::operator_new_calls.load() - before >= 1);
  delete s;
}
