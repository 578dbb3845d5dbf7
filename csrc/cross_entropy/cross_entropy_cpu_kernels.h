// CPU kernel bodies of cross_entropy over upsampled logits. No include guard on purpose:
// cross_entropy_cpu.cpp builds this file once per instruction set (cpu_isa_builds.h) and picks
// one at run time. Geometry and Labels come from the .cpp. Every inner loop runs over contiguous columns with selects instead of branches, so that
// it vectorises, exp_nonpos included.

#include "cpu_convert.h"  // load_acc, compiled for this file's target
#include "upsample_argmax/upsample_argmax_cpu_blend.h"  // ColumnBlendCache: the column blend

template <typename scalar_t, typename acc_t>
ColumnBlendCache<scalar_t, acc_t> column_blend_cache(const Geometry<acc_t>& g, const scalar_t* x) {
  return ColumnBlendCache<scalar_t, acc_t>(x, g.sN, g.sC, g.sH, g.sW, g.C, g.h, g.w, g.W, g.x0, g.x1, g.wx0, g.wx1);
}

// The upsampled logits z (C x T, row-major by class) of columns [X0, X0 + len) of output row Y
// from its two column-upsampled rows: F.interpolate's second (row) blend.
template <typename acc_t>
inline void blend_rows(const acc_t* ra, const acc_t* rb, acc_t wy0, acc_t wy1, int64_t C, int64_t W, int64_t X0,
                       int64_t len, acc_t* z) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* __restrict__ a = ra + c * W + X0;
    const acc_t* __restrict__ b = rb + c * W + X0;
    acc_t* __restrict__ zc = z + c * kTile;
    for (int64_t j = 0; j < len; ++j) zc[j] = a[j] * wy0 + b[j] * wy1;
  }
}

// Forward over output rows [begin, end) (row r = n * H + Y): each labelled pixel's loss, its
// log s = log sum_c exp(z_c - max z) (with log_sum_out: the backward's softmax, exact at any
// logit size) and, per row, the sums of the losses and of the
// labelled pixels' weights. Labels outside [0, C) that are not ignore_index are counted in
// *invalid and their pixels left out (the op raises).
template <typename scalar_t, typename acc_t>
void forward_rows(const Geometry<acc_t>& g, const scalar_t* x, const Labels& labels, acc_t* loss, bool per_pixel,
                  acc_t* weight_sum, acc_t* log_sum_out, int64_t begin, int64_t end, int64_t* invalid) {
  const int64_t C = g.C, H = g.H, W = g.W;
  ColumnBlendCache<scalar_t, acc_t> cache = column_blend_cache(g, x);
  std::vector<acc_t> zbuf(C * kTile);
  std::vector<int64_t> lab(W);
  acc_t m[kTile], s[kTile], swz[kTile];
  acc_t* __restrict__ z = zbuf.data();
  int64_t bad = 0;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / H, Y = r - n * H;
    labels.load_row(r, lab.data());
    double row_loss = 0, row_weight = 0;
    acc_t* loss_row = per_pixel ? loss + r * W : nullptr;
    acc_t* log_sum_row = log_sum_out ? log_sum_out + r * W : nullptr;
    const acc_t* ra = nullptr;
    const acc_t* rb = nullptr;
    for (int64_t X0 = 0; X0 < W; X0 += kTile) {
      const int64_t len = std::min<int64_t>(kTile, W - X0);
      int64_t labelled = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t t = lab[X0 + j];
        const bool ignored = t == g.ignore;
        const bool out_of_range = !ignored && (t < 0 || t >= C);
        bad += out_of_range;
        labelled += !ignored && !out_of_range;
        if (out_of_range) lab[X0 + j] = g.ignore;  // left out, as ignored
      }
      if (labelled == 0) {  // nothing to compute here: fully ignored tiles cost no exponential
        for (int64_t j = 0; j < len; ++j) {
          if (loss_row) loss_row[X0 + j] = acc_t(0);
          if (log_sum_row) log_sum_row[X0 + j] = acc_t(0);
        }
        continue;
      }
      if (!ra) {
        ra = cache.get(n, g.y0[Y], g.y1[Y]);
        rb = cache.get(n, g.y1[Y], g.y0[Y]);
      }
      blend_rows(ra, rb, g.wy0[Y], g.wy1[Y], C, W, X0, len, z);
      for (int64_t j = 0; j < len; ++j) {
        m[j] = -std::numeric_limits<acc_t>::infinity();
        s[j] = acc_t(0);
        swz[j] = acc_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* __restrict__ zc = z + c * kTile;
        const acc_t wc = g.weight ? g.weight[c] : acc_t(1);
        for (int64_t j = 0; j < len; ++j) {
          m[j] = zc[j] > m[j] ? zc[j] : m[j];
          swz[j] += wc * zc[j];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* __restrict__ zc = z + c * kTile;
        for (int64_t j = 0; j < len; ++j) s[j] += exp_nonpos(zc[j] - m[j]);
      }
      for (int64_t j = 0; j < len; ++j) {
        const int64_t t = lab[X0 + j];
        acc_t pixel = acc_t(0), saved = acc_t(0);
        if (t != g.ignore) {
          const acc_t w_t = g.weight ? g.weight[t] : acc_t(1);
          const acc_t log_s = std::log(s[j]);
          const PixelLoss<acc_t> pl =
              pixel_loss<acc_t>(m[j], log_s, z[t * kTile + j], swz[j], w_t, g.w_total, g.smoothing,
                                static_cast<acc_t>(C));
          pixel = pl.loss;
          saved = log_s;
          row_loss += static_cast<double>(pixel);
          row_weight += static_cast<double>(w_t);
        }
        if (loss_row) loss_row[X0 + j] = pixel;
        if (log_sum_row) log_sum_row[X0 + j] = saved;
      }
    }
    if (!per_pixel) loss[r] = static_cast<acc_t>(row_loss);
    weight_sum[r] = static_cast<acc_t>(row_weight);
  }
  *invalid += bad;
}

