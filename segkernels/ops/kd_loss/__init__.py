"""Tempered-softmax distillation losses over dense maps, fused: one pass reads the student(s) and
the teacher once and writes the loss and the student gradient.

``kd_loss`` (pixel-wise KD with axis="channel", channel-wise distillation with axis="spatial",
several students against one teacher) and ``seg_kd_loss`` (Hinton's hard CE + soft KD total).
CPU: C++ (csrc/kd_loss). CUDA: Triton kernels below. The gradient is computed in the forward
and kept in the input dtype; the backward multiplies it by the incoming gradient (no host
synchronisation anywhere).

Design notes:
- Gradient in the forward, not recomputed in the backward: the kernel is bound by its
  exponentials and two reads of the inputs, so recomputing would run it twice, while the
  backward's broadcast multiply is one light streaming pass (on the 2-core CPU for
  (1, 19, 512, 1024): fused op ~30 ms float32 / ~25 ms bfloat16; multiply ~2 ms bfloat16 and
  ~8 ms float32, ~20 ms when its 40 MB output lands on fresh 4 KiB pages). The price is the
  saved gradient: one input-sized tensor until the backward has run.
- Loss maps come out of the op unreduced (float32, 1/C of the input) and are reduced with torch
  ops, so "mean" over valid positions needs no host read of the count, and the incoming
  gradient of every reduction reaches the backward as an expanded (stride-0) tensor.
- Several students: one launch per group of up to 4 students; the teacher's softmax statistics
  are computed once per tile and shared (CPU: the teacher's probabilities of a tile stay in a
  scratch buffer; GPU: the second read of the teacher tile per student hits cache).
- axis="spatial" reads each (n, c) row twice (online softmax for max and sum, then the terms
  and the gradient), whatever the row length. Its inputs are made NCHW-contiguous. On the GPU
  rows are split into segments (about 1024 programs in all) so that few long rows (N * C = 152
  rows of 10^6) still fill the device: per-segment (max, sum) pairs are merged with small torch
  ops between the two launches.
- CUDA float64 runs the eager reference (the Triton kernels compute in float32).
- The shifted logit at a row's maximum must come out exactly 0, or at |x| / T past 2**24 the
  residual overflows exp (the loss once read -inf or NaN at temperature 1e-10: the maximum was
  taken over rounded x / T and the compiler fused x / T - m into one FMA). The C++ kernels take
  the maximum m of the raw logits and compute (x / 2 - m / 2) / T * 2 (kd_loss.h,
  shifted_logit): 0 at the maximum however the arithmetic is contracted, so the extension keeps
  FMA contraction (the exp polynomial uses it), and no overflow where a row spans more than the
  float range but (x - m) / T does not.
  The Triton kernels use the same arithmetic (_shifted). They are still launched with
  enable_fp_fusion=False, which they needed when they computed x / T - max(x / T); whether
  fusion would now make them faster has not been measured on a GPU.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ... import _library
from ..._testing import new_output

__all__ = ["kd_loss", "seg_kd_loss", "reference_kd_loss", "reference_seg_kd_loss"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch references (the eager formulas)


def _reference_one(s, t, temperature, axis, labels, ignore_index, divergence, scale_by_t2):
    t = t.detach()
    if axis == "spatial":
        s, t, dim = (s.flatten(2), t.flatten(2), 2) if s.dim() > 2 else (s.unsqueeze(2), t.unsqueeze(2), 2)
    else:
        dim = 1
    lps = F.log_softmax(s / temperature, dim=dim)
    lpt = F.log_softmax(t / temperature, dim=dim)
    pt = lpt.exp()
    if divergence == "kl":
        term = torch.where(pt != 0, pt * (lpt - lps), torch.zeros_like(pt))
    else:
        term = torch.where(pt != 0, -pt * lps, torch.zeros_like(pt))
    per = term.sum(dim)  # (N, *spatial) or (N, C)
    if scale_by_t2:
        per = per * (temperature * temperature)
    if labels is not None:
        per = torch.where(labels != ignore_index, per, torch.zeros_like(per))
    return per


def reference_kd_loss(
    student,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    axis: str = "channel",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    divergence: str = "kl",
    reduction: str = "mean",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """log_softmax / softmax / sum of p_t (log p_t - log p_s), in eager PyTorch (see kd_loss)."""
    if isinstance(student, (list, tuple)):
        return torch.stack(
            [
                reference_kd_loss(s, teacher, temperature=temperature, axis=axis, labels=labels,
                                  ignore_index=ignore_index, divergence=divergence, reduction=reduction,
                                  scale_by_t2=scale_by_t2)
                for s in student
            ]
        )
    per = _reference_one(student, teacher, temperature, axis, labels, ignore_index, divergence, scale_by_t2)
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    if axis == "spatial":
        denom = max(1, per.numel())
        return total / denom
    if labels is not None:
        return total / (labels != ignore_index).sum().clamp_min(1)
    return total / max(1, per.numel())


def _cross_entropy_or_zero(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """F.cross_entropy's (weighted) mean, but 0 with a zero gradient, not NaN, when no position
    counts (all ignored, an empty batch, or weights summing to 0 over the counted positions)."""
    total = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    counted = labels != ignore_index
    if weight is None:
        denominator = counted.sum().to(total.dtype)
    else:
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        denominator = torch.where(counted, weight[safe], torch.zeros((), dtype=weight.dtype)).sum().to(total.dtype)
    return torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1), 0)


def reference_seg_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    class_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """hard_weight * F.cross_entropy + soft_weight * reference_kd_loss (eager PyTorch), with the
    contract's one departure from F.cross_entropy: a hard term of 0, not NaN, when no position
    counts (all ignored, an empty batch, or weights summing to 0 over the counted positions)."""
    weight = class_weight.to(student.dtype) if class_weight is not None else None
    hard = _cross_entropy_or_zero(student, labels, ignore_index, weight)
    soft = reference_kd_loss(student, teacher, temperature=temperature, labels=labels, ignore_index=ignore_index)
    return hard_weight * hard + soft_weight * soft


# ----------------------------------------------------------------------------------------------
# Triton GPU kernels (also run on CPU tensors under TRITON_INTERPRET=1, for the tests)

_TRITON_MAX_STUDENTS = 4  # students per launch (pointer arguments); more are done in groups

if _library.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _shifted(x, m, inv_t):
        # (x - m) / T as the C++ kernels' shifted_logit (csrc/kd_loss/kd_loss.h): m is the
        # maximum of the raw logits, so this is exactly 0 at the maximum, and halving first keeps
        # x - m in range for rows spanning more than the float range.
        return ((x * 0.5 - m * 0.5) * inv_t) * 2.0

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
    def _channel_student(s_ptr, g_ptr, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                         lscale, hard_coef, w_ptr, loss_ptr, loss_off, KL: tl.constexpr, HARD: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
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
            x = tl.load(s_ptr + base + c_off + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(t_ptr + base + c_off + offs, mask=mask, other=0.0).to(tl.float32)
            lps = _shifted(x, ms, inv_t) - lzs
            lpt = _shifted(y, mt, inv_t) - lzt
            pt = tl.exp(lpt)
            ps = tl.exp(lps)
            acc += _term(pt, lpt, lps, KL)
            gv = gscale * (ps - pt)
            if HARD:
                p1 = tl.exp(x - ms - lz1)
                gv += wy * (p1 - tl.where(lab == c, 1.0, 0.0))
            gv = tl.where(valid, gv, 0.0)
            tl.store(g_ptr + base + c_off + offs, gv.to(g_ptr.dtype.element_ty), mask=mask)
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
        t_ptr, s0, s1, s2, s3, g0, g1, g2, g3, loss_ptr, lab_ptr, w_ptr, coef_ptr,
        C, P, stride_n, stride_c, stride_p, loss_stride_k, ignore_index, inv_t, scale, gscale,
        K: tl.constexpr, KL: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
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
        _channel_student(s0, g0, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                         lscale, hard_coef, w_ptr, loss_ptr, loss_off, KL, HARD, HAS_WEIGHT, BLOCK)
        if K > 1:
            _channel_student(s1, g1, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                             lscale, hard_coef, w_ptr, loss_ptr, loss_off + koff, KL, HARD, HAS_WEIGHT, BLOCK)
        if K > 2:
            _channel_student(s2, g2, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                             lscale, hard_coef, w_ptr, loss_ptr, loss_off + 2 * koff, KL, HARD,
                             HAS_WEIGHT, BLOCK)
        if K > 3:
            _channel_student(s3, g3, t_ptr, base, offs, mask, valid, lab, mt, lzt, C, stride_c, inv_t, gscale,
                             lscale, hard_coef, w_ptr, loss_ptr, loss_off + 3 * koff, KL, HARD,
                             HAS_WEIGHT, BLOCK)

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
            x = tl.load(s_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            y = tl.load(t_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            lps = _shifted(x, ms, inv_t) - lzs
            lpt = _shifted(y, mt, inv_t) - lzt
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

    _SPATIAL_PROGRAMS = 1024  # rows are split into segments until about this many programs run


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() not in (4, 5) or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _layout(tensors: Sequence[torch.Tensor], spatial: bool):
    """(channels_last, tensors in that layout): channels-last is read in place when every input
    has it (channel axis only), anything else is made NCHW-contiguous."""
    cl = not spatial and all(_is_channels_last(x) for x in tensors)
    return cl, [x if cl else x.contiguous() for x in tensors]


def _new_grad(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _map_sizes(k: int, teacher: torch.Tensor, spatial: bool) -> List[int]:
    return [k, teacher.shape[0], teacher.shape[1]] if spatial else [k, teacher.shape[0], *teacher.shape[2:]]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kd_loss_triton(students, teacher, labels, temperature, spatial, kl, scale_by_t2, ignore_index):
    K = len(students)
    cl, tensors = _layout(list(students) + [teacher], spatial)
    students, teacher = tensors[:-1], tensors[-1]
    N, C = teacher.shape[0], teacher.shape[1]
    P = teacher[0, 0].numel() if N > 0 and C > 0 else 0
    loss = new_output(_map_sizes(K, teacher, spatial), dtype=_acc_dtype(teacher.dtype), device=teacher.device)
    grads = [_new_grad(s, cl) for s in students]
    if N * C * P == 0:
        loss.zero_()
        for g in grads:
            g.zero_()
        return loss, grads
    inv_t = 1.0 / temperature
    scale = temperature * temperature if scale_by_t2 else 1.0
    gscale = scale * inv_t
    lab = labels.contiguous() if labels is not None else teacher  # dummy pointer when absent
    loss_stride_k = loss[0].numel()
    for k0 in range(0, K, _TRITON_MAX_STUDENTS):
        group = list(range(k0, min(K, k0 + _TRITON_MAX_STUDENTS)))
        sp = [students[k] for k in group] + [students[group[0]]] * (_TRITON_MAX_STUDENTS - len(group))
        gp = [grads[k] for k in group] + [grads[group[0]]] * (_TRITON_MAX_STUDENTS - len(group))
        lk = loss[k0]
        if spatial:
            kg, rows = len(group), N * C
            block = 1024 if teacher.is_cuda else 64
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
            part = torch.empty(kg * rows * segments, dtype=torch.float32, device=teacher.device)
            _kd_spatial_apply_kernel[(rows, segments)](
                teacher, *sp, *gp, fin, part, P, seg, segments, rows, inv_t, gscale,
                K=kg, KL=kl, BLOCK=block, num_warps=4, enable_fp_fusion=False,
            )
            loss[k0:k0 + kg].copy_(part.view(kg, rows, segments).sum(-1).mul_(scale).view(kg, N, C))
        else:
            block = 256 if teacher.is_cuda else 64
            stride_p = C if cl else 1
            stride_c = 1 if cl else P
            _kd_channel_kernel[(triton.cdiv(P, block) * N,)](
                teacher, *sp, *gp, lk, lab, teacher, teacher,
                C, P, C * P, stride_c, stride_p, loss_stride_k, ignore_index, inv_t, scale, gscale,
                K=len(group), KL=kl, HAS_LABELS=labels is not None, HARD=False, HAS_WEIGHT=False, BLOCK=block,
                enable_fp_fusion=False,
            )
    return loss, grads


def _denominators(labels, class_weight, ignore_index, acc):
    valid = labels != ignore_index
    count = valid.sum().to(acc)
    if class_weight is None:
        wsum = count
    else:
        wsum = torch.where(valid, class_weight.to(acc)[labels.clamp(0, class_weight.numel() - 1)], 0).sum()
    return count, wsum


def _seg_kd_loss_triton(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index):
    cl, (student, teacher) = _layout([student, teacher], False)
    N, C = teacher.shape[0], teacher.shape[1]
    P = teacher[0, 0].numel() if N > 0 and C > 0 else 0
    acc = _acc_dtype(teacher.dtype)
    grad = _new_grad(student, cl)
    if N * C * P == 0:
        grad.zero_()
        return torch.zeros((), dtype=acc, device=teacher.device), grad
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
    block = 256 if teacher.is_cuda else 64
    tiles = triton.cdiv(P, block)
    partials = torch.empty(N * tiles, dtype=torch.float32, device=teacher.device)
    _kd_channel_kernel[(tiles * N,)](
        teacher, student, student, student, student, grad, grad, grad, grad, partials, labels, weight, coef,
        C, P, C * P, 1 if cl else P, C if cl else 1, 0, ignore_index, 1.0 / temperature,
        temperature * temperature, temperature, K=1, KL=True, HAS_LABELS=True, HARD=True,
        HAS_WEIGHT=class_weight is not None, BLOCK=block, enable_fp_fusion=False,
    )
    return partials.sum().to(acc), grad


# ----------------------------------------------------------------------------------------------
# Op registration

if _library.kernels_available():

    @torch.library.register_fake("segkernels::kd_loss")
    def _(students, teacher, labels, temperature, spatial, kl, scale_by_t2, ignore_index):
        cl = not spatial and all(_is_channels_last(x) for x in list(students) + [teacher])
        loss = teacher.new_empty(_map_sizes(len(students), teacher, spatial), dtype=_acc_dtype(teacher.dtype))
        grads = [
            torch.empty_like(s, memory_format=torch.channels_last if s.dim() == 4 else torch.channels_last_3d)
            if cl
            else torch.empty(s.shape, dtype=s.dtype, device=s.device)
            for s in students
        ]
        return loss, grads

    @torch.library.register_fake("segkernels::seg_kd_loss")
    def _(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index):
        cl = _is_channels_last(student) and _is_channels_last(teacher)
        grad = _new_grad(student, cl)
        return teacher.new_empty((), dtype=_acc_dtype(teacher.dtype)), grad

    def _kd_setup(ctx, inputs, output):
        _students, _teacher, _labels, _t, spatial, _kl, _scale, _ignore = inputs
        _loss, grads = output
        ctx.spatial = spatial
        ctx.save_for_backward(*grads)
        # The gradient outputs are not differentiable; without this autograd would hand the
        # backward an input-sized tensor of zeros for each of them.
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)

    def _no_double_backward(name):
        # The saved gradient is a constant to autograd: a graph of this backward would miss the
        # second derivative, so refuse rather than return a silently wrong one.
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(f"segkernels.{name}: double backward (create_graph=True) is not supported")

    def _kd_backward(ctx, grad_loss, _grad_grads):
        _no_double_backward("kd_loss")
        grads = ctx.saved_tensors
        if grad_loss is None:
            return [None] * len(grads), None, None, None, None, None, None, None
        out = []
        for k, g in enumerate(grads):
            gl = grad_loss[k].to(g.dtype)
            gl = gl.reshape(*gl.shape, *([1] * (g.dim() - 2))) if ctx.spatial else gl.unsqueeze(1)
            out.append(g * gl)
        return out, None, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::kd_loss", _kd_backward, setup_context=_kd_setup)

    def _seg_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def _seg_backward(ctx, grad_loss, _grad_grad):
        _no_double_backward("seg_kd_loss")
        (g,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        return g * grad_loss.to(g.dtype), None, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::seg_kd_loss", _seg_backward, setup_context=_seg_setup)

    if _library.triton_available():
        torch.library.register_kernel("segkernels::kd_loss", "cuda", _kd_loss_triton)
        torch.library.register_kernel("segkernels::seg_kd_loss", "cuda", _seg_kd_loss_triton)


# ----------------------------------------------------------------------------------------------
# Public API


def _check_logits(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64 logits, got {x.dtype}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{name} must be (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(x.shape)}")


def _check_ignore_index(ignore_index) -> int:
    # numbers.Integral: numpy integers too; the op takes an int64.
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return int(ignore_index)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    return float(temperature)


def _check_temperature_range(temperature: float, dtype: torch.dtype, squared: bool) -> None:
    # The kernels compute in float32 for 16- and 32-bit logits: a 1 / T or T^2 past that range
    # turns the maximum's own term into 0 * inf and the loss into NaN.
    fmax = torch.finfo(_acc_dtype(dtype)).max
    if temperature < 1.0 / fmax or (squared and temperature > math.sqrt(fmax)):
        what = "1 / T" if temperature < 1.0 else "T^2 (the T^2 scale)"
        raise ValueError(
            f"temperature={temperature!r} is out of range for {dtype} logits: {what} overflows their "
            f"{_acc_dtype(dtype)} arithmetic (pass float64 logits{'' if temperature < 1.0 else ' or scale_by_t2=False'})"
        )


def _check_labels(labels, teacher: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer (int64) tensor, got {labels.dtype}")
    expected = (teacher.shape[0], *teacher.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels must be (N, *spatial) = {expected}, got {tuple(labels.shape)}")
    if labels.device != teacher.device:
        raise ValueError(f"labels must be on {teacher.device}, got {labels.device}")
    return labels.long()


def _rows_as_map(x: torch.Tensor) -> torch.Tensor:
    """(N, C) logits as the (1, C, N, 1) map whose memory they are (channels-last when x is
    contiguous): one image of N positions runs the kernels at full width, where N images of
    one position each paid a per-image cost (about 4x slower on (200000, 19) on the CPU)."""
    return x.t().unsqueeze(0).unsqueeze(-1)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _loss_dtypes(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> tuple:
    """(dtype to compute in, dtype of the result) for logits of one device.

    Outside autocast the logits must share a dtype, which the loss keeps. Under autocast for
    their device, as PyTorch's own losses (log_softmax, kl_div and cross_entropy autocast to
    float32): mixed dtypes are promoted (a bfloat16 student against a float32 teacher), and a
    16-bit loss comes out in float32. The kernels read 16-bit logits as they are; only their
    float32 result is kept instead of being rounded to 16 bits.
    """
    dtypes = [t.dtype for t in tensors]
    if not _autocast_on(tensors[0].device):
        for name, d in zip(names[1:], dtypes[1:]):
            if d != dtypes[0]:
                raise TypeError(f"{name} ({d}) and {names[0]} ({dtypes[0]}) must have the same dtype "
                                "(mixed dtypes are promoted under torch.autocast only)")
        return dtypes[0], dtypes[0]
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    return common, (torch.float32 if common in (torch.float16, torch.bfloat16) else common)


def _use_kernels(teacher: torch.Tensor) -> bool:
    if teacher.device.type == "cpu":
        return _library.use_compiled(teacher)
    if teacher.device.type == "cuda":  # Triton kernels (float32 arithmetic; float64 runs the reference)
        return _library.kernels_available() and _library.triton_available() and teacher.dtype != torch.float64
    return False


def kd_loss(
    student: Union[torch.Tensor, Sequence[torch.Tensor]],
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    axis: str = "channel",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    divergence: str = "kl",
    reduction: str = "mean",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """Tempered-softmax distillation loss between dense logit maps, fused (one pass each way).

    Args:
        student: logits (N, C, *spatial) with 0 to 3 spatial dims, float32/float16/bfloat16/
            float64; or a list of K such students, distilled from the same teacher in one pass
            that reads the teacher once (the result then has a leading K dim).
        teacher: logits of the same shape and dtype (under torch.autocast the dtypes may differ
            and are promoted); a target (it gets no gradient).
        temperature: T > 0; both distributions are softmax(logits / T). With 16- or 32-bit
            logits 1 / T, and T^2 when it scales the loss, must fit in float32 (ValueError
            otherwise).
        axis: "channel": a distribution over the C channels at every position (pixel-wise KD);
            "spatial": a distribution over all positions of every (n, c) (channel-wise KD).
        labels: optional (N, *spatial) integer map (axis="channel" only); positions equal to
            ignore_index contribute nothing and get a zero gradient.
        divergence: "kl" = sum p_t (log p_t - log p_s) (0 where p_t = 0); "ce" = -sum p_t log p_s.
            A NaN teacher logit gives NaN where it reaches (its position, or its (n, c) row), as
            F.kl_div does.
        reduction: "mean" (over valid positions for axis="channel", over N * C rows for
            "spatial"; 0 with a zero gradient when there is none), "sum", or "none" (the
            (N, *spatial) or (N, C) map).
        scale_by_t2: multiply the loss by T^2 (keeps the gradient scale independent of T).

    Returns:
        The loss in the input dtype: a scalar, the map for reduction="none", with a leading (K,)
        dim for a list of students. Computed in float32 for 16-bit inputs, and returned in
        float32 under torch.autocast (as F.kl_div is).
    """
    multi = isinstance(student, (list, tuple))
    students = list(student) if multi else [student]
    if multi and not students:
        raise ValueError("student must be a tensor or a non-empty list of tensors")
    _check_logits(teacher, "teacher")
    names = [f"student[{i}]" if multi else "student" for i in range(len(students))]
    for name, s in zip(names, students):
        _check_logits(s, name)
        if s.shape != teacher.shape:
            raise ValueError(f"{name} {tuple(s.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
        if s.device != teacher.device:
            raise ValueError(f"{name} ({s.device}) and teacher ({teacher.device}) must be on the same device")
    dtype, out_dtype = _loss_dtypes([teacher, *students], ["teacher", *names])
    teacher = teacher.to(dtype)
    students = [s.to(dtype) for s in students]
    temperature = _check_temperature(temperature)
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {scale_by_t2!r}")
    _check_temperature_range(temperature, dtype, scale_by_t2)
    if axis not in ("channel", "spatial"):
        raise ValueError(f"axis must be 'channel' or 'spatial', got {axis!r}")
    if divergence not in ("kl", "ce"):
        raise ValueError(f"divergence must be 'kl' or 'ce', got {divergence!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ignore_index = _check_ignore_index(ignore_index)
    if labels is not None:
        if axis != "channel":
            raise ValueError("labels (an ignore mask) are only supported with axis='channel'")
        labels = _check_labels(labels, teacher)
    spatial = axis == "spatial"

    if not _use_kernels(teacher):
        return reference_kd_loss(students if multi else students[0], teacher, temperature=temperature, axis=axis,
                                 labels=labels, ignore_index=ignore_index, divergence=divergence,
                                 reduction=reduction, scale_by_t2=scale_by_t2).to(out_dtype)
    rows = not spatial and teacher.dim() == 2
    if rows:
        students, teacher = [_rows_as_map(x) for x in students], _rows_as_map(teacher)
        labels = labels.view(1, -1, 1) if labels is not None else None
    maps, _grads = _library.call_below_autograd(
        torch.ops.segkernels.kd_loss.default,
        students, teacher.detach(), labels, temperature, spatial, divergence == "kl", scale_by_t2, ignore_index
    )
    if rows:
        maps = maps.reshape(maps.shape[0], -1)
    if reduction == "none":
        out = maps
    else:
        out = maps.flatten(1).sum(1)
        if reduction == "mean":
            if spatial:
                out = out / max(1, maps[0].numel())
            elif labels is not None:
                out = out / (labels != ignore_index).sum().clamp_min(1).to(out.dtype)
            else:
                out = out / max(1, maps[0].numel())
    out = out.to(out_dtype)
    return out if multi else out[0]


def seg_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    class_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Hinton's total in one pass: hard_weight * F.cross_entropy(student, labels,
    weight=class_weight, ignore_index=ignore_index) + soft_weight * kd_loss(student, teacher,
    temperature=temperature, labels=labels, ignore_index=ignore_index).

    Shapes: student, teacher (N, C, *spatial); labels (N, *spatial) with values in [0, C) or
    ignore_index; otherwise IndexError on the CPU, and on CUDA (where raising would need a host
    synchronisation) a NaN loss and gradient, never an out-of-bounds read. When every
    position is ignored the result is 0 with a zero gradient (F.cross_entropy would give NaN).
    class_weight gets no gradient (as in F.cross_entropy, it must not require one). Returns a
    scalar in the input dtype (float32 under torch.autocast, with mixed dtypes promoted, as
    F.cross_entropy and F.kl_div are).
    """
    _check_logits(student, "student")
    _check_logits(teacher, "teacher")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if student.device != teacher.device:
        raise ValueError(f"student ({student.device}) and teacher ({teacher.device}) must be on the same device")
    dtype, out_dtype = _loss_dtypes([teacher, student], ["teacher", "student"])
    student, teacher = student.to(dtype), teacher.to(dtype)
    temperature = _check_temperature(temperature)
    _check_temperature_range(temperature, dtype, True)
    ignore_index = _check_ignore_index(ignore_index)
    labels = _check_labels(labels, teacher)
    for name, v in (("hard_weight", hard_weight), ("soft_weight", soft_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor) or not class_weight.is_floating_point():
            raise TypeError("class_weight must be a floating-point tensor of shape (C,)")
        if tuple(class_weight.shape) != (teacher.shape[1],):
            raise ValueError(f"class_weight must be (C,) = ({teacher.shape[1]},), got {tuple(class_weight.shape)}")
        if class_weight.device != teacher.device:
            raise ValueError(f"class_weight must be on {teacher.device}, got {class_weight.device}")
        if class_weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("class_weight must not require grad: seg_kd_loss gives it none (as F.cross_entropy)")
    if not _use_kernels(teacher):
        return reference_seg_kd_loss(student, teacher, labels, temperature=temperature, hard_weight=hard_weight,
                                     soft_weight=soft_weight, class_weight=class_weight,
                                     ignore_index=ignore_index).to(out_dtype)
    if teacher.dim() == 2:
        student, teacher, labels = _rows_as_map(student), _rows_as_map(teacher), labels.view(1, -1, 1)
    loss, _grad = _library.call_below_autograd(
        torch.ops.segkernels.seg_kd_loss.default,
        student, teacher.detach(), labels, class_weight, temperature, float(hard_weight), float(soft_weight),
        ignore_index,
    )
    return loss.to(out_dtype)
