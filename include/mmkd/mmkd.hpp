#pragma once

// Umbrella header: every public part of mmkd.

#include "mmkd/core/errors.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/random.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/softmax.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/core/version.hpp"
#include "mmkd/gradcheck.hpp"
#include "mmkd/logit/cross_entropy.hpp"
#include "mmkd/logit/decoupled_kd.hpp"
#include "mmkd/logit/logit_kd.hpp"
