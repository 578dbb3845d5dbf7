// CPU kernel bodies of the distillation losses. No include guard on purpose: kd_loss_cpu.cpp
// includes this file twice, into namespace `generic` (baseline x86-64 / whatever the compiler
// targets) and into namespace `avx2` under `#pragma GCC target("avx2,fma")`, and picks one at
// run time. Every inner loop runs over contiguous positions with restrict pointers and selects
// instead of branches so that it vectorises, exp_nonpos included.

#include "cpu_convert.h"  // load_acc, store_as, compiled for this file's target

// The channel-axis kernel. CONTIG: NCHW (positions contiguous, stride 1) or channels-last
// (stride C); DIV a Divergence (kd_loss.h); HARD adds seg_kd_loss's cross-entropy part (KL only).
template <typename scalar_t, typename acc_t, bool CONTIG, int DIV, bool HARD>
struct ChannelKernel {
  static constexpr bool KL = DIV == kKL;
  // Reverse KL and JS: the student's gradient needs each position's total, a pass of its own.
  static constexpr bool TWO_PASS = DIV == kReverseKL || DIV == kJS;
  int64_t N, C, P;
  int64_t K;
  const scalar_t* const* s;  // K students
  const scalar_t* t;
  scalar_t* const* g;  // K gradients (same layout as the inputs)
  acc_t* loss;         // (K, N, P) map, or null with a hard part
  const int64_t* labels;
  int64_t ignore;
  acc_t inv_t, scale;  // 1 / T and T^2 (or 1)
  const HardPart<acc_t>* hard;
  scalar_t* const* tg;  // K teacher gradients (one per student), or null when not asked for
  acc_t beta = acc_t(0.5), log_beta = acc_t(0), log_1m_beta = acc_t(0);  // JS's mixture weight

  int64_t off(int64_t c, int64_t p) const { return CONTIG ? c * P + p : p * C + c; }
  int64_t step() const { return CONTIG ? 1 : C; }

