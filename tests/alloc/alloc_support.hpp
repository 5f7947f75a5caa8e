#pragma once

// Steady-state allocation tests: a call with the same shapes as the previous one must not
// allocate. Eigen's malloc guard turns any heap allocation by Eigen into an exception. Every
// translation unit of an allocation test executable includes this header first, because
// EIGEN_RUNTIME_NO_MALLOC changes Eigen's inline functions (one test executable per family, none
// mixed with the ordinary tests).
#include <memory>
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ((x) ? (void)0 : throw std::runtime_error("Eigen assertion failed: " #x))

#include "support.hpp"

namespace mmkd_test {

struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

}  // namespace mmkd_test

// Each executable checks that its guard is live: an allocation under it throws.
TEST_CASE("the malloc guard is live", "[alloc]") {
  mmkd_test::NoMalloc guard;
  CHECK_THROWS(mmkd::Matrix<float>(10, 10));
}
