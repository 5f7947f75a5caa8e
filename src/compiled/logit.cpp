// Compiled mode: the float and double instantiations of the logit family, built once into the
// mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/logit/cross_entropy.hpp"
#include "mmkd/logit/decoupled_kd.hpp"
#include "mmkd/logit/fused_linear_kd.hpp"
#include "mmkd/logit/logit_divergence.hpp"
#include "mmkd/logit/logit_kd.hpp"
#include "mmkd/logit/sparse_logit_kd.hpp"

namespace mmkd {

template class CrossEntropy<float>;
template class CrossEntropy<double>;
template class DecoupledKD<float>;
template class DecoupledKD<double>;
template class FusedLinearKD<float>;
template class FusedLinearKD<double>;
template class LogitDivergence<float>;
template class LogitDivergence<double>;
template class LogitKD<float>;
template class LogitKD<double>;
template class SparseLogitKD<float>;
template class SparseLogitKD<double>;

}  // namespace mmkd
