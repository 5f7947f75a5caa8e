// Compiled mode: the float and double instantiations of the multimodal family, built once into the
// mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/multimodal/modality_gram_kd.hpp"
#include "mmkd/multimodal/modality_saliency.hpp"
#include "mmkd/multimodal/modality_specific_kd.hpp"
#include "mmkd/multimodal/modality_weight_learner.hpp"
#include "mmkd/multimodal/modality_weighting.hpp"

namespace mmkd {

template class ModalityGramKD<float>;
template class ModalityGramKD<double>;
template class ModalitySaliency<float>;
template class ModalitySaliency<double>;
template class ModalitySpecificKD<float>;
template class ModalitySpecificKD<double>;
template class ModalityWeightLearner<float>;
template class ModalityWeightLearner<double>;
template class ModalityWeighting<float>;
template class ModalityWeighting<double>;
template class SaliencyRunningMean<float>;
template class SaliencyRunningMean<double>;

}  // namespace mmkd
