// Compiled mode: the float and double instantiations of the ReviewKD family and of its
// convolution and resampling kernels, built once into the
// mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/review/attention_fusion.hpp"
#include "mmkd/review/batch_norm.hpp"
#include "mmkd/review/conv2d.hpp"
#include "mmkd/review/hierarchical_context_loss.hpp"
#include "mmkd/review/resize.hpp"
#include "mmkd/review/review_fusion.hpp"

namespace mmkd {

template class AttentionFusion<float>;
template class AttentionFusion<double>;
template class BatchNorm2d<float>;
template class BatchNorm2d<double>;
template class HierarchicalContextLoss<float>;
template class HierarchicalContextLoss<double>;
template class ReviewFusion<float>;
template class ReviewFusion<double>;

// The kernels of the free functions (conv2d_1x1, conv2d_3x3, nearest_resize, adaptive_avg_pool2d).
template decltype(detail::conv1x1_forward<float>) detail::conv1x1_forward<float>;
template decltype(detail::conv1x1_forward<double>) detail::conv1x1_forward<double>;
template decltype(detail::conv1x1_backward<float>) detail::conv1x1_backward<float>;
template decltype(detail::conv1x1_backward<double>) detail::conv1x1_backward<double>;
template decltype(detail::conv3x3_forward<float>) detail::conv3x3_forward<float>;
template decltype(detail::conv3x3_forward<double>) detail::conv3x3_forward<double>;
template decltype(detail::conv3x3_backward<float>) detail::conv3x3_backward<float>;
template decltype(detail::conv3x3_backward<double>) detail::conv3x3_backward<double>;
template decltype(detail::nearest_forward<float>) detail::nearest_forward<float>;
template decltype(detail::nearest_forward<double>) detail::nearest_forward<double>;
template decltype(detail::nearest_backward<float>) detail::nearest_backward<float>;
template decltype(detail::nearest_backward<double>) detail::nearest_backward<double>;
template decltype(detail::pool_forward<float>) detail::pool_forward<float>;
template decltype(detail::pool_forward<double>) detail::pool_forward<double>;
template decltype(detail::pool_backward<float>) detail::pool_backward<float>;
template decltype(detail::pool_backward<double>) detail::pool_backward<double>;

}  // namespace mmkd