  // Max m of the raw logits, log of the sum lz and reciprocal rz of the sum of exp((x - m) * mul)
  // over the channels for `len` positions (m and lz kept apart: m + lz would round away the low
  // bits of log-probabilities at logits of 1e5), and the unnormalised exp((x - m) * mul) in e
  // (C x tile); the probability is e * rz. The maximum is subtracted before scaling so that the
  // shifted value is exactly 0 at the maximum however the compiler contracts the arithmetic (a
  // maximum over x * mul with x * mul - m fused into one FMA left a residual that overflowed exp
  // at tiny temperatures). Every caller keeps e: a run-time `if (e)` in the loop had become
  // masked vector stores, which are slow on AMD. The maximum does not depend on mul: with
  // max_known, m already holds it (the hard part's softmax at T = 1 reuses the student's).
  void stats(const scalar_t* __restrict x, int64_t p0, int64_t len, acc_t mul, acc_t* __restrict m,
             acc_t* __restrict lz, acc_t* __restrict rz, acc_t* __restrict e, int64_t tile,
             bool max_known = false) const {
    const int64_t sp = step();
    if (!max_known) {
      for (int64_t i = 0; i < len; ++i) m[i] = -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* __restrict xc = x + off(c, p0);
        for (int64_t i = 0; i < len; ++i) {
          const acc_t v = load_acc(xc[i * sp]);
          m[i] = v > m[i] ? v : m[i];
        }
      }
    }
    for (int64_t i = 0; i < len; ++i) rz[i] = 0;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* __restrict xc = x + off(c, p0);
      acc_t* __restrict ec = e + c * tile;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t ex = exp_nonpos(shifted_logit(load_acc(xc[i * sp]), m[i], mul));
        ec[i] = ex;
        rz[i] += ex;
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      lz[i] = std::log(rz[i]);
      rz[i] = acc_t(1) / rz[i];
    }
  }

  // Reverse KL and JS over one tile for one student: a pass for each position's totals (the
  // divergence, U = sum ps u and, for JS, the teacher's sum pt h), then one for the gradients
  // ps (u - U) and, when asked, the teacher's (pt - ps, or pt (h - U_t)). Writes acc (the
  // divergence per position, unscaled).
  void two_pass_tile(const scalar_t* sb, const scalar_t* tb, scalar_t* gb, scalar_t* tgb, int64_t p0, int64_t len,
                     const acc_t* et, const acc_t* es, const acc_t* mt, const acc_t* lzt, const acc_t* rzt,
                     const acc_t* ms, const acc_t* lzs, const acc_t* rzs, const acc_t* vm, acc_t gscale, int64_t tile,
                     acc_t* acc) const {
    const int64_t sp = step();
    acc_t us[kMaxTile], ut[kMaxTile];
    for (int64_t i = 0; i < len; ++i) us[i] = ut[i] = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* __restrict etc = et + c * tile;
      const acc_t* __restrict esc = es + c * tile;
      const scalar_t* __restrict sc = sb + off(c, p0);
      const scalar_t* __restrict tc = tb + off(c, p0);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = shifted_logit(load_acc(sc[i * sp]), ms[i], inv_t) - lzs[i];
        const acc_t lpt = shifted_logit(load_acc(tc[i * sp]), mt[i], inv_t) - lzt[i];
        const Share<acc_t> sh = two_pass_share<acc_t, DIV>(etc[i] * rzt[i], lpt, esc[i] * rzs[i], lps, beta,
                                                           log_beta, log_1m_beta);
        us[i] += sh.su;
        ut[i] += sh.tu;
      }
    }
    for (int64_t i = 0; i < len; ++i) acc[i] = us[i] + ut[i];
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* __restrict etc = et + c * tile;
      const acc_t* __restrict esc = es + c * tile;
      const scalar_t* __restrict sc = sb + off(c, p0);
      const scalar_t* __restrict tc = tb + off(c, p0);
      scalar_t* __restrict gc = gb + off(c, p0);
      scalar_t* __restrict tgc = tgb ? tgb + off(c, p0) : nullptr;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t lps = shifted_logit(load_acc(sc[i * sp]), ms[i], inv_t) - lzs[i];
        const acc_t lpt = shifted_logit(load_acc(tc[i * sp]), mt[i], inv_t) - lzt[i];
        const acc_t pt = etc[i] * rzt[i], ps = esc[i] * rzs[i];
        const Share<acc_t> sh = two_pass_share<acc_t, DIV>(pt, lpt, ps, lps, beta, log_beta, log_1m_beta);
        const acc_t gv = ps != acc_t(0) ? gscale * ps * (sh.u - us[i]) : acc_t(0);
        gc[i * sp] = store_as<scalar_t>(vm[i] != acc_t(0) ? gv : acc_t(0));
      }
      if (tgc) {
        for (int64_t i = 0; i < len; ++i) {
          const acc_t lps = shifted_logit(load_acc(sc[i * sp]), ms[i], inv_t) - lzs[i];
          const acc_t lpt = shifted_logit(load_acc(tc[i * sp]), mt[i], inv_t) - lzt[i];
          const acc_t pt = etc[i] * rzt[i], ps = esc[i] * rzs[i];
          acc_t tv;
          if (DIV == kReverseKL) {
            tv = gscale * (pt - ps);
          } else {
            const Share<acc_t> sh = two_pass_share<acc_t, DIV>(pt, lpt, ps, lps, beta, log_beta, log_1m_beta);
            tv = pt != acc_t(0) ? gscale * pt * (sh.h - ut[i]) : acc_t(0);
          }
          tgc[i * sp] = store_as<scalar_t>(vm[i] != acc_t(0) ? tv : acc_t(0));
        }
      }
    }
  }

  void run() const {
    const int64_t tile = channel_tile(C);
    const int64_t tiles = (P + tile - 1) / tile;
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      // Teacher's and student's exponentials, and the student's at T = 1 for the hard part.
      std::vector<acc_t> et_buf(C * tile), es_buf(C * tile), e1_buf(HARD ? C * tile : 0);
      acc_t* __restrict et = et_buf.data();
      acc_t* __restrict es = es_buf.data();
      acc_t* __restrict e1 = e1_buf.data();
      acc_t mt[kMaxTile], lzt[kMaxTile], rzt[kMaxTile], ms[kMaxTile], lzs[kMaxTile], rzs[kMaxTile], lz1[kMaxTile], rz1[kMaxTile],
          acc[kMaxTile], vm[kMaxTile], wy[kMaxTile], labf[kMaxTile];
      int64_t lab[kMaxTile];
      const int64_t sp = step();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / tiles;
        const int64_t p0 = (task % tiles) * tile;
        const int64_t len = std::min<int64_t>(tile, P - p0);
        const int64_t nb = n * C * P;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t y = labels ? labels[n * P + p0 + i] : 0;
          const bool valid = !labels || y != ignore;
          vm[i] = valid ? acc_t(1) : acc_t(0);
          lab[i] = valid ? y : 0;  // a safe class index for the hard part
          labf[i] = static_cast<acc_t>(lab[i]);
        }
        const scalar_t* tb = t + nb;
        stats(tb, p0, len, inv_t, mt, lzt, rzt, et, tile);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sb = s[k] + nb;
          scalar_t* gb = g[k] + nb;
          stats(sb, p0, len, inv_t, ms, lzs, rzs, es, tile);
          for (int64_t i = 0; i < len; ++i) acc[i] = 0;
          double hard_loss = 0;
          if (HARD) {
            // The softmax at T = 1 shares the student's maximum ms (it does not depend on T).
            if (inv_t == acc_t(1))
              std::copy(lzs, lzs + len, lz1);
            else
              stats(sb, p0, len, acc_t(1), ms, lz1, rz1, e1, tile, /*max_known=*/true);
            for (int64_t i = 0; i < len; ++i) {
              wy[i] = hard->weight ? hard->weight[lab[i]] : acc_t(1);
              // In double: the logit at the label minus the maximum may pass the float range
              // (logits near -max and +max) where the mean cross-entropy does not.
              const double ce = -((static_cast<double>(load_acc(sb[off(lab[i], p0 + i)])) - ms[i]) - lz1[i]) *
                                static_cast<double>(wy[i]);
              hard_loss += vm[i] != acc_t(0) ? ce : 0.0;
              wy[i] = vm[i] != acc_t(0) ? wy[i] * hard->hard_coef : acc_t(0);
            }
          }
          const acc_t gscale = scale * inv_t * (HARD ? hard->soft_coef : acc_t(1));
          if constexpr (TWO_PASS) {
            two_pass_tile(sb, tb, gb, tg ? tg[k] + nb : nullptr, p0, len, et, es, mt, lzt, rzt, ms, lzs, rzs, vm,
                          gscale, tile, acc);
            acc_t* lrow = loss + (k * N + n) * P + p0;
            for (int64_t i = 0; i < len; ++i) lrow[i] = vm[i] != acc_t(0) ? scale * acc[i] : acc_t(0);
            continue;
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* __restrict etc = et + c * tile;
            const acc_t* __restrict esc = es + c * tile;
            const acc_t* __restrict e1c = HARD ? e1 + c * tile : nullptr;  // no scratch without a hard part
            const scalar_t* __restrict sc = sb + off(c, p0);
            const scalar_t* __restrict tc = tb + off(c, p0);
            scalar_t* __restrict gc = gb + off(c, p0);
            const acc_t cf = static_cast<acc_t>(c);
            for (int64_t i = 0; i < len; ++i) {
              const acc_t x = load_acc(sc[i * sp]);
              const acc_t lps = shifted_logit(x, ms[i], inv_t) - lzs[i];
              const acc_t lpt = shifted_logit(load_acc(tc[i * sp]), mt[i], inv_t) - lzt[i];
              const acc_t pt = etc[i] * rzt[i];
              const acc_t ps = esc[i] * rzs[i];
              acc[i] += divergence_term(pt, lpt, lps, KL);
              acc_t gv = gscale * (ps - pt);
              if (HARD) {
                const acc_t p1 = inv_t == acc_t(1) ? ps : e1c[i] * rz1[i];
                gv += wy[i] * (p1 - (cf == labf[i] ? acc_t(1) : acc_t(0)));
              }
              gc[i * sp] = store_as<scalar_t>(vm[i] != acc_t(0) ? gv : acc_t(0));
            }
          }
          if (tg) {
            // The teacher's gradient of this student's divergence, which needs the position's
            // total acc: (1 / T) p_t (l - L) with l the term per unit of p_t (log p_t - log p_s,
            // or -log p_s), L their p_t-weighted sum. The tile is still in cache.
            scalar_t* tgb = tg[k] + nb;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t* __restrict etc = et + c * tile;
              const scalar_t* __restrict sc = sb + off(c, p0);
              const scalar_t* __restrict tc = tb + off(c, p0);
              scalar_t* __restrict tgc = tgb + off(c, p0);
              for (int64_t i = 0; i < len; ++i) {
                const acc_t lps = shifted_logit(load_acc(sc[i * sp]), ms[i], inv_t) - lzs[i];
                const acc_t lpt = shifted_logit(load_acc(tc[i * sp]), mt[i], inv_t) - lzt[i];
                const acc_t pt = etc[i] * rzt[i];
                const acc_t gv = gscale * teacher_gradient(pt, lpt, lps, acc[i], KL);
                tgc[i * sp] = store_as<scalar_t>(vm[i] != acc_t(0) ? gv : acc_t(0));
              }
            }
          }
          if (HARD) {
            double soft_loss = 0;
            for (int64_t i = 0; i < len; ++i) soft_loss += vm[i] != acc_t(0) ? static_cast<double>(acc[i]) : 0.0;
            hard->partials[task] = static_cast<double>(hard->hard_coef) * hard_loss +
                                   static_cast<double>(hard->soft_coef) * static_cast<double>(scale) * soft_loss;
          } else {
            acc_t* lrow = loss + (k * N + n) * P + p0;
            for (int64_t i = 0; i < len; ++i) lrow[i] = vm[i] != acc_t(0) ? scale * acc[i] : acc_t(0);
          }
        }
      }
    });
  }
};

