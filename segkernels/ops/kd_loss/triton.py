"""Triton kernels of the distillation losses (the CUDA back end; on CPU tensors under
TRITON_INTERPRET=1 for the tests), their launchers, and their registration as the ops' CUDA
kernels.

- Pixel-wise (axis="channel"): one program per tile of positions of one image; the teacher's
  softmax statistics are computed once per tile and shared by up to 4 students per launch.
- axis="spatial": rows are split into segments (about 1024 programs in all) so that a few long
  rows (N * C = 152 rows of 10^6) still fill the device; per-segment (max, sum) pairs are merged
  with small torch ops between the two launches.
- The arithmetic is the C++ kernels' (csrc/kd_loss/kd_loss.h): the shift by the raw maximum is
  exactly 0 at the maximum. The launches keep enable_fp_fusion=False, which the kernels needed
  when they computed x / T - max(x / T); whether fusion would now be faster is unmeasured.
- float32 arithmetic: CUDA float64 runs the reference (see the public API).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _library
from ..._library import new_output
from .registration import _acc_dtype, _layout, _map_sizes, _new_grad

_TRITON_MAX_STUDENTS = 4  # students per launch (pointer arguments); more are done in groups

@triton.jit
def _shifted(x, m, inv_t):
    # (x - m) / T as the C++ kernels' shifted_logit (csrc/kd_loss/kd_loss.h): m is the
    # maximum of the raw logits, so this is exactly 0 at the maximum, and halving first keeps
    # x - m in range for rows spanning more than the float range.
    return ((x * 0.5 - m * 0.5) * inv_t) * 2.0

@triton.jit
def _log_probs(s_ptr, t_ptr, off, mask, ms, lzs, mt, lzt, inv_t):
    # The student's logits at off, and both tempered log-probabilities there, from each
    # softmax's (max, log-sum).
    x = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(t_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return x, _shifted(x, ms, inv_t) - lzs, _shifted(y, mt, inv_t) - lzt

@triton.jit
def _online_sum(z, m, m_new, x, inv_t):
    # The sum z of exp((x - m) / T) rescaled from the running max m of the raw logits to
    # m_new = max(m, x), plus x's own term; -inf safe (an all -inf prefix keeps z = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return z * tl.exp(_shifted(m, m_safe, inv_t)) + tl.exp(_shifted(x, m_safe, inv_t))

@triton.jit
def _online_update(m, z, x, inv_t):
    m_new = tl.maximum(m, x)
    return m_new, _online_sum(z, m, m_new, x, inv_t)

@triton.jit
def _term(pt, lpt, lps, KL: tl.constexpr):
    # 0 where pt == 0 (p log p = 0); the inputs are zeroed there first so that no
    # -inf - (-inf) or 0 * -inf is ever formed.
    has = pt != 0  # NaN (a NaN teacher) passes, as in F.kl_div
    lpt = tl.where(has, lpt, 0.0)
    lps = tl.where(has, lps, 0.0)
    if KL:
        v = pt * (lpt - lps)
    else:
        v = -pt * lps
    return v

@triton.jit
def _teacher_grad(pt, lpt, lps, total, KL: tl.constexpr):
    # The derivative of a position's divergence by the teacher's logit / T: pt (l - total), l the
    # term per unit of pt (log pt - log ps, or -log ps); 0 where pt == 0 (kd_loss.h's
    # teacher_gradient).
    has = pt != 0
    lpt = tl.where(has, lpt, 0.0)
    lps = tl.where(has, lps, 0.0)
    if KL:
        per_unit = lpt - lps
    else:
        per_unit = -lps
    return tl.where(has, pt * (per_unit - total), 0.0)

@triton.jit
def _log_mixture(lpt, lps, log_beta, log_1m_beta):
    # log(beta p_t + (1 - beta) p_s) as kd_loss.h's js_log_mixture: a log-sum-exp of the logs,
    # finite where either is; -inf only where both are; NaN passes through.
    a = log_beta + lpt
    b = log_1m_beta + lps
    hi = tl.maximum(a, b)
    d = tl.minimum(a, b) - hi
    d = tl.where(d == d, d, 0.0)
    r = hi + tl.log(1.0 + tl.exp(d))
    return tl.where((a != a) | (b != b), a + b, r)

@triton.jit
def _share(pt, lpt, ps, lps, beta, log_beta, log_1m_beta, DIV: tl.constexpr):
    # kd_loss.h's two_pass_share for reverse KL (DIV 2) and JS (DIV 3): (ps u, pt h, u, h), the
    # products 0 where their probability is (never 0 * -inf).
    has_s = ps != 0
    has_t = pt != 0
    if DIV == 2:
        u = lps - lpt
        h = u * 0.0
    else:
        lm = _log_mixture(lpt, lps, log_beta, log_1m_beta)
        u = (1.0 - beta) * (lps - lm)
        h = beta * (lpt - lm)
    su = tl.where(has_s, ps * tl.where(has_s, u, 0.0), 0.0)
    tu = tl.where(has_t, pt * tl.where(has_t, h, 0.0), 0.0)
    return su, tu, u, h

@triton.jit
def _channel_student_two_pass(s_ptr, g_ptr, tg_ptr, t_ptr, base, offs, mask, valid, mt, lzt, C, stride_c, inv_t,
                              gscale, lscale, beta, log_beta, log_1m_beta, loss_ptr, loss_off, DIV: tl.constexpr,
                              TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # Reverse KL and JS: a pass for each position's totals, then the gradients ps (u - U) and
    # the teacher's (pt - ps, or pt (h - U_t)); the C++ kernels' two_pass_tile.
    ms = tl.full([BLOCK], float("-inf"), tl.float32)
    zs = tl.zeros([BLOCK], tl.float32)
    for c in range(0, C):
        x = tl.load(s_ptr + base + (base * 0 + c) * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
        ms, zs = _online_update(ms, zs, x, inv_t)
    lzs = tl.log(zs)
    us = tl.zeros([BLOCK], tl.float32)
    ut = tl.zeros([BLOCK], tl.float32)
    for c in range(0, C):
        c_off = (base * 0 + c) * stride_c
        x, lps, lpt = _log_probs(s_ptr, t_ptr, base + c_off + offs, mask, ms, lzs, mt, lzt, inv_t)
        su, tu, u, h = _share(tl.exp(lpt), lpt, tl.exp(lps), lps, beta, log_beta, log_1m_beta, DIV)
        us += su
        ut += tu
    for c in range(0, C):
        c_off = (base * 0 + c) * stride_c
        x, lps, lpt = _log_probs(s_ptr, t_ptr, base + c_off + offs, mask, ms, lzs, mt, lzt, inv_t)
        pt = tl.exp(lpt)
        ps = tl.exp(lps)
        su, tu, u, h = _share(pt, lpt, ps, lps, beta, log_beta, log_1m_beta, DIV)
        gv = tl.where(ps != 0, gscale * ps * (u - us), 0.0)
        tl.store(g_ptr + base + c_off + offs, tl.where(valid, gv, 0.0).to(g_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            if DIV == 2:
                tv = gscale * (pt - ps)
            else:
                tv = tl.where(pt != 0, gscale * pt * (h - ut), 0.0)
            tl.store(tg_ptr + base + c_off + offs, tl.where(valid, tv, 0.0).to(tg_ptr.dtype.element_ty), mask=mask)
    acc = tl.where(valid, us + ut, 0.0)
    tl.store(loss_ptr + loss_off + tl.arange(0, BLOCK), acc * lscale, mask=mask)

@triton.jit
def _student(s_ptr, g_ptr, tg_ptr, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale, lscale,
             hard_coef, w_ptr, loss_ptr, loss_off, beta, log_beta, log_1m_beta, DIV: tl.constexpr,
             HARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    if DIV >= 2:
        _channel_student_two_pass(s_ptr, g_ptr, tg_ptr, t_ptr, base, offs, mask, valid, mt, lzt, C, stride_c, inv_t,
                                  gscale, lscale, beta, log_beta, log_1m_beta, loss_ptr, loss_off, DIV, TEACHER_GRAD,
                                  BLOCK)
    else:
        _channel_student(s_ptr, g_ptr, tg_ptr, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t,
                         gscale, lscale, hard_coef, w_ptr, loss_ptr, loss_off, DIV == 0, HARD, HAS_WEIGHT,
                         TEACHER_GRAD, BLOCK)

@triton.jit
def _channel_student(s_ptr, g_ptr, tg_ptr, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                     lscale, hard_coef, w_ptr, loss_ptr, loss_off, KL: tl.constexpr, HARD: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    ms = tl.full([BLOCK], float("-inf"), tl.float32)
    zs = tl.zeros([BLOCK], tl.float32)
    z1 = tl.zeros([BLOCK], tl.float32)
    for c in range(0, C):
        x = tl.load(s_ptr + base + (base * 0 + c) * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(ms, x)
        zs = _online_sum(zs, ms, m_new, x, inv_t)
        if HARD:  # the softmax at T = 1 shares the maximum (it does not depend on T)
            z1 = _online_sum(z1, ms, m_new, x, 1.0)
        ms = m_new
    lzs = tl.log(zs)
    acc = tl.zeros([BLOCK], tl.float32)
    wy = tl.zeros([BLOCK], tl.float32)
    hard_loss = tl.zeros([BLOCK], tl.float32)
    if HARD:
        lz1 = tl.log(z1)
        if HAS_WEIGHT:
            wy = tl.load(w_ptr + lab, mask=mask & valid, other=0.0).to(tl.float32)
        else:
            wy = tl.where(valid, 1.0, 0.0)
        sy = tl.load(s_ptr + base + lab * stride_c + offs, mask=mask & valid, other=0.0).to(tl.float32)
        # Halved, as in _shifted (doubled with the coefficient below): the logit at the label
        # minus the maximum may pass the float range where the mean cross-entropy does not.
        hard_loss = tl.where(valid, -((sy * 0.5 - ms * 0.5) - lz1 * 0.5) * wy, 0.0)
        wy = wy * hard_coef
    for c in range(0, C):
        c_off = (base * 0 + c) * stride_c  # int64, as in the teacher's loop
        x, lps, lpt = _log_probs(s_ptr, t_ptr, base + c_off + offs, mask, ms, lzs, mt, lzt, inv_t)
        pt = tl.exp(lpt)
        ps = tl.exp(lps)
        acc += _term(pt, lpt, lps, KL)
        gv = gscale * (ps - pt)
        if HARD:
            p1 = tl.exp(x - ms - lz1)
            gv += wy * (p1 - tl.where(lab == c, 1.0, 0.0))
        gv = tl.where(valid, gv, 0.0)
        tl.store(g_ptr + base + c_off + offs, gv.to(g_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:  # needs each position's total: a second pass over the tile (cached)
        for c in range(0, C):
            c_off = (base * 0 + c) * stride_c
            x, lps, lpt = _log_probs(s_ptr, t_ptr, base + c_off + offs, mask, ms, lzs, mt, lzt, inv_t)
            tgv = tl.where(valid, gscale * _teacher_grad(tl.exp(lpt), lpt, lps, acc, KL), 0.0)
            tl.store(tg_ptr + base + c_off + offs, tgv.to(tg_ptr.dtype.element_ty), mask=mask)
    acc = tl.where(valid, acc, 0.0)
    if HARD:
        # one partial loss per program, summed afterwards (deterministic, no float atomics)
        # Each term scaled before the sum: a block of soft terms may pass the float range
        # on its own (logits near +-max) where the scaled mean does not, or soft_weight is 0.
        total = tl.sum(hard_loss * (2.0 * hard_coef), axis=0) + tl.sum(acc * lscale, axis=0)
        tl.store(loss_ptr + loss_off, total)
    else:
        tl.store(loss_ptr + loss_off + tl.arange(0, BLOCK), acc * lscale, mask=mask)

@triton.jit
def _kd_channel_kernel(
    t_ptr, s0, s1, s2, s3, g0, g1, g2, g3, tg0, tg1, tg2, tg3, loss_ptr, lab_ptr, w_ptr, coef_ptr,
    C, P, stride_n, stride_c, stride_p, loss_stride_k, ignore_index, inv_t, scale, gscale, beta, log_beta, log_1m_beta,
    K: tl.constexpr, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # One flat grid axis: a second axis would cap the batch at 65535 (CUDA's grid y limit).
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(P, BLOCK)
    n = pid // tiles
    pid_p = pid % tiles
    pos = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = pos < P
    offs = pos * stride_p
    base = n * stride_n
    if HAS_LABELS:
        lab = tl.load(lab_ptr + n * P + pos, mask=mask, other=ignore_index)
        valid = mask & (lab != ignore_index)
        if HARD:
            # The hard term reads the class weight and the logit at the label: an
            # out-of-range label (the wrapper turns the result NaN) must never be read through.
            valid = valid & (lab >= 0) & (lab < C)
        lab = tl.where(valid, lab, 0)
    else:
        lab = tl.zeros([BLOCK], tl.int64)
        valid = mask
    # Teacher statistics once, for every student of the launch.
    mt = tl.full([BLOCK], float("-inf"), tl.float32)
    zt = tl.zeros([BLOCK], tl.float32)
    for c in range(0, C):
        # (base * 0 + c): c as int64 (the loop index is int32, a plain int when interpreted),
        # since (C - 1) * H * W may pass 2**31.
        y = tl.load(t_ptr + base + (base * 0 + c) * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
        mt, zt = _online_update(mt, zt, y, inv_t)
    lzt = tl.log(zt)
    lscale = scale
    hard_coef = 0.0
    if HARD:
        # hard_weight / sum of valid weights and soft_weight / valid count, computed on the
        # device beforehand (0 when every position is ignored): no host synchronisation.
        hard_coef = tl.load(coef_ptr)
        soft_coef = tl.load(coef_ptr + 1)
        gscale = gscale * soft_coef
        lscale = scale * soft_coef
        loss_off = pid
    else:
        loss_off = n * P + pid_p * BLOCK
    # As int64 (pid * 0 + ...): 3 * loss_stride_k (= 3 * N * P) may pass 2**31.
    koff = pid * 0 + loss_stride_k
    _student(s0, g0, tg0, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale, lscale,
             hard_coef, w_ptr, loss_ptr, loss_off, beta, log_beta, log_1m_beta, DIV, HARD, HAS_WEIGHT, TEACHER_GRAD,
             BLOCK)
    if K > 1:
        _student(s1, g1, tg1, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale, lscale,
                 hard_coef, w_ptr, loss_ptr, loss_off + koff, beta, log_beta, log_1m_beta, DIV, HARD, HAS_WEIGHT,
                 TEACHER_GRAD, BLOCK)
    if K > 2:
        _student(s2, g2, tg2, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale, lscale,
                 hard_coef, w_ptr, loss_ptr, loss_off + 2 * koff, beta, log_beta, log_1m_beta, DIV, HARD,
                 HAS_WEIGHT, TEACHER_GRAD, BLOCK)
    if K > 3:
        _student(s3, g3, tg3, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale, lscale,
                 hard_coef, w_ptr, loss_ptr, loss_off + 3 * koff, beta, log_beta, log_1m_beta, DIV, HARD,
                 HAS_WEIGHT, TEACHER_GRAD, BLOCK)

@triton.jit
def _segment_stats(x_ptr, row, start, end, inv_t, BLOCK: tl.constexpr):
    # Online softmax over row[start:end]: per-lane running max and sum, merged at the end.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row + idx, mask=idx < end, other=float("-inf")).to(tl.float32)
        m, z = _online_update(m, z, x, inv_t)
    mm = tl.max(m, axis=0)
    mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
    return mm, tl.sum(z * tl.exp(_shifted(m, mm_safe, inv_t)), axis=0)

@triton.jit
def _kd_spatial_stats_kernel(
    t_ptr, s0, s1, s2, s3, stats_ptr, L, SEG, S, inv_t, K: tl.constexpr, BLOCK: tl.constexpr,
):
    # Pass 1 of axis="spatial": each program takes one segment of one (n, c) row and stores
    # the (max, sum) of the teacher and of every student; rows are split into segments so
    # that a few long rows still fill the GPU.
    r = tl.program_id(0).to(tl.int64)
    sg = tl.program_id(1).to(tl.int64)
    row = r * L
    start = sg * SEG
    end = tl.minimum(start + SEG, L)
    out = stats_ptr + (r * S + sg) * (2 * (K + 1))
    m, z = _segment_stats(t_ptr, row, start, end, inv_t, BLOCK)
    tl.store(out, m)
    tl.store(out + 1, z)
    m, z = _segment_stats(s0, row, start, end, inv_t, BLOCK)
    tl.store(out + 2, m)
    tl.store(out + 3, z)
    if K > 1:
        m, z = _segment_stats(s1, row, start, end, inv_t, BLOCK)
        tl.store(out + 4, m)
        tl.store(out + 5, z)
    if K > 2:
        m, z = _segment_stats(s2, row, start, end, inv_t, BLOCK)
        tl.store(out + 6, m)
        tl.store(out + 7, z)
    if K > 3:
        m, z = _segment_stats(s3, row, start, end, inv_t, BLOCK)
        tl.store(out + 8, m)
        tl.store(out + 9, z)

@triton.jit
def _spatial_apply(s_ptr, g_ptr, t_ptr, row, start, end, mt, lzt, ms, lzs, inv_t, gscale,
                   KL: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        x, lps, lpt = _log_probs(s_ptr, t_ptr, row + idx, m, ms, lzs, mt, lzt, inv_t)
        pt = tl.exp(lpt)
        ps = tl.exp(lps)
        acc += tl.where(m, _term(pt, lpt, lps, KL), 0.0)
        tl.store(g_ptr + row + idx, (gscale * (ps - pt)).to(g_ptr.dtype.element_ty), mask=m)
    return tl.sum(acc, axis=0)

@triton.jit
def _kd_spatial_apply_kernel(
    t_ptr, s0, s1, s2, s3, g0, g1, g2, g3, fin_ptr, part_ptr, L, SEG, S, rows, inv_t, gscale,
    K: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr,
):
    # Pass 2 of axis="spatial": with every row's (max, log-sum) known, one segment's terms and
    # gradient; one partial loss per (student, row, segment), summed afterwards.
    r = tl.program_id(0).to(tl.int64)
    sg = tl.program_id(1).to(tl.int64)
    row = r * L
    start = sg * SEG
    end = tl.minimum(start + SEG, L)
    fin = fin_ptr + r * (2 * (K + 1))
    mt = tl.load(fin)
    lzt = tl.load(fin + 1)
    v = _spatial_apply(s0, g0, t_ptr, row, start, end, mt, lzt, tl.load(fin + 2), tl.load(fin + 3), inv_t,
                       gscale, KL, BLOCK)
    tl.store(part_ptr + r * S + sg, v)
    if K > 1:
        v = _spatial_apply(s1, g1, t_ptr, row, start, end, mt, lzt, tl.load(fin + 4), tl.load(fin + 5), inv_t,
                           gscale, KL, BLOCK)
        tl.store(part_ptr + (rows + r) * S + sg, v)
    if K > 2:
        v = _spatial_apply(s2, g2, t_ptr, row, start, end, mt, lzt, tl.load(fin + 6), tl.load(fin + 7), inv_t,
                           gscale, KL, BLOCK)
        tl.store(part_ptr + (2 * rows + r) * S + sg, v)
    if K > 3:
        v = _spatial_apply(s3, g3, t_ptr, row, start, end, mt, lzt, tl.load(fin + 8), tl.load(fin + 9), inv_t,
                           gscale, KL, BLOCK)
        tl.store(part_ptr + (3 * rows + r) * S + sg, v)

@triton.jit
def _segment_and_stats(fin_ptr, L, SEG, stats, K1):
    # The (row, segment) of a program of the spatial passes, and the row's teacher and student
    # (max, log-sum) from fin (stats: the student's slot; K1 slots a row).
    r = tl.program_id(0).to(tl.int64)
    sg = tl.program_id(1).to(tl.int64)
    start = sg * SEG
    fin = fin_ptr + r * (2 * K1)
    return (r, sg, r * L, start, tl.minimum(start + SEG, L), tl.load(fin), tl.load(fin + 1), tl.load(fin + stats),
            tl.load(fin + stats + 1))

@triton.jit
def _kd_spatial_teacher_kernel(
    t_ptr, s_ptr, tg_ptr, fin_ptr, total_ptr, L, SEG, stats, K1, inv_t, gscale,
    KL: tl.constexpr, BLOCK: tl.constexpr,
):
    # Pass 3 of axis="spatial", only when the teacher needs its gradient: with the rows' totals
    # known, one segment of one student's teacher gradient. stats: the student's slot in fin.
    r, sg, row, start, end, mt, lzt, ms, lzs = _segment_and_stats(fin_ptr, L, SEG, stats, K1)
    total = tl.load(total_ptr + r)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        x, lps, lpt = _log_probs(s_ptr, t_ptr, row + idx, m, ms, lzs, mt, lzt, inv_t)
        tgv = gscale * _teacher_grad(tl.exp(lpt), lpt, lps, total, KL)
        tl.store(tg_ptr + row + idx, tgv.to(tg_ptr.dtype.element_ty), mask=m)

@triton.jit
def _kd_spatial_sums_kernel(
    t_ptr, s_ptr, fin_ptr, part_ptr, L, SEG, S, stats, K1, inv_t, beta, log_beta, log_1m_beta,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):
    # Reverse KL and JS on axis="spatial", pass 2: one segment's sums of ps u and pt h (the
    # row's totals, merged afterwards); stats: the student's slot in fin.
    r, sg, row, start, end, mt, lzt, ms, lzs = _segment_and_stats(fin_ptr, L, SEG, stats, K1)
    us = tl.zeros([BLOCK], tl.float32)
    ut = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        x, lps, lpt = _log_probs(s_ptr, t_ptr, row + idx, m, ms, lzs, mt, lzt, inv_t)
        su, tu, u, h = _share(tl.exp(lpt), lpt, tl.exp(lps), lps, beta, log_beta, log_1m_beta, DIV)
        us += tl.where(m, su, 0.0)
        ut += tl.where(m, tu, 0.0)
    tl.store(part_ptr + (r * S + sg) * 2, tl.sum(us, axis=0))
    tl.store(part_ptr + (r * S + sg) * 2 + 1, tl.sum(ut, axis=0))

@triton.jit
def _kd_spatial_grads_kernel(
    t_ptr, s_ptr, g_ptr, tg_ptr, fin_ptr, total_ptr, L, SEG, stats, K1, inv_t, gscale, beta, log_beta, log_1m_beta,
    DIV: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # Reverse KL and JS on axis="spatial", pass 3: with the rows' totals known, one segment's
    # student gradient ps (u - U) and, when asked, the teacher's.
    r, sg, row, start, end, mt, lzt, ms, lzs = _segment_and_stats(fin_ptr, L, SEG, stats, K1)
    us = tl.load(total_ptr + r * 2)
    ut = tl.load(total_ptr + r * 2 + 1)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        x, lps, lpt = _log_probs(s_ptr, t_ptr, row + idx, m, ms, lzs, mt, lzt, inv_t)
        pt = tl.exp(lpt)
        ps = tl.exp(lps)
        su, tu, u, h = _share(pt, lpt, ps, lps, beta, log_beta, log_1m_beta, DIV)
        gv = tl.where(ps != 0, gscale * ps * (u - us), 0.0)
        tl.store(g_ptr + row + idx, gv.to(g_ptr.dtype.element_ty), mask=m)
        if TEACHER_GRAD:
            if DIV == 2:
                tv = gscale * (pt - ps)
            else:
                tv = tl.where(pt != 0, gscale * pt * (h - ut), 0.0)
            tl.store(tg_ptr + row + idx, tv.to(tg_ptr.dtype.element_ty), mask=m)

_SPATIAL_PROGRAMS = 1024  # rows are split into segments until about this many programs run

def _kd_loss_triton(students, teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index,
                    teacher_grad=False, beta=0.5):
    K = len(students)
    kl = divergence == 0
    mix = (beta, math.log(beta), math.log1p(-beta))
    cl, tensors = _layout(list(students) + [teacher], spatial)
    students, teacher = tensors[:-1], tensors[-1]
    N, C = teacher.shape[0], teacher.shape[1]
    P = teacher[0, 0].numel() if N > 0 and C > 0 else 0
    loss = new_output(_map_sizes(K, teacher, spatial), dtype=_acc_dtype(teacher.dtype), device=teacher.device)
    grads = [_new_grad(s, cl) for s in students]
    tgrads = [_new_grad(teacher, cl) for _ in students] if teacher_grad else []
    if N * C * P == 0:
        loss.zero_()
        for g in grads + tgrads:
            g.zero_()
        return loss, grads, tgrads
    inv_t = 1.0 / temperature
    scale = temperature * temperature if scale_by_t2 else 1.0
    gscale = scale * inv_t
    # GPU sizes, or small ones for the interpreter (CPU tensors in the tests); chosen by the mode,
    # not the device, so that the sm_90 ahead-of-time test compiles what a GPU runs.
    interpreting = _library.triton_interpreting()
    lab = labels.contiguous() if labels is not None else teacher  # dummy pointer when absent
    loss_stride_k = loss[0].numel()
    for k0 in range(0, K, _TRITON_MAX_STUDENTS):
        group = list(range(k0, min(K, k0 + _TRITON_MAX_STUDENTS)))
        sp = [students[k] for k in group] + [students[group[0]]] * (_TRITON_MAX_STUDENTS - len(group))
        gp = [grads[k] for k in group] + [grads[group[0]]] * (_TRITON_MAX_STUDENTS - len(group))
        tgp = [tgrads[k] for k in group] + [tgrads[group[0]]] * (_TRITON_MAX_STUDENTS - len(group)) if tgrads else gp
        lk = loss[k0]
        if spatial:
            kg, rows = len(group), N * C
            block = 64 if interpreting else 1024
            segments = max(1, min(triton.cdiv(P, 4 * block), triton.cdiv(_SPATIAL_PROGRAMS, rows)))
            seg = triton.cdiv(triton.cdiv(P, segments), block) * block
            segments = triton.cdiv(P, seg)
            stats = torch.empty(rows * segments * 2 * (kg + 1), dtype=torch.float32, device=teacher.device)
            _kd_spatial_stats_kernel[(rows, segments)](
                teacher, *sp, stats, P, seg, segments, inv_t, K=kg, BLOCK=block, num_warps=4,
                enable_fp_fusion=False,
            )
            # Merge the segments' (raw max, sum) into each row's (max, log-sum): small torch ops
            # on the device, no synchronisation. The rescale is _shifted's arithmetic.
            st = stats.view(rows, segments, kg + 1, 2)
            m, z = st[..., 0], st[..., 1]
            top = m.amax(1)
            top_safe = torch.where(top == float("-inf"), torch.zeros_like(top), top)
            lz = torch.log((z * torch.exp(((m * 0.5 - top_safe.unsqueeze(1) * 0.5) * inv_t) * 2.0)).sum(1))
            fin = torch.stack([top, lz], dim=-1).contiguous()
            if divergence >= 2:  # reverse KL, JS: totals first, then the gradients
                for j, k in enumerate(group):
                    part = torch.empty(rows * segments * 2, dtype=torch.float32, device=teacher.device)
                    _kd_spatial_sums_kernel[(rows, segments)](
                        teacher, students[k], fin, part, P, seg, segments, 2 * (j + 1), kg + 1, inv_t, *mix,
                        DIV=divergence, BLOCK=block, num_warps=4, enable_fp_fusion=False,
                    )
                    totals = part.view(rows, segments, 2).sum(1).contiguous()
                    _kd_spatial_grads_kernel[(rows, segments)](
                        teacher, students[k], grads[k], tgrads[k] if teacher_grad else grads[k], fin, totals, P, seg,
                        2 * (j + 1), kg + 1, inv_t, gscale, *mix, DIV=divergence, TEACHER_GRAD=teacher_grad,
                        BLOCK=block, num_warps=4, enable_fp_fusion=False,
                    )
                    loss[k].copy_(totals.sum(-1).mul(scale).view(N, C))
                continue
            part = torch.empty(kg * rows * segments, dtype=torch.float32, device=teacher.device)
            _kd_spatial_apply_kernel[(rows, segments)](
                teacher, *sp, *gp, fin, part, P, seg, segments, rows, inv_t, gscale,
                K=kg, KL=kl, BLOCK=block, num_warps=4, enable_fp_fusion=False,
            )
            totals = part.view(kg, rows, segments).sum(-1)
            loss[k0:k0 + kg].copy_(totals.mul(scale).view(kg, N, C))
            for j, k in enumerate(group if teacher_grad else []):
                _kd_spatial_teacher_kernel[(rows, segments)](
                    teacher, students[k], tgrads[k], fin, totals[j].contiguous(), P, seg, 2 * (j + 1), kg + 1,
                    inv_t, gscale, KL=kl, BLOCK=block, num_warps=4, enable_fp_fusion=False,
                )
        else:
            block = 64 if interpreting else 256
            stride_p = C if cl else 1
            stride_c = 1 if cl else P
            _kd_channel_kernel[(triton.cdiv(P, block) * N,)](
                teacher, *sp, *gp, *tgp, lk, lab, teacher, teacher,
                C, P, C * P, stride_c, stride_p, loss_stride_k, ignore_index, inv_t, scale, gscale, *mix,
                K=len(group), DIV=divergence, HAS_LABELS=labels is not None, HARD=False, HAS_WEIGHT=False,
                TEACHER_GRAD=teacher_grad, BLOCK=block, enable_fp_fusion=False,
            )
    return loss, grads, tgrads


def _denominators(labels, class_weight, ignore_index, acc):
    valid = labels != ignore_index
    count = valid.sum().to(acc)
    if class_weight is None:
        wsum = count
    else:
        wsum = torch.where(valid, class_weight.to(acc)[labels.clamp(0, class_weight.numel() - 1)], 0).sum()
    return count, wsum


def _seg_kd_loss_triton(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index,
                        teacher_grad=False):
    cl, (student, teacher) = _layout([student, teacher], False)
    N, C = teacher.shape[0], teacher.shape[1]
    P = teacher[0, 0].numel() if N > 0 and C > 0 else 0
    acc = _acc_dtype(teacher.dtype)
    grad = _new_grad(student, cl)
    tgrad = _new_grad(teacher, cl) if teacher_grad else teacher.new_empty((0,))
    if N * C * P == 0:
        grad.zero_()
        tgrad.zero_()
        return torch.zeros((), dtype=acc, device=teacher.device), grad, tgrad
    labels = labels.contiguous()
    count, wsum = _denominators(labels, class_weight, ignore_index, torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=teacher.device)
    coef = torch.stack([
        torch.where(wsum != 0, hard_weight / torch.where(wsum != 0, wsum, 1.0), zero),
        torch.where(count != 0, soft_weight / count.clamp_min(1), zero),
    ])
    # An out-of-range label cannot raise without a host synchronisation (the issue rules them
    # out here): the kernel never reads through one, and NaN coefficients make the loss and
    # the whole gradient NaN, on the device, with no extra pass over the gradient.
    bad = (((labels < 0) | (labels >= C)) & (labels != ignore_index)).any()
    coef = torch.where(bad, float("nan"), coef).contiguous()
    weight = class_weight.to(torch.float32).contiguous() if class_weight is not None else coef
    block = 64 if _library.triton_interpreting() else 256
    tiles = triton.cdiv(P, block)
    partials = torch.empty(N * tiles, dtype=torch.float32, device=teacher.device)
    _kd_channel_kernel[(tiles * N,)](
        teacher, student, student, student, student, grad, grad, grad, grad, *([tgrad] * 4 if teacher_grad else [grad] * 4),
        partials, labels, weight, coef,
        C, P, C * P, 1 if cl else P, C if cl else 1, 0, ignore_index, 1.0 / temperature,
        temperature * temperature, temperature, 0.5, math.log(0.5), math.log(0.5), K=1, DIV=0, HAS_LABELS=True,
        HARD=True,
        HAS_WEIGHT=class_weight is not None, TEACHER_GRAD=teacher_grad, BLOCK=block, enable_fp_fusion=False,
    )
    return partials.sum().to(acc), grad, tgrad


if _library.kernels_available():  # the ops' schemas come from the compiled extension
    torch.library.register_kernel("segkernels::kd_loss", "cuda", _kd_loss_triton)
    torch.library.register_kernel("segkernels::seg_kd_loss", "cuda", _seg_kd_loss_triton)
