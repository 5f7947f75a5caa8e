// Compiled mode: the float and double instantiations of the feature-map losses, built once into
// the mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/feature/hint_loss.hpp"

namespace mmkd {

template class HintLoss<float>;
template class HintLoss<double>;

}  // namespace mmkd
