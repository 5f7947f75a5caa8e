// The ReviewKD ops: forward against the definitions written as plain loops, PyTorch's index
// tables from the reference note, and every backward against central differences (random
// cotangents).

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/conv2d.hpp>
#include <mmkd/review/resize.hpp>

#include "support.hpp"

using namespace mmkd_test;

namespace {

// y[n,o,h,w] = Σ_{i,a,b} W[o, 9i+3a+b] x[n, i, h+a−1, w+b−1], zero outside: the definition.
Matrix<double> conv3x3_loops(const Matrix<double>& x, Index n, Index c, Index h, Index w,
                             const Matrix<double>& weight) {
  const Index o = weight.rows();
  Matrix<double> y = Matrix<double>::Zero(n * o, h * w);
  for (Index s = 0; s < n; ++s)
    for (Index q = 0; q < o; ++q)
      for (Index r = 0; r < h; ++r)
        for (Index t = 0; t < w; ++t)
          for (Index i = 0; i < c; ++i)
            for (Index a = 0; a < 3; ++a)
              for (Index b = 0; b < 3; ++b) {
                const Index rr = r + a - 1, tt = t + b - 1;
                if (rr < 0 || rr >= h || tt < 0 || tt >= w) continue;
                y(s * o + q, r * w + t) += weight(q, i * 9 + a * 3 + b) * x(s * c + i, rr * w + tt);
              }
  return y;
}

struct Shape {
  Index n, c, h, w;
};

}  // namespace

TEST_CASE("nearest and adaptive-pool index rules match PyTorch's tables", "[review][ops]") {
  using mmkd::detail::nearest_source;
  auto nearest = [](Index in, Index out) {
    std::vector<Index> v;
    for (Index o = 0; o < out; ++o) v.push_back(nearest_source(o, in, out));
    return v;
  };
  CHECK(nearest(1, 8) == std::vector<Index>(8, 0));
  CHECK(nearest(8, 16) == std::vector<Index>{0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7});
  CHECK(nearest(3, 7) == std::vector<Index>{0, 0, 0, 1, 1, 2, 2});
  CHECK(nearest(5, 7) == std::vector<Index>{0, 0, 1, 2, 2, 3, 4});
  CHECK(nearest(4, 32)[7] == 0);
  CHECK(nearest(4, 32)[8] == 1);
  CHECK(nearest(4, 32)[31] == 3);
  auto bins = [](Index in, Index out) {
    std::vector<std::pair<Index, Index>> v;
    for (Index i = 0; i < out; ++i)
      v.emplace_back(mmkd::detail::pool_start(i, in, out), mmkd::detail::pool_end(i, in, out));
    return v;
  };
  using B = std::vector<std::pair<Index, Index>>;
  CHECK(bins(7, 4) == B{{0, 2}, {1, 4}, {3, 6}, {5, 7}});
  CHECK(bins(7, 2) == B{{0, 4}, {3, 7}});
  CHECK(bins(14, 4) == B{{0, 4}, {3, 7}, {7, 11}, {10, 14}});
  CHECK(bins(5, 4) == B{{0, 2}, {1, 3}, {2, 4}, {3, 5}});
  CHECK(bins(3, 2) == B{{0, 2}, {1, 3}});
  CHECK(bins(32, 4) == B{{0, 8}, {8, 16}, {16, 24}, {24, 32}});
}

TEST_CASE("conv2d_1x1 matches its definition; backward matches finite differences",
          "[review][ops][conv]") {
  for (Shape s : {Shape{2, 3, 4, 5}, Shape{3, 4, 1, 1}, Shape{1, 2, 1, 7}}) {
    INFO("N " << s.n << " C " << s.c << " H " << s.h << " W " << s.w);
    const Index o = 5, hw = s.h * s.w;
    const Matrix<double> x = random_matrix<double>(s.n * s.c, hw, 1);
    const Matrix<double> w = random_matrix<double>(o, s.c, 2), b = random_matrix<double>(1, o, 3);
    auto fwd = [&](const Matrix<double>& xx, const Matrix<double>& ww, const Matrix<double>& bb) {
      Matrix<double> y(s.n * o, hw);
      mmkd::conv2d_1x1<double>(map4(xx, s.n, s.c, s.h, s.w), ww, bb, out4(y, s.n, o, s.h, s.w));
      return y;
    };
    Matrix<double> expect(s.n * o, hw);
    for (Index i = 0; i < s.n; ++i)
      for (Index q = 0; q < o; ++q)
        for (Index p = 0; p < hw; ++p) {
          double acc = b(0, q);
          for (Index k = 0; k < s.c; ++k) acc += w(q, k) * x(i * s.c + k, p);
          expect(i * o + q, p) = acc;
        }
    CHECK((fwd(x, w, b) - expect).cwiseAbs().maxCoeff() < 1e-12);
    // Backward: gradients pre-filled with 1 so that "adds" is checked too.
    auto vjp = [&](const Matrix<double>& u, int which) {
      Matrix<double> dx = Matrix<double>::Ones(x.rows(), x.cols()),
                     dw = Matrix<double>::Ones(o, s.c), db = Matrix<double>::Ones(1, o);
      mmkd::conv2d_1x1_backward<double>(map4(x, s.n, s.c, s.h, s.w), w, map4(u, s.n, o, s.h, s.w),
                                        out4(dx, s.n, s.c, s.h, s.w), dw, db);
      return Matrix<double>((which == 0 ? dx : which == 1 ? dw : db).array() - 1.0);
    };
    CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(v, w, b); },
                          [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 0); },
                          x, tight()));
    CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(x, v, b); },
                          [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 1); },
                          w, tight()));
    CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(x, w, v); },
                          [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 2); },
                          b, tight()));
  }
}

