// Compiled mode: the float and double instantiations of the structure and contrastive families,
// built once into the mmkd_compiled library (see MMKD_EXTERN_TEMPLATE in mmkd/detail/scalar.hpp).

#include "mmkd/contrastive/embedding_queue.hpp"
#include "mmkd/contrastive/info_nce.hpp"
#include "mmkd/contrastive/similarity_distillation.hpp"
#include "mmkd/structure/channel_decorrelation.hpp"
#include "mmkd/structure/uniformity.hpp"

namespace mmkd {

template class ChannelDecorrelation<float>;
template class ChannelDecorrelation<double>;
template class Uniformity<float>;
template class Uniformity<double>;
template class EmbeddingQueue<float>;
template class EmbeddingQueue<double>;
template class InfoNCE<float>;
template class InfoNCE<double>;
template class SimilarityDistillation<float>;
template class SimilarityDistillation<double>;

}  // namespace mmkd