template <typename scalar_t, typename acc_t, int DIV>
struct SpatialKernel {
  static constexpr bool KL = DIV == kKL;
  static constexpr bool TWO_PASS = DIV == kReverseKL || DIV == kJS;
  int64_t rows, L, K;  // rows = N * C, each of length L (contiguous)
  const scalar_t* const* s;
  const scalar_t* t;
  scalar_t* const* g;
  acc_t* loss;  // (K, rows)
  acc_t inv_t, scale;
  scalar_t* const* tg;  // K teacher gradients, or null when not asked for
  acc_t beta = acc_t(0.5), log_beta = acc_t(0), log_1m_beta = acc_t(0);  // JS's mixture weight

  // Float sums and maxima only vectorise when split over independent lanes (the compiler may
  // not reassociate them itself): each loop below keeps kLanes partial results.
  static constexpr int64_t kLanes = 16;

  // max of the raw x[i] over [0, len), in kLanes independent lanes.
  acc_t row_max(const scalar_t* __restrict x, int64_t len) const {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const int64_t full = len - len % kLanes;
    acc_t lane_max[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) lane_max[j] = ninf;
    for (int64_t i = 0; i < full; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t v = load_acc(x[i + j]);
        lane_max[j] = v > lane_max[j] ? v : lane_max[j];
      }
    acc_t m = ninf;
    for (int64_t j = 0; j < kLanes; ++j) m = lane_max[j] > m ? lane_max[j] : m;
    for (int64_t i = full; i < len; ++i) {
      const acc_t v = load_acc(x[i]);
      m = v > m ? v : m;
    }
    return m;
  }

