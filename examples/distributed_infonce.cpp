// Data-parallel contrastive distillation over MPI: each rank holds a shard of the batch and
// computes mmkd's InfoNCE on it, and the ranks' losses and gradients add up to the whole batch's.
//
// One step, P ranks, global batch G split into contiguous shards (rank r: rows
// [offset_r, offset_r + n_r) of the student queries Q and the teacher keys K, each D wide):
//
//   one-directional (query -> key), the default:
//     1. all-gather the keys: every rank has K (G x D);
//     2. InfoNCE(Q_r, K) with offset = offset_r and global_batch = G: the loss term of the local
//        queries, their gradient, and this rank's contribution to every key's gradient;
//     3. reduce-scatter the key gradients: each rank gets the sum over ranks for its own keys;
//        all-reduce the loss.
//   symmetric (CLIP), --symmetric: also all-gather the queries, and add the key -> query
//     direction as InfoNCE(K_r, Q) with the same offset; each direction has weight 1/2 and the
//     query gradients are reduce-scattered like the key gradients.
//
// Rank 0 then checks the result against the single-process whole-batch InfoNCE (loss and every
// query and key gradient) and the program fails when they differ by more than 1e-12 (relative).
//
// Usage: mpirun -np P distributed_infonce [--batch G] [--dim D] [--symmetric]

#include <mpi.h>
#include <mmkd/mmkd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using mmkd::Index;
using Mat = mmkd::Matrix<double>;

struct Shards {  // contiguous row shards of a G-row batch over P ranks, as even as possible
  std::vector<int> rows, offsets;
  Shards(Index g, int p) : rows(std::size_t(p)), offsets(std::size_t(p)) {
    for (int r = 0, off = 0; r < p; ++r) {
      rows[std::size_t(r)] = int(g / p + (r < g % p ? 1 : 0));
      offsets[std::size_t(r)] = off;
      off += rows[std::size_t(r)];
    }
  }
  // The same in doubles of D-wide rows, for MPI's counts and displacements.
  std::vector<int> scaled(const std::vector<int>& v, Index d) const {
    std::vector<int> out(v);
    for (auto& x : out) x *= int(d);
    return out;
  }
};

// Every rank gets the whole G x D matrix from the local n_r x D shards.
void all_gather_rows(const Mat& local, const Shards& s, Mat& all) {
  const Index d = local.cols();
  const auto counts = s.scaled(s.rows, d), displs = s.scaled(s.offsets, d);
  MPI_Allgatherv(local.data(), int(local.size()), MPI_DOUBLE, all.data(), counts.data(),
                 displs.data(), MPI_DOUBLE, MPI_COMM_WORLD);
}

// local (n_r x D) += Σ_ranks (rows of this rank's shard of `all`).
void reduce_scatter_rows_add(const Mat& all, const Shards& s, Mat& local) {
  const auto counts = s.scaled(s.rows, all.cols());
  Mat part(local.rows(), local.cols());
  MPI_Reduce_scatter(all.data(), part.data(), counts.data(), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  local += part;
}

Mat random_rows(Index rows, Index cols, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  Mat m(rows, cols);
  for (Index k = 0; k < m.size(); ++k) m.data()[k] = rng.normal();
  return m;
}

double max_rel_diff(const Mat& a, const Mat& b) {
  return ((a - b).array().abs() / b.array().abs().max(1e-3)).maxCoeff();
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  Index g = 64, d = 32;
  bool symmetric = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--batch" && i + 1 < argc)
      g = std::stol(argv[++i]);
    else if (a == "--dim" && i + 1 < argc)
      d = std::stol(argv[++i]);
    else if (a == "--symmetric")
      symmetric = true;
    else {
      if (rank == 0)
        std::fprintf(stderr, "usage: distributed_infonce [--batch G] [--dim D] [--symmetric]\n");
      MPI_Finalize();
      return 2;
    }
  }
  if (g < ranks) {
    if (rank == 0)
      std::fprintf(stderr, "the batch (%ld) needs a row per rank (%d)\n", long(g), ranks);
    MPI_Finalize();
    return 2;
  }

  // The whole batch is generated from a seed; each rank keeps only its shard.
  const Shards shards(g, ranks);
  const Index n = shards.rows[std::size_t(rank)], offset = shards.offsets[std::size_t(rank)];
  const Mat q_global = random_rows(g, d, 1), k_global = random_rows(g, d, 2);
  const Mat q = q_global.middleRows(offset, n), k = k_global.middleRows(offset, n);

  mmkd::InfoNCE<double>::Options o;
  o.symmetric = false;  // each rank computes directions separately
  o.offset = offset;
  o.global_batch = g;
  o.weight = symmetric ? 0.5 : 1.0;
  mmkd::InfoNCE<double> nce(o);

  // The distributed step.
  Mat k_all(g, d), dq = Mat::Zero(n, d), dk = Mat::Zero(n, d), dk_all = Mat::Zero(g, d);
  all_gather_rows(k, shards, k_all);
  double loss = nce.value_and_grad(q, k_all, dq, dk_all);
  if (symmetric) {
    Mat q_all(g, d), dq_all = Mat::Zero(g, d);
    all_gather_rows(q, shards, q_all);
    loss += nce.value_and_grad(k, q_all, dk, dq_all);
    reduce_scatter_rows_add(dq_all, shards, dq);
  }
  reduce_scatter_rows_add(dk_all, shards, dk);
  double total = 0;
  MPI_Allreduce(&loss, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

  // Collect the shards' gradients on rank 0 and compare with the whole batch in one process.
  Mat dq_gathered(g, d), dk_gathered(g, d);
  const auto counts = shards.scaled(shards.rows, d), displs = shards.scaled(shards.offsets, d);
  MPI_Gatherv(dq.data(), int(dq.size()), MPI_DOUBLE, dq_gathered.data(), counts.data(),
              displs.data(), MPI_DOUBLE, 0, MPI_COMM_WORLD);
  MPI_Gatherv(dk.data(), int(dk.size()), MPI_DOUBLE, dk_gathered.data(), counts.data(),
              displs.data(), MPI_DOUBLE, 0, MPI_COMM_WORLD);
  int status = 0;
  if (rank == 0) {
    mmkd::InfoNCE<double>::Options whole;
    whole.symmetric = symmetric;
    mmkd::InfoNCE<double> reference(whole);
    Mat rq = Mat::Zero(g, d), rk = Mat::Zero(g, d);
    const double ref = reference.value_and_grad(q_global, k_global, rq, rk);
    const double e_loss = std::abs(total - ref) / std::max(1.0, std::abs(ref));
    const double e_q = max_rel_diff(dq_gathered, rq), e_k = max_rel_diff(dk_gathered, rk);
    const bool ok = e_loss < 1e-12 && e_q < 1e-12 && e_k < 1e-12;
    std::printf("%s InfoNCE, batch %ld x %ld over %d ranks (shards of %d..%d rows)\n",
                symmetric ? "symmetric (CLIP)" : "one-directional", long(g), long(d), ranks,
                *std::min_element(shards.rows.begin(), shards.rows.end()),
                *std::max_element(shards.rows.begin(), shards.rows.end()));
    std::printf("  loss: distributed %.15f, single process %.15f\n", total, ref);
    std::printf(
        "  largest relative difference: loss %.1e, query gradients %.1e, key gradients "
        "%.1e -> %s\n",
        e_loss, e_q, e_k, ok ? "equal" : "DIFFERENT");
    status = ok ? 0 : 1;
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
