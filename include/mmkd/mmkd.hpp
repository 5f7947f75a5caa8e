#pragma once

// Umbrella header: every public part of mmkd.

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/random.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/softmax.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/core/version.hpp"
#include "mmkd/gradcheck.hpp"
#include "mmkd/logit/cross_entropy.hpp"
#include "mmkd/logit/decoupled_kd.hpp"
#include "mmkd/logit/logit_kd.hpp"
#include "mmkd/multimodal/modality_gram_kd.hpp"
#include "mmkd/multimodal/modality_saliency.hpp"
#include "mmkd/multimodal/modality_specific_kd.hpp"
#include "mmkd/multimodal/modality_weight_learner.hpp"
#include "mmkd/multimodal/modality_weighting.hpp"