  // Online softmax over a row, chunk by chunk: running max m of the raw logits and sum z of
  // exp((x - m) * inv_t); returns m and log(z).
  void stats(const scalar_t* __restrict x, acc_t& m_out, acc_t& lz_out) const {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    acc_t m = ninf, z = 0;
    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
      const int64_t len = std::min<int64_t>(kChunk, L - c0);
      const int64_t full = len - len % kLanes;
      const scalar_t* __restrict xc = x + c0;
      const acc_t cm = row_max(xc, len);
      if (cm > m) {
        z = m == ninf ? acc_t(0) : z * exp_nonpos(shifted_logit(m, cm, inv_t));
        m = cm;
      }
      if (m == ninf) continue;  // all -inf so far
      acc_t lane_sum[kLanes] = {};
      for (int64_t i = 0; i < full; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lane_sum[j] += exp_nonpos(shifted_logit(load_acc(xc[i + j]), m, inv_t));
      acc_t cz = 0;
      for (int64_t j = 0; j < kLanes; ++j) cz += lane_sum[j];
      for (int64_t i = full; i < len; ++i) cz += exp_nonpos(shifted_logit(load_acc(xc[i]), m, inv_t));
      z += cz;
    }
    m_out = m;
    lz_out = std::log(z);
  }

  // Loss term and gradient of one element.
  static inline acc_t term(acc_t xt, acc_t xs, acc_t inv_t, acc_t mt, acc_t lzt, acc_t ms, acc_t lzs, acc_t gscale,
                           scalar_t& g) {
    const acc_t lpt = shifted_logit(xt, mt, inv_t) - lzt;
    const acc_t lps = shifted_logit(xs, ms, inv_t) - lzs;
    const acc_t pt = exp_nonpos(lpt);
    const acc_t ps = exp_nonpos(lps);
    g = store_as<scalar_t>(gscale * (ps - pt));
    return divergence_term(pt, lpt, lps, KL);
  }