TEST_CASE(
    "conv2d_3x3 matches its definition, 1x1 inputs included; backward matches finite "
    "differences",
    "[review][ops][conv]") {
  using Algo = mmkd::Conv3x3Algorithm;
  for (Algo algo : {Algo::Im2col, Algo::Winograd, Algo::Auto})
    for (Shape s : {Shape{2, 3, 5, 4}, Shape{3, 2, 1, 1}, Shape{1, 2, 1, 6}, Shape{2, 2, 3, 1},
                    Shape{1, 1, 2, 2}, Shape{2, 2, 7, 7}}) {
      INFO("N " << s.n << " C " << s.c << " H " << s.h << " W " << s.w << " algorithm "
                << int(algo));
      const Index o = 3, hw = s.h * s.w;
      const Matrix<double> x = random_matrix<double>(s.n * s.c, hw, 4);
      const Matrix<double> w = random_matrix<double>(o, 9 * s.c, 5);
      Matrix<double> ws1, ws2;
      auto fwd = [&](const Matrix<double>& xx, const Matrix<double>& ww) {
        Matrix<double> y(s.n * o, hw);
        mmkd::conv2d_3x3<double>(map4(xx, s.n, s.c, s.h, s.w), ww, out4(y, s.n, o, s.h, s.w), ws1,
                                 algo);
        return y;
      };
      CHECK((fwd(x, w) - conv3x3_loops(x, s.n, s.c, s.h, s.w, w)).cwiseAbs().maxCoeff() < 1e-12);
      auto vjp = [&](const Matrix<double>& u, bool input) {
        Matrix<double> dx = Matrix<double>::Ones(x.rows(), x.cols()),
                       dw = Matrix<double>::Ones(o, 9 * s.c);
        mmkd::conv2d_3x3_backward<double>(map4(x, s.n, s.c, s.h, s.w), w, map4(u, s.n, o, s.h, s.w),
                                          out4(dx, s.n, s.c, s.h, s.w), dw, ws2, algo);
        return Matrix<double>((input ? dx : dw).array() - 1.0);
      };
      CHECK(mmkd::check_vjp(
          [&](const Matrix<double>& v) { return fwd(v, w); },
          [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, true); }, x,
          tight()));
      const auto rw = mmkd::check_vjp(
          [&](const Matrix<double>& v) { return fwd(x, v); },
          [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, false); }, w,
          tight());
      CHECK(rw);
      if (hw == 1) {  // only the centre taps see data; the others get exactly zero
        const Matrix<double> u = random_matrix<double>(s.n * o, 1, 6);
        const Matrix<double> dw = vjp(u, false);
        for (Index k = 0; k < dw.cols(); ++k) {
          if (k % 9 != 4) CHECK(dw.col(k).isZero(0));
        }
      }
    }
}

TEST_CASE("conv2d_3x3 rejects an algorithm out of range", "[review][ops][conv][errors]") {
  const Matrix<double> x = random_matrix<double>(2, 9, 1), w = random_matrix<double>(1, 18, 2);
  Matrix<double> y = Matrix<double>::Zero(1, 9), ws;
  CHECK_THROWS_WITH(mmkd::conv2d_3x3<double>(map4(x, 1, 2, 3, 3), w, out4(y, 1, 1, 3, 3), ws,
                                             mmkd::Conv3x3Algorithm(7)),
                    "conv2d_3x3: option algorithm holds no valid value (7)");
  CHECK(y.isZero(0));
}

