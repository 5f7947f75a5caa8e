// Compiled mode: the float and double instantiations of the loss sum and the optimisers, built once
// into the mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/core/loss_sum.hpp"
#include "mmkd/optim/adam.hpp"
#include "mmkd/optim/sgd.hpp"

namespace mmkd {

template class LossSum<float>;
template class LossSum<double>;
template class Sgd<float>;
template class Sgd<double>;
template class Adam<float>;
template class Adam<double>;
template class AdamW<float>;
template class AdamW<double>;

}  // namespace mmkd