  // Rows up to kStoredRow elements: a max pass, then one pass that keeps the exponentials
  // exp((x - m) * inv_t) in e and returns m, log of their sum and its reciprocal; the final pass
  // reuses them (two exponentials per element instead of four for the online version).
  void stored_stats(const scalar_t* __restrict x, acc_t* __restrict e, acc_t& m_out, acc_t& lz_out,
                    acc_t& rz_out) const {
    const int64_t full = L - L % kLanes;
    // A row of -inf logits only has no distribution: its terms come out NaN, as in the online
    // version and the reference.
    const acc_t m = row_max(x, L);
    acc_t lane_sum[kLanes] = {};
    for (int64_t i = 0; i < full; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t ex = exp_nonpos(shifted_logit(load_acc(x[i + j]), m, inv_t));
        e[i + j] = ex;
        lane_sum[j] += ex;
      }
    acc_t z = 0;
    for (int64_t j = 0; j < kLanes; ++j) z += lane_sum[j];
    for (int64_t i = full; i < L; ++i) {
      const acc_t ex = exp_nonpos(shifted_logit(load_acc(x[i]), m, inv_t));
      e[i] = ex;
      z += ex;
    }
    m_out = m;
    lz_out = std::log(z);
    rz_out = acc_t(1) / z;
  }

