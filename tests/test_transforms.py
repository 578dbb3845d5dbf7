"""Every differentiable op under forward-mode AD and the torch.func transforms (jvp, vjp, grad,
jacrev, vmap), against the float64 plain-PyTorch reference under the same transform."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import segkernels
from helpers import requires_kernels
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss
from segkernels.ops.max_unpool import reference_max_unpool
from segkernels.ops.one_hot_conv2d import reference_one_hot_conv2d
from segkernels.ops.ps_assemble import reference_ps_assemble, reference_ps_assemble_dense

pytestmark = requires_kernels

D = torch.float64


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, **kw)


def _labels(n, h, w, c, g):
    y = torch.randint(0, c, (n, h, w), generator=g)
    y[torch.rand(n, h, w, generator=g) < 0.25] = 255
    return y


def _cases():
    """(name, our function, the reference function, input shapes): functions of float64 tensors."""
    g = torch.Generator().manual_seed(0)
    y = _labels(2, 4, 5, 3, g)
    x_pool = torch.randn(2, 3, 6, 7, dtype=D, generator=g)
    _, flat = F.max_pool2d(x_pool, 2, return_indices=True)
    windows = torch.tensor([[0, -1, 2], [1, 3, 0], [0, 2, -2]])
    y_map = _labels(2, 5, 6, 3, g)

    def pool_ref(x):
        return F.max_pool2d(x, 2, return_indices=True)[0]

    cases = [
        ("kd_loss channel", lambda s, t: segkernels.kd_loss(s, t, temperature=2.0, labels=y),
         lambda s, t: reference_kd_loss(s, t, temperature=2.0, labels=y), [(2, 3, 4, 5), (2, 3, 4, 5)]),
        ("kd_loss spatial ce", lambda s, t: segkernels.kd_loss(s, t, temperature=3.0, axis="spatial",
                                                             divergence="ce", reduction="none"),
         lambda s, t: reference_kd_loss(s, t, temperature=3.0, axis="spatial", divergence="ce", reduction="none"),
         [(2, 3, 4, 5), (2, 3, 4, 5)]),
        ("kd_loss two students", lambda a, b, t: segkernels.kd_loss([a, b], t, temperature=1.5, reduction="sum"),
         lambda a, b, t: reference_kd_loss([a, b], t, temperature=1.5, reduction="sum"),
         [(2, 3, 4, 5)] * 3),
        ("seg_kd_loss", lambda s, t: segkernels.seg_kd_loss(s, t, y, temperature=2.0, soft_weight=0.5),
         lambda s, t: reference_seg_kd_loss(s, t, y, temperature=2.0, soft_weight=0.5), [(2, 3, 4, 5), (2, 3, 4, 5)]),
        ("max_pool2d", lambda x: segkernels.max_pool2d_with_indices(x, 2)[0], pool_ref, [(2, 3, 6, 7)]),
        ("max_pool2d compact", lambda x: segkernels.max_pool2d_with_indices(x, 2, compact=True)[0], pool_ref,
         [(2, 3, 6, 7)]),
        ("max_pool3d", lambda x: segkernels.max_pool3d_with_indices(x, 2, 1)[0],
         lambda x: F.max_pool3d(x, 2, 1), [(1, 2, 3, 4, 4)]),
        ("max_unpool2d", lambda v: segkernels.max_unpool2d(v, flat, 2, output_size=(6, 7)),
         lambda v: reference_max_unpool(v, flat, (2, 2), (2, 2), (0, 0), (1, 1), (6, 7)), [(2, 3, 3, 3)]),
        ("ps_assemble", lambda s: segkernels.ps_assemble(s, windows, k=2, m=3, pad_value=0.5),
         lambda s: reference_ps_assemble(s, windows, 2, 3, 0.5), [(2, 8, 5, 5)]),
        ("ps_assemble_dense", lambda s: segkernels.ps_assemble_dense(s, k=2, m=3, stride=2),
         lambda s: reference_ps_assemble_dense(s, 2, 3, 2), [(2, 4, 5, 5)]),
        ("one_hot_conv2d", lambda w, b: segkernels.one_hot_conv2d(y_map, w, b, 2, 1),
         lambda w, b: reference_one_hot_conv2d(y_map, w, b, (2, 2), (1, 1), (1, 1)), [(4, 3, 3, 3), (4,)]),
        ("one_hot_conv2d loss", lambda w: segkernels.one_hot_conv2d(y_map, w, None, 1, 1).square().mean(),
         lambda w: reference_one_hot_conv2d(y_map, w, None, (1, 1), (1, 1), (1, 1)).square().mean(), [(4, 3, 3, 3)]),
    ]
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def _inputs(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=D, generator=g) for s in shapes]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp(case):
    # A tangent of zero here was the bug: forward-mode AD went through the ops silently.
    _, fn, ref, shapes = case
    primals, tangents = _inputs(shapes, 1), _inputs(shapes, 2)
    out, t_out = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    ref_out, ref_t = torch.func.jvp(ref, tuple(primals), tuple(tangents))
    _close(out, ref_out)
    _close(t_out, ref_t)
    assert t_out.abs().sum() > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_ad_dual_tensors(case):
    _, fn, ref, shapes = case
    primals, tangents = _inputs(shapes, 1), _inputs(shapes, 2)
    results = []
    for f in (fn, ref):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            results.append(fwAD.unpack_dual(f(*duals)).tangent)
    _close(results[0], results[1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vjp_grad_and_jacrev(case):
    _, fn, ref, shapes = case
    primals = _inputs(shapes, 1)
    out, vjp_fn = torch.func.vjp(fn, *primals)
    ref_out, ref_vjp = torch.func.vjp(ref, *primals)
    cotangent = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(3))
    for a, b in zip(vjp_fn(cotangent), ref_vjp(cotangent)):
        _close(a, b)
    argnums = tuple(range(len(shapes)))
    for a, b in zip(torch.func.jacrev(fn, argnums)(*primals), torch.func.jacrev(ref, argnums)(*primals)):
        _close(a, b)
    if out.dim() == 0:
        for a, b in zip(torch.func.grad(fn, argnums)(*primals), torch.func.grad(ref, argnums)(*primals)):
            _close(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_and_per_sample_gradients(case):
    # Per-sample losses and pooling under vmap: each sample is the op on one (1, ...) slice.
    _, fn, ref, shapes = case
    batched = _inputs([(3, *s) for s in shapes], 4)
    out = torch.vmap(fn)(*batched)
    expected = torch.stack([ref(*(x[i] for x in batched)) for i in range(3)])
    _close(out, expected)
    if expected[0].dim() == 0:  # per-sample gradients, the torch.func recipe
        grads = torch.vmap(torch.func.grad(fn))(*batched)
        ref_grads = torch.stack([torch.func.grad(ref)(*(x[i] for x in batched)) for i in range(3)])
        _close(grads, ref_grads)


def test_hessian_of_kd_loss():
    # torch.func.grad runs the backward with a graph: the kernels' saved gradient is a constant,
    # so the backward takes the gradient's formula there, and second derivatives come out right.
    s, t = _inputs([(1, 3, 2, 2), (1, 3, 2, 2)])
    fn = lambda s: segkernels.kd_loss(s, t, temperature=2.0)  # noqa: E731
    ref = lambda s: reference_kd_loss(s, t, temperature=2.0)  # noqa: E731
    _close(torch.func.hessian(fn)(s), torch.func.hessian(ref)(s))
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(segkernels.kd_loss(x, t, temperature=2.0), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    y = s.clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference_kd_loss(y, t, temperature=2.0), y, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.square().sum(), y)
    _close(gg, ggr)


def test_confusion_matrix_under_vmap_names_the_op():
    logits, labels = torch.randn(3, 2, 4, 5, 5), torch.randint(0, 4, (3, 2, 5, 5))
    with pytest.raises(RuntimeError, match="confusion_matrix.*vmap"):
        torch.vmap(lambda x, y: segkernels.confusion_matrix(x, y, 4))(logits, labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_function_and_its_eager_twin_agree(case, monkeypatch):
    # Outside transforms a recorded call takes the Function's ctx-style twin (25 us cheaper); it
    # runs the same forward, setup_context and backward, so both give the same bits.
    from segkernels import _library

    _, fn, _, shapes = case
    results = []
    for transformed in (False, True):
        monkeypatch.setattr(_library, "_transformed", lambda: transformed)
        inputs = [x.requires_grad_() for x in _inputs(shapes, 1)]
        out = fn(*inputs)
        g = torch.ones_like(out)
        results.append((out.detach(), *torch.autograd.grad(out, inputs, g)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
