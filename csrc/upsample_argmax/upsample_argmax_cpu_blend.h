// The first of F.interpolate's two bilinear blends on the CPU, shared by upsample_argmax's and
// cross_entropy's kernels: each input row blended along the columns to the output's width,
// kept for the output rows that read it. No include guard on purpose: each kernel header
// includes it inside its target's namespace (baseline, AVX2, AVX-512), after cpu_convert.h.

// Input rows blended along the columns, every class (slot[c * W + X]), in two slots: output rows
// run in order and read two consecutive input rows, so each is blended about once per task.
template <typename scalar_t, typename acc_t>
struct ColumnBlendCache {
  const scalar_t* x;
  int64_t sN, sC, sH, sW;  // input strides
  int64_t C, h, w, W;      // classes, input rows and columns, output columns
  const int32_t* x0;       // the column taps of each output column (upsample_argmax.h's linear_tap)
  const int32_t* x1;
  const acc_t* wx0;
  const acc_t* wx1;
  std::vector<acc_t> lowres, slots;
  int64_t tag[2] = {-1, -1};

  ColumnBlendCache(const scalar_t* input, int64_t sN_, int64_t sC_, int64_t sH_, int64_t sW_, int64_t C_, int64_t h_,
                   int64_t w_, int64_t W_, const int32_t* x0_, const int32_t* x1_, const acc_t* wx0_,
                   const acc_t* wx1_)
      : x(input), sN(sN_), sC(sC_), sH(sH_), sW(sW_), C(C_), h(h_), w(w_), W(W_), x0(x0_), x1(x1_), wx0(wx0_),
        wx1(wx1_), lowres(w_), slots(2 * C_ * W_) {}

  // Row y of image n, keeping the slot that holds `keep` (the other row the caller needs).
  const acc_t* get(int64_t n, int64_t y, int64_t keep) {
    const int64_t key = n * h + y, keep_key = n * h + keep;
    for (int s = 0; s < 2; ++s)
      if (tag[s] == key) return slots.data() + s * C * W;
    const int s = tag[0] == keep_key ? 1 : 0;
    acc_t* dst = slots.data() + s * C * W;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = x + n * sN + c * sC + y * sH;
      for (int64_t i = 0; i < w; ++i) lowres[i] = load_acc(src[i * sW]);
      const acc_t* __restrict__ lr = lowres.data();
      const int32_t* __restrict__ i0 = x0;
      const int32_t* __restrict__ i1 = x1;
      const acc_t* __restrict__ w0 = wx0;
      const acc_t* __restrict__ w1 = wx1;
      acc_t* __restrict__ o = dst + c * W;
      for (int64_t X = 0; X < W; ++X) o[X] = lr[i0[X]] * w0[X] + lr[i1[X]] * w1[X];
    }
    tag[s] = key;
    return dst;
  }
};