  void run_stored() const {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> et(L), es(L);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* tr = t + r * L;
        acc_t mt, lzt, rzt;
        stored_stats(tr, et.data(), mt, lzt, rzt);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* __restrict sr = s[k] + r * L;
          const scalar_t* __restrict tc = tr;
          scalar_t* __restrict gr = g[k] + r * L;
          const acc_t* __restrict etp = et.data();
          const acc_t* __restrict esp = es.data();
          acc_t ms, lzs, rzs;
          stored_stats(sr, es.data(), ms, lzs, rzs);
          const acc_t gscale = scale * inv_t;
          const int64_t full = L - L % kLanes;
          acc_t lane_part[kLanes] = {};
          double total = 0;
          const auto element = [&](int64_t i) {
            const acc_t lpt = shifted_logit(load_acc(tc[i]), mt, inv_t) - lzt;
            const acc_t lps = shifted_logit(load_acc(sr[i]), ms, inv_t) - lzs;
            const acc_t pt = etp[i] * rzt;
            const acc_t ps = esp[i] * rzs;
            gr[i] = store_as<scalar_t>(gscale * (ps - pt));
            return divergence_term(pt, lpt, lps, KL);
          };
          for (int64_t c0 = 0; c0 < full; c0 += kChunk) {
            // Partial sums per chunk, added in double: the same summation shape as run().
            const int64_t c1 = std::min<int64_t>(full, c0 + kChunk);
            for (int64_t j = 0; j < kLanes; ++j) lane_part[j] = 0;
            for (int64_t i = c0; i < c1; i += kLanes)
              for (int64_t j = 0; j < kLanes; ++j) lane_part[j] += element(i + j);
            acc_t part = 0;
            for (int64_t j = 0; j < kLanes; ++j) part += lane_part[j];
            total += static_cast<double>(part);
          }
          acc_t tail = 0;
          for (int64_t i = full; i < L; ++i) tail += element(i);
          total += static_cast<double>(tail);
          loss[k * rows + r] = static_cast<acc_t>(total) * scale;
          if (tg) {  // the teacher's gradient needs the row's total: one more pass
            scalar_t* __restrict tgr = tg[k] + r * L;
            const acc_t row_total = static_cast<acc_t>(total);
            for (int64_t i = 0; i < L; ++i) {
              const acc_t lpt = shifted_logit(load_acc(tc[i]), mt, inv_t) - lzt;
              const acc_t lps = shifted_logit(load_acc(sr[i]), ms, inv_t) - lzs;
              tgr[i] = store_as<scalar_t>(gscale * teacher_gradient(etp[i] * rzt, lpt, lps, row_total, KL));
            }
          }
        }
      }
    });
  }

  // Reverse KL and JS: per row, the online statistics of teacher and student, a pass for the
  // row's totals (in double), then one for the gradients (kd_loss.h, two_pass_share).
  void run_two_pass() const {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* tr = t + r * L;
        acc_t mt, lzt;
        stats(tr, mt, lzt);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sr = s[k] + r * L;
          scalar_t* gr = g[k] + r * L;
          acc_t ms, lzs;
          stats(sr, ms, lzs);
          const acc_t gscale = scale * inv_t;
          const auto share = [&](int64_t i, acc_t& pt, acc_t& ps) {
            const acc_t lpt = shifted_logit(load_acc(tr[i]), mt, inv_t) - lzt;
            const acc_t lps = shifted_logit(load_acc(sr[i]), ms, inv_t) - lzs;
            pt = exp_nonpos(lpt);
            ps = exp_nonpos(lps);
            return two_pass_share<acc_t, DIV>(pt, lpt, ps, lps, beta, log_beta, log_1m_beta);
          };
          double us = 0, ut = 0;
          for (int64_t c0 = 0; c0 < L; c0 += kChunk) {  // partial sums per chunk, added in double
            const int64_t c1 = std::min<int64_t>(L, c0 + kChunk);
            acc_t pu = 0, pv = 0;
            for (int64_t i = c0; i < c1; ++i) {
              acc_t pt, ps;
              const Share<acc_t> sh = share(i, pt, ps);
              pu += sh.su;
              pv += sh.tu;
            }
            us += static_cast<double>(pu);
            ut += static_cast<double>(pv);
          }
          const acc_t u_total = static_cast<acc_t>(us), t_total = static_cast<acc_t>(ut);
          scalar_t* tgr = tg ? tg[k] + r * L : nullptr;
          for (int64_t i = 0; i < L; ++i) {
            acc_t pt, ps;
            const Share<acc_t> sh = share(i, pt, ps);
            gr[i] = store_as<scalar_t>(ps != acc_t(0) ? gscale * ps * (sh.u - u_total) : acc_t(0));
            if (tgr) {
              const acc_t tv = DIV == kReverseKL ? gscale * (pt - ps)
                                                 : (pt != acc_t(0) ? gscale * pt * (sh.h - t_total) : acc_t(0));
              tgr[i] = store_as<scalar_t>(tv);
            }
          }
          loss[k * rows + r] = static_cast<acc_t>(us + ut) * scale;
        }
      }
    });
  }

  void run() const {
    if constexpr (TWO_PASS) {
      run_two_pass();
      return;
    }
    if (L <= kStoredRow) {
      run_stored();
      return;
    }
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* tr = t + r * L;
        acc_t mt, lzt;
        stats(tr, mt, lzt);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sr = s[k] + r * L;
          scalar_t* gr = g[k] + r * L;
          acc_t ms, lzs;
          stats(sr, ms, lzs);
          const acc_t gscale = scale * inv_t;
          double total = 0;
          for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
            const int64_t len = std::min<int64_t>(kChunk, L - c0);
            const int64_t full = len - len % kLanes;
            const scalar_t* __restrict sc = sr + c0;
            const scalar_t* __restrict tc = tr + c0;
            scalar_t* __restrict gc = gr + c0;
            acc_t lane_part[kLanes] = {};
            for (int64_t i = 0; i < full; i += kLanes)
              for (int64_t j = 0; j < kLanes; ++j)
                lane_part[j] +=
                    term(load_acc(tc[i + j]), load_acc(sc[i + j]), inv_t, mt, lzt, ms, lzs, gscale, gc[i + j]);
            acc_t part = 0;
            for (int64_t j = 0; j < kLanes; ++j) part += lane_part[j];
            for (int64_t i = full; i < len; ++i)
              part += term(load_acc(tc[i]), load_acc(sc[i]), inv_t, mt, lzt, ms, lzs, gscale, gc[i]);
            total += static_cast<double>(part);
          }
          loss[k * rows + r] = static_cast<acc_t>(total) * scale;
          if (tg) {  // the teacher's gradient needs the row's total: one more pass
            scalar_t* __restrict tgr = tg[k] + r * L;
            const acc_t row_total = static_cast<acc_t>(total);
            for (int64_t i = 0; i < L; ++i) {
              const acc_t lpt = shifted_logit(load_acc(tr[i]), mt, inv_t) - lzt;
              const acc_t lps = shifted_logit(load_acc(sr[i]), ms, inv_t) - lzs;
              tgr[i] = store_as<scalar_t>(gscale * teacher_gradient(exp_nonpos(lpt), lpt, lps, row_total, KL));
            }
          }
        }
      }
    });
  }
};