TEST_CASE("nearest_resize and adaptive_avg_pool2d backward match finite differences",
          "[review][ops][resize]") {
  const std::pair<Index, Index> sizes[] = {{1, 4}, {3, 7}, {4, 8}, {7, 4}, {14, 4}, {5, 2}, {6, 6}};
  for (const auto& size : sizes) {
    const Index in = size.first, out = size.second;  // named copies: lambdas below capture them
    INFO(in << " -> " << out);
    const Index n = 2, c = 2;
    const Matrix<double> x = random_matrix<double>(n * c, in * (in + 1), in + out);
    for (bool pool : {false, true}) {
      auto fwd = [&](const Matrix<double>& v) {
        Matrix<double> y(n * c, out * out);
        if (pool)
          mmkd::adaptive_avg_pool2d<double>(map4(v, n, c, in, in + 1), out4(y, n, c, out, out));
        else
          mmkd::nearest_resize<double>(map4(v, n, c, in, in + 1), out4(y, n, c, out, out));
        return y;
      };
      auto vjp = [&](const Matrix<double>&, const Matrix<double>& u) {
        Matrix<double> dx = Matrix<double>::Constant(x.rows(), x.cols(), 2.0);
        if (pool)
          mmkd::adaptive_avg_pool2d_backward<double>(map4(u, n, c, out, out),
                                                     out4(dx, n, c, in, in + 1));
        else
          mmkd::nearest_resize_backward<double>(map4(u, n, c, out, out),
                                                out4(dx, n, c, in, in + 1));
        return Matrix<double>(dx.array() - 2.0);
      };
      INFO("pool " << pool);
      CHECK(mmkd::check_vjp(fwd, vjp, x, tight()));
    }
  }
}

TEST_CASE("attention_fuse matches its definition; backward matches finite differences",
          "[review][ops][attention]") {
  const Index n = 2, c = 3, h = 3, w = 2, hw = h * w;
  const Matrix<double> x = random_matrix<double>(n * c, hw, 7),
                       y = random_matrix<double>(n * c, hw, 8);
  const Matrix<double> wt = random_matrix<double>(2, 2 * c, 9), b = random_matrix<double>(1, 2, 10);
  Matrix<double> z(n * 2, hw);
  auto fwd = [&](const Matrix<double>& xx, const Matrix<double>& yy, const Matrix<double>& ww,
                 const Matrix<double>& bb) {
    Matrix<double> f(n * c, hw);
    mmkd::attention_fuse<double>(map4(xx, n, c, h, w), map4(yy, n, c, h, w), ww, bb,
                                 out4(z, n, 2, h, w), out4(f, n, c, h, w));
    return f;
  };
  const Matrix<double> f = fwd(x, y, wt, b);
  for (Index i = 0; i < n; ++i)
    for (Index p = 0; p < hw; ++p) {
      double a[2] = {b(0, 0), b(0, 1)};
      for (int j = 0; j < 2; ++j)
        for (Index k = 0; k < c; ++k)
          a[j] += wt(j, k) * x(i * c + k, p) + wt(j, c + k) * y(i * c + k, p);
      const double z0 = 1 / (1 + std::exp(-a[0])), z1 = 1 / (1 + std::exp(-a[1]));
      for (Index k = 0; k < c; ++k)
        CHECK(f(i * c + k, p) ==
              Approx(x(i * c + k, p) * z0 + y(i * c + k, p) * z1).epsilon(1e-13));
    }
  auto vjp = [&](const Matrix<double>& u, int which) {
    fwd(x, y, wt, b);  // z for the unperturbed inputs
    Matrix<double> dx = Matrix<double>::Ones(n * c, hw), dy = Matrix<double>::Ones(n * c, hw),
                   dw = Matrix<double>::Ones(2, 2 * c), db = Matrix<double>::Ones(1, 2), ws;
    mmkd::attention_fuse_backward<double>(map4(x, n, c, h, w), map4(y, n, c, h, w), wt,
                                          map4(z, n, 2, h, w), map4(u, n, c, h, w),
                                          out4(dx, n, c, h, w), out4(dy, n, c, h, w), dw, db, ws);
    const Matrix<double>* out[] = {&dx, &dy, &dw, &db};
    return Matrix<double>(out[which]->array() - 1.0);
  };
  CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(v, y, wt, b); },
                        [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 0); },
                        x, tight()));
  CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(x, v, wt, b); },
                        [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 1); },
                        y, tight()));
  CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(x, y, v, b); },
                        [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 2); },
                        wt, tight()));
  CHECK(mmkd::check_vjp([&](const Matrix<double>& v) { return fwd(x, y, wt, v); },
                        [&](const Matrix<double>&, const Matrix<double>& u) { return vjp(u, 3); },
                        b, tight()));
}

