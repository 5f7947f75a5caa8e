#pragma once

// Single source of truth for the version; CMakeLists.txt parses these three lines.
#define MMKD_VERSION_MAJOR 0
#define MMKD_VERSION_MINOR 1
#define MMKD_VERSION_PATCH 0

namespace mmkd {

//! The library version as "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";

}  // namespace mmkd