template <typename scalar_t, typename acc_t, bool CONTIG, int DIV>
void run_channel_as(int64_t N, int64_t C, int64_t P, int64_t K, const scalar_t* const* s, const scalar_t* t,
                    scalar_t* const* g, acc_t* loss, const int64_t* labels, int64_t ignore, acc_t inv_t, acc_t scale,
                    scalar_t* const* tg, acc_t beta) {
  ChannelKernel<scalar_t, acc_t, CONTIG, DIV, false> kernel{N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale,
                                                            nullptr, tg};
  kernel.beta = beta;
  kernel.log_beta = std::log(beta);
  kernel.log_1m_beta = std::log1p(-beta);
  kernel.run();
}

template <typename scalar_t, typename acc_t, bool CONTIG>
void run_channel_layout(int divergence, int64_t N, int64_t C, int64_t P, int64_t K, const scalar_t* const* s,
                        const scalar_t* t, scalar_t* const* g, acc_t* loss, const int64_t* labels, int64_t ignore,
                        acc_t inv_t, acc_t scale, scalar_t* const* tg, acc_t beta) {
  switch (divergence) {
    case kKL:
      return run_channel_as<scalar_t, acc_t, CONTIG, kKL>(N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale, tg, beta);
    case kCE:
      return run_channel_as<scalar_t, acc_t, CONTIG, kCE>(N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale, tg, beta);
    case kReverseKL:
      return run_channel_as<scalar_t, acc_t, CONTIG, kReverseKL>(N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale,
                                                                 tg, beta);
    default:
      return run_channel_as<scalar_t, acc_t, CONTIG, kJS>(N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale, tg, beta);
  }
}