namespace {

// `m` as the left columns of a matrix 3 columns wider, the others holding `pad`.
Matrix<double> widened(const Matrix<double>& m, double pad) {
  Matrix<double> wide = Matrix<double>::Constant(m.rows(), m.cols() + 3, pad);
  wide.leftCols(m.cols()) = m;
  return wide;
}

}  // namespace

TEST_CASE("ops read strided weights and write strided weight gradients in place",
          "[review][ops][strided]") {
  // Each op runs twice: weight and dweight dense, then both as the left columns of wider
  // matrices (a block of a caller's parameter store). The gradients must be the same bits and
  // the columns beside the views untouched.
  const double pad = -7.25;
  auto same = [&](const Matrix<double>& dense, const Matrix<double>& wide) {
    CHECK(wide.leftCols(dense.cols()) == dense);
    CHECK((wide.rightCols(3).array() == pad).all());
  };
  using Algo = mmkd::Conv3x3Algorithm;
  for (Shape s : {Shape{2, 3, 4, 5}, Shape{3, 2, 1, 1}, Shape{2, 2, 7, 7}}) {
    INFO("N " << s.n << " C " << s.c << " H " << s.h << " W " << s.w);
    const Index o = 4, hw = s.h * s.w;
    const Matrix<double> x = random_matrix<double>(s.n * s.c, hw, 11);
    const Matrix<double> dy = random_matrix<double>(s.n * o, hw, 12);
    {  // conv2d_1x1: weight O x C, bias 1 x O
      const Matrix<double> w = random_matrix<double>(o, s.c, 13),
                           b = random_matrix<double>(1, o, 14);
      const Matrix<double> w_wide = widened(w, pad);
      Matrix<double> y1(s.n * o, hw), y2(s.n * o, hw), dx = Matrix<double>::Zero(s.n * s.c, hw);
      mmkd::conv2d_1x1<double>(map4(x, s.n, s.c, s.h, s.w), w, b, out4(y1, s.n, o, s.h, s.w));
      mmkd::conv2d_1x1<double>(map4(x, s.n, s.c, s.h, s.w), w_wide.leftCols(s.c), b,
                               out4(y2, s.n, o, s.h, s.w));
      CHECK(y1 == y2);
      Matrix<double> dw = Matrix<double>::Ones(o, s.c), dw_wide = widened(dw, pad);
      Matrix<double> db = Matrix<double>::Zero(1, o), db2 = db;
      mmkd::conv2d_1x1_backward<double>(map4(x, s.n, s.c, s.h, s.w), w, map4(dy, s.n, o, s.h, s.w),
                                        out4(dx, s.n, s.c, s.h, s.w), dw, db);
      dx.setZero();
      mmkd::conv2d_1x1_backward<double>(map4(x, s.n, s.c, s.h, s.w), w_wide.leftCols(s.c),
                                        map4(dy, s.n, o, s.h, s.w), out4(dx, s.n, s.c, s.h, s.w),
                                        dw_wide.leftCols(s.c), db2);
      same(dw, dw_wide);
      CHECK(db == db2);
    }
    for (Algo algo : {Algo::Im2col, Algo::Winograd}) {  // conv2d_3x3: weight O x 9C
      INFO("algorithm " << int(algo));
      const Matrix<double> w = random_matrix<double>(o, 9 * s.c, 15), w_wide = widened(w, pad);
      Matrix<double> y1(s.n * o, hw), y2(s.n * o, hw), ws;
      mmkd::conv2d_3x3<double>(map4(x, s.n, s.c, s.h, s.w), w, out4(y1, s.n, o, s.h, s.w), ws,
                               algo);
      mmkd::conv2d_3x3<double>(map4(x, s.n, s.c, s.h, s.w), w_wide.leftCols(9 * s.c),
                               out4(y2, s.n, o, s.h, s.w), ws, algo);
      CHECK(y1 == y2);
      Matrix<double> dw = Matrix<double>::Ones(o, 9 * s.c), dw_wide = widened(dw, pad);
      Matrix<double> dx1 = Matrix<double>::Zero(s.n * s.c, hw), dx2 = dx1;
      mmkd::conv2d_3x3_backward<double>(map4(x, s.n, s.c, s.h, s.w), w, map4(dy, s.n, o, s.h, s.w),
                                        out4(dx1, s.n, s.c, s.h, s.w), dw, ws, algo);
      mmkd::conv2d_3x3_backward<double>(map4(x, s.n, s.c, s.h, s.w), w_wide.leftCols(9 * s.c),
                                        map4(dy, s.n, o, s.h, s.w), out4(dx2, s.n, s.c, s.h, s.w),
                                        dw_wide.leftCols(9 * s.c), ws, algo);
      same(dw, dw_wide);
      CHECK(dx1 == dx2);
    }
    {  // attention_fuse: weight 2 x 2C
      const Matrix<double> y = random_matrix<double>(s.n * s.c, hw, 16);
      const Matrix<double> w = random_matrix<double>(2, 2 * s.c, 17), w_wide = widened(w, pad);
      const Matrix<double> b = random_matrix<double>(1, 2, 18);
      const Matrix<double> df = random_matrix<double>(s.n * s.c, hw, 19);
      Matrix<double> z(s.n * 2, hw), f1(s.n * s.c, hw), f2(s.n * s.c, hw), ws;
      mmkd::attention_fuse<double>(map4(x, s.n, s.c, s.h, s.w), map4(y, s.n, s.c, s.h, s.w),
                                   w_wide.leftCols(2 * s.c), b, out4(z, s.n, 2, s.h, s.w),
                                   out4(f2, s.n, s.c, s.h, s.w));
      mmkd::attention_fuse<double>(map4(x, s.n, s.c, s.h, s.w), map4(y, s.n, s.c, s.h, s.w), w, b,
                                   out4(z, s.n, 2, s.h, s.w), out4(f1, s.n, s.c, s.h, s.w));
      CHECK(f1 == f2);
      Matrix<double> dw = Matrix<double>::Ones(2, 2 * s.c), dw_wide = widened(dw, pad);
      Matrix<double> db1 = Matrix<double>::Zero(1, 2), db2 = db1;
      Matrix<double> dx = Matrix<double>::Zero(s.n * s.c, hw), dyy = dx;
      mmkd::attention_fuse_backward<double>(
          map4(x, s.n, s.c, s.h, s.w), map4(y, s.n, s.c, s.h, s.w), w, map4(z, s.n, 2, s.h, s.w),
          map4(df, s.n, s.c, s.h, s.w), out4(dx, s.n, s.c, s.h, s.w), out4(dyy, s.n, s.c, s.h, s.w),
          dw, db1, ws);
      mmkd::attention_fuse_backward<double>(
          map4(x, s.n, s.c, s.h, s.w), map4(y, s.n, s.c, s.h, s.w), w_wide.leftCols(2 * s.c),
          map4(z, s.n, 2, s.h, s.w), map4(df, s.n, s.c, s.h, s.w), out4(dx, s.n, s.c, s.h, s.w),
          out4(dyy, s.n, s.c, s.h, s.w), dw_wide.leftCols(2 * s.c), db2, ws);
      same(dw, dw_wide);
      CHECK(db1 == db2);
    }
  }
}

