#pragma once

// Reads the UCI digits CSV of examples/data (decompressed by the build): one image per row,
// 64 pixel values 0..16 then the label. Pixels are scaled to [0, 1].

#include <mmkd/core/types.hpp>

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef MMKD_DIGITS_CSV
#define MMKD_DIGITS_CSV "digits.csv"
#endif

namespace digits {

struct Images {
  mmkd::Matrix<float> pixels;  // N x 64, row-major 8x8 images in [0, 1]
  std::vector<int> labels;     // N classes 0..9
};

inline Images read_csv(const std::string& path = MMKD_DIGITS_CSV) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<float> values;
  Images out;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    std::stringstream ss(line);
    std::size_t count = 0;
    for (std::string cell; std::getline(ss, cell, ','); ++count) {
      if (count < 64)
        values.push_back(std::stof(cell) / 16.0f);
      else
        out.labels.push_back(std::stoi(cell));
    }
    if (count != 65) throw std::runtime_error(path + ": a row without 65 values");
  }
  out.pixels = Eigen::Map<mmkd::Matrix<float>>(values.data(), Eigen::Index(out.labels.size()), 64);
  return out;
}

}  // namespace digits