template <typename scalar_t, typename acc_t>
void run_channel(bool contig, int divergence, int64_t N, int64_t C, int64_t P, int64_t K, const scalar_t* const* s,
                 const scalar_t* t, scalar_t* const* g, acc_t* loss, const int64_t* labels, int64_t ignore,
                 acc_t inv_t, acc_t scale, scalar_t* const* tg, acc_t beta) {
  if (contig)
    run_channel_layout<scalar_t, acc_t, true>(divergence, N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale, tg, beta);
  else
    run_channel_layout<scalar_t, acc_t, false>(divergence, N, C, P, K, s, t, g, loss, labels, ignore, inv_t, scale, tg,
                                               beta);
}

template <typename scalar_t, typename acc_t>
void run_hard(bool contig, int64_t N, int64_t C, int64_t P, const scalar_t* s, const scalar_t* t, scalar_t* g,
              const int64_t* labels, int64_t ignore, acc_t inv_t, acc_t scale, const HardPart<acc_t>* hard,
              scalar_t* tg) {
  scalar_t* const* tgp = tg ? &tg : nullptr;
  if (contig)
    ChannelKernel<scalar_t, acc_t, true, kKL, true>{N, C, P, 1, &s, t, &g, nullptr, labels, ignore, inv_t, scale, hard, tgp}.run();
  else
    ChannelKernel<scalar_t, acc_t, false, kKL, true>{N, C, P, 1, &s, t, &g, nullptr, labels, ignore, inv_t, scale, hard, tgp}.run();
}

template <typename scalar_t, typename acc_t, int DIV>
void run_spatial_as(int64_t rows, int64_t L, int64_t K, const scalar_t* const* s, const scalar_t* t,
                    scalar_t* const* g, acc_t* loss, acc_t inv_t, acc_t scale, scalar_t* const* tg, acc_t beta) {
  SpatialKernel<scalar_t, acc_t, DIV> kernel{rows, L, K, s, t, g, loss, inv_t, scale, tg};
  kernel.beta = beta;
  kernel.log_beta = std::log(beta);
  kernel.log_1m_beta = std::log1p(-beta);
  kernel.run();
}

template <typename scalar_t, typename acc_t>
void run_spatial(int divergence, int64_t rows, int64_t L, int64_t K, const scalar_t* const* s, const scalar_t* t,
                 scalar_t* const* g, acc_t* loss, acc_t inv_t, acc_t scale, scalar_t* const* tg, acc_t beta) {
  switch (divergence) {
    case kKL:
      return run_spatial_as<scalar_t, acc_t, kKL>(rows, L, K, s, t, g, loss, inv_t, scale, tg, beta);
    case kCE:
      return run_spatial_as<scalar_t, acc_t, kCE>(rows, L, K, s, t, g, loss, inv_t, scale, tg, beta);
    case kReverseKL:
      return run_spatial_as<scalar_t, acc_t, kReverseKL>(rows, L, K, s, t, g, loss, inv_t, scale, tg, beta);
    default:
      return run_spatial_as<scalar_t, acc_t, kJS>(rows, L, K, s, t, g, loss, inv_t, scale, tg, beta);
  }
}