// Accumulators of the input gradient for low-resolution rows, kept at the output's width until
// every output row that reads them has been added (row blend transposed); each is then reduced
// along the columns (the column blend transposed) and stored. Rows live in a ring of three
// (an output row reads two consecutive low-resolution rows).
template <typename scalar_t, typename acc_t>
struct GradRows {
  const Geometry<acc_t>& g;
  scalar_t* grad;  // the input gradient, with the input's strides (gS*)
  int64_t n, lo, hi;  // rows [lo, hi) are live; rows below lo are stored
  std::vector<acc_t> ring;
  std::vector<acc_t> reduced;

  GradRows(const Geometry<acc_t>& geometry, scalar_t* out)
      : g(geometry), grad(out), n(0), lo(0), hi(0), ring(3 * geometry.C * geometry.W), reduced(geometry.w) {}

  acc_t* row(int64_t y) { return ring.data() + (y % 3) * g.C * g.W; }

  void start(int64_t image, int64_t first) {
    n = image;
    lo = hi = first;
  }

  // Rows up to `last` (inclusive) live, fresh ones zeroed.
  void open_through(int64_t last) {
    for (; hi <= last; ++hi) std::fill_n(row(hi), g.C * g.W, acc_t(0));
  }

  // Stores rows below `upto` (a row never opened gets zeros: no output row read it).
  void close_below(int64_t upto) {
    for (; lo < upto; ++lo) {
      if (lo >= hi) {
        store_zero(lo);
        hi = lo + 1;
      } else {
        store(lo);
      }
    }
  }

  void store_zero(int64_t y) {
    for (int64_t c = 0; c < g.C; ++c) {
      scalar_t* dst = grad + n * g.gN + c * g.gC + y * g.gH;
      for (int64_t x = 0; x < g.w; ++x) dst[x * g.gW] = scalar_t(0);
    }
  }

  // The column blend transposed: input column x collects the output columns whose taps read it
  // (a run for each of its two roles), in a fixed order.
  void store(int64_t y) {
    const acc_t* acc = row(y);
    for (int64_t c = 0; c < g.C; ++c) {
      const acc_t* a = acc + c * g.W;
      for (int64_t xi = 0; xi < g.w; ++xi) {
        acc_t sum0 = acc_t(0), sum1 = acc_t(0);
        for (int64_t X = g.run0_begin[xi]; X < g.run0_end[xi]; ++X) sum0 += g.wx0[X] * a[X];
        for (int64_t X = g.run1_begin[xi]; X < g.run1_end[xi]; ++X) sum1 += g.wx1[X] * a[X];
        reduced[xi] = sum0 + sum1;
      }
      scalar_t* dst = grad + n * g.gN + c * g.gC + y * g.gH;
      for (int64_t xi = 0; xi < g.w; ++xi) dst[xi * g.gW] = static_cast<scalar_t>(reduced[xi]);
    }
  }
};