TEST_CASE("ops reject mismatched shapes with a message naming the argument", "[review][ops]") {
  Matrix<double> x = Matrix<double>::Zero(6, 4), y(6, 4), ws;
  const Matrix<double> w = Matrix<double>::Zero(2, 3), w3 = Matrix<double>::Zero(2, 27), none(0, 0);
  CHECK_THROWS_WITH(mmkd::conv2d_1x1<double>(map4(x, 2, 3, 2, 2), Matrix<double>::Zero(2, 4), none,
                                             out4(y, 2, 2, 2, 2)),
                    Catch::Contains("conv2d_1x1: weight has shape 2x4, expected 2x3"));
  CHECK_THROWS_WITH(mmkd::conv2d_3x3<double>(map4(x, 2, 3, 2, 2), w3, out4(y, 2, 3, 2, 2), ws),
                    Catch::Contains("conv2d_3x3: y has shape 2x3x2x2, expected 2x2x2x2"));
  CHECK_THROWS_WITH(mmkd::conv2d_1x1<double>(map4(x, 2, 3, 2, 2), w, Matrix<double>::Zero(1, 3),
                                             out4(y, 2, 2, 2, 2)),
                    Catch::Contains("bias has shape 1x3, expected 1x2"));
  CHECK_THROWS_WITH(mmkd::nearest_resize<double>(map4(x, 2, 3, 2, 2), out4(y, 3, 2, 2, 2)),
                    Catch::Contains("nearest_resize: y has shape 3x2x2x2"));
  CHECK_THROWS_AS(mmkd::adaptive_avg_pool2d<double>(map4(x, 2, 3, 2, 2), out4(y, 2, 3, 0, 4)),
                  mmkd::InvalidArgument);
}