// Backward over low-resolution rows [begin, end) of all images (row q = n * h + y): every output
// row that reads one of them is recomputed (those reading a row of a neighbouring task are
// recomputed there too), its gradient with respect to the upsampled logits formed in a tile and
// added into the rows it reads. Each input element sums its contributions in one fixed order,
// whatever the split into tasks: bitwise repeatable, no atomics.
template <typename scalar_t, typename acc_t>
void backward_rows(const Geometry<acc_t>& g, const scalar_t* x, const Labels& labels, const acc_t* log_s,
                   const acc_t* grad_out, int64_t gs0, int64_t gs1, int64_t gs2, scalar_t* grad_in, int64_t begin,
                   int64_t end) {
  const int64_t C = g.C, h = g.h, H = g.H, W = g.W;
  ColumnBlendCache<scalar_t, acc_t> cache = column_blend_cache(g, x);
  GradRows<scalar_t, acc_t> rows(g, grad_in);
  std::vector<acc_t> zbuf(C * kTile);
  std::vector<int64_t> lab(W);
  acc_t off[kTile], ca[kTile], cb[kTile], ce[kTile], keep[kTile];
  acc_t* __restrict__ z = zbuf.data();
  const acc_t classes = static_cast<acc_t>(C);
  for (int64_t q = begin; q < end;) {
    const int64_t n = q / h, ya = q - n * h;
    const int64_t yb = std::min<int64_t>(h, ya + (end - q));  // this image's part of the task
    q += yb - ya;
    // Output rows reading [ya, yb): y1[Y] >= ya and y0[Y] < yb (both taps are non-decreasing in Y).
    int64_t Ys = 0, Ye = H;
    while (Ys < H && g.y1[Ys] < ya) ++Ys;
    while (Ye > Ys && g.y0[Ye - 1] >= yb) --Ye;
    rows.start(n, ya);
    for (int64_t Y = Ys; Y < Ye; ++Y) {
      const int64_t a = g.y0[Y], b = g.y1[Y];
      rows.close_below(std::max(ya, a));
      rows.open_through(std::min(yb - 1, b));
      const int64_t r = n * H + Y;
      labels.load_row(r, lab.data());
      const acc_t* log_s_row = log_s + r * W;
      const acc_t* go = grad_out + n * gs0 + Y * gs1;
      const acc_t* ra = nullptr;
      const acc_t* rb = nullptr;
      acc_t* acc_a = a >= ya && a < yb ? rows.row(a) : nullptr;
      acc_t* acc_b = b >= ya && b < yb ? rows.row(b) : nullptr;
      const acc_t wa = g.wy0[Y], wb = g.wy1[Y];
      for (int64_t X0 = 0; X0 < W; X0 += kTile) {
        const int64_t len = std::min<int64_t>(kTile, W - X0);
        int64_t labelled = 0;
        for (int64_t j = 0; j < len; ++j) labelled += lab[X0 + j] != g.ignore;
        if (labelled == 0) continue;  // a zero gradient adds nothing
        if (!ra) {
          ra = cache.get(n, a, b);
          rb = cache.get(n, b, a);
        }
        blend_rows(ra, rb, wa, wb, C, W, X0, len, z);
        // p_c = exp(z_c - max z - log_s): the forward's softmax, from its saved log_s.
        for (int64_t j = 0; j < len; ++j) off[j] = -std::numeric_limits<acc_t>::infinity();
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* __restrict__ zc = z + c * kTile;
          for (int64_t j = 0; j < len; ++j) off[j] = zc[j] > off[j] ? zc[j] : off[j];
        }
        for (int64_t j = 0; j < len; ++j) {
          const int64_t t = lab[X0 + j];
          const bool labelled_j = t != g.ignore;
          const int64_t ts = labelled_j ? t : 0;
          const acc_t w_t = g.weight ? g.weight[ts] : acc_t(1);
          const PixelGradCoef<acc_t> k =
              pixel_grad_coef<acc_t>(go[(X0 + j) * gs2], w_t, g.w_total, g.smoothing, classes);
          off[j] += log_s_row[X0 + j];
          ca[j] = k.a;
          cb[j] = k.b;
          ce[j] = k.e;
          keep[j] = labelled_j ? acc_t(1) : acc_t(0);
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t* __restrict__ zc = z + c * kTile;
          const acc_t wc = g.weight ? g.weight[c] : acc_t(1);
          for (int64_t j = 0; j < len; ++j) {
            const acc_t d = ca[j] * exp_nonpos(zc[j] - off[j]) - ce[j] * wc;
            zc[j] = keep[j] != acc_t(0) ? d : acc_t(0);
          }
        }
        for (int64_t j = 0; j < len; ++j) {
          const int64_t t = lab[X0 + j];
          if (t != g.ignore) z[t * kTile + j] -= cb[j];
        }
        // The row blend transposed: this output row's share of the two rows it reads.
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* __restrict__ zc = z + c * kTile;
          if (acc_a) {
            acc_t* __restrict__ da = acc_a + c * W + X0;
            for (int64_t j = 0; j < len; ++j) da[j] += wa * zc[j];
          }
          if (acc_b) {
            acc_t* __restrict__ db = acc_b + c * W + X0;
            for (int64_t j = 0; j < len; ++j) db[j] += wb * zc[j];
          }
        }
      }
    }
    rows.close_below(yb);
  }
}
