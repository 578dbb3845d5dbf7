"""confusion_matrix (argmax fused) against torchmetrics and the package reference."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    compile_launches_for_sm90,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
)
from segkernels._library import triton_available
from segkernels.ops.confusion_matrix import reference_confusion_matrix

pytestmark = requires_kernels


def _case(shape, classes, dtype, device, ignore_fraction=0.1, ties=False):
    n, spatial = shape[0], shape[1:]
    if ties:  # few distinct values: many positions with tied maxima
        logits = torch.randint(0, 3, (n, classes, *spatial), device=device).to(dtype)
    else:
        logits = torch.randn(n, classes, *spatial, device=device).to(dtype)
    labels = torch.randint(0, classes, (n, *spatial), device=device)
    labels[torch.rand(labels.shape, device=device) < ignore_fraction] = 255
    return logits, labels


def _torchmetrics(pred, labels, classes):
    metric = MulticlassConfusionMatrix(num_classes=classes, ignore_index=255)
    return metric(pred.reshape(-1).cpu(), labels.reshape(-1).cpu()).long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,classes", [((2, 33, 47), 19), ((3, 50), 7), ((1, 5, 6, 7), 4), ((2, 1, 1), 2)])
def test_logits_match_torchmetrics(device, dtype, shape, classes):
    for ties in (False, True):
        logits, labels = _case(shape, classes, dtype, device, ties=ties)
        cm = segkernels.confusion_matrix(logits, labels, classes)
        assert cm.dtype == torch.int64 and cm.shape == (classes, classes)
        expected = _torchmetrics(logits.argmax(1), labels, classes)
        assert torch.equal(cm.cpu(), expected)
        assert torch.equal(cm, reference_confusion_matrix(logits, labels, classes))


@pytest.mark.parametrize("device", DEVICES)
def test_predictions_and_channels_last(device):
    logits, labels = _case((2, 20, 24), 6, torch.float32, device)
    expected = _torchmetrics(logits.argmax(1), labels, 6)
    assert torch.equal(segkernels.confusion_matrix(logits.argmax(1), labels, 6).cpu(), expected)
    assert torch.equal(segkernels.confusion_matrix(logits.argmax(1).int(), labels.to(torch.uint8), 6).cpu(), expected)
    cl = logits.contiguous(memory_format=torch.channels_last)
    assert torch.equal(segkernels.confusion_matrix(cl, labels, 6).cpu(), expected)
    strided = logits[..., ::2]
    assert torch.equal(
        segkernels.confusion_matrix(strided, labels[..., ::2], 6).cpu(),
        _torchmetrics(strided.argmax(1), labels[..., ::2], 6),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_rules_ties_and_nan(device):
    logits = torch.tensor([[[1.0, 0.0, 2.0, float("nan")], [1.0, 3.0, 2.0, 5.0], [0.0, 3.0, float("nan"), float("nan")]]],
                          device=device)  # (1, 3 classes, 4 positions)
    labels = torch.tensor([[0, 1, 2, 0]], device=device)
    cm = segkernels.confusion_matrix(logits, labels, 3)
    # argmax per position: 0 (tie to the first), 1 (tie), 2 (the NaN), 0 (the first NaN)
    expected = torch.zeros(3, 3, dtype=torch.long)
    expected[0, 0] += 2
    expected[1, 1] += 1
    expected[2, 2] += 1
    assert torch.equal(cm.cpu(), expected)
    assert torch.equal(logits.argmax(1).cpu(), torch.tensor([[0, 1, 2, 0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_ignored_and_empty(device):
    logits, labels = _case((2, 8, 9), 5, torch.float32, device)
    labels.fill_(255)
    assert torch.equal(segkernels.confusion_matrix(logits, labels, 5).cpu(), torch.zeros(5, 5, dtype=torch.long))
    empty = segkernels.confusion_matrix(torch.randn(0, 5, 4, 4, device=device), torch.zeros(0, 4, 4, dtype=torch.long,
                                        device=device), 5)
    assert torch.equal(empty.cpu(), torch.zeros(5, 5, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    logits, labels = _case((4, 64, 64), 19, torch.float32, device)
    runs = [segkernels.confusion_matrix(logits, labels, 19) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    logits, labels = _case((1, 4, 4), 3, torch.float32, device, ignore_fraction=0.0)
    bad = labels.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(IndexError, match="outside"):
        segkernels.confusion_matrix(logits, bad, 3)
    bad[0, 0, 0] = -1
    with pytest.raises(IndexError, match="outside"):
        segkernels.confusion_matrix(logits, bad, 3)
    with pytest.raises(ValueError, match="channels"):
        segkernels.confusion_matrix(logits, labels, 4)
    with pytest.raises(ValueError, match="need labels"):
        segkernels.confusion_matrix(logits, labels[:, :2], 3)
    with pytest.raises(TypeError, match="labels must be an integer"):
        segkernels.confusion_matrix(logits, labels.float(), 3)
    with pytest.raises(ValueError, match="num_classes"):
        segkernels.confusion_matrix(logits, labels, 0)
    with pytest.raises(ValueError, match="prediction map"):
        segkernels.confusion_matrix(labels, labels[:, :2], 3)
    preds = labels.clone()
    preds[0, 1, 1] = 9
    with pytest.raises(IndexError, match="outside"):
        segkernels.confusion_matrix(preds, labels, 3)
    # num_classes**2 overflowed int64 in the kernel's buffer size once (a crash): a clear error now.
    for classes in (46341, 2**32, 2**62):
        with pytest.raises(ValueError, match="num_classes"):
            segkernels.confusion_matrix(preds, labels, classes)
    with pytest.raises(TypeError, match="num_classes"):
        segkernels.confusion_matrix(logits, labels, 3.0)
    for ignore in (None, 2.5, True):
        with pytest.raises(TypeError, match="ignore_index"):
            segkernels.confusion_matrix(logits, labels, 3, ignore_index=ignore)
    with pytest.raises(ValueError, match="ignore_index"):
        segkernels.confusion_matrix(logits, labels, 3, ignore_index=2**70)


@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_rejects_num_classes_out_of_range(device):
    labels = torch.zeros(1, 4, dtype=torch.long, device=device)
    for classes in (0, 46341, 2**32):
        with pytest.raises((ValueError, RuntimeError), match="num_classes"):
            torch.ops.segkernels.confusion_matrix.default(labels, labels, classes, 255)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, labels = _case((2, 6, 7), 5, torch.float32, device)
    run_opcheck(torch.ops.segkernels.confusion_matrix.default, (logits, labels, 5, 255))
    run_opcheck(torch.ops.segkernels.confusion_matrix.default, (logits.argmax(1), labels, 5, 255))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    logits, labels = _case((2, 10, 12), 4, torch.float32, device)
    fn = torch.compile(lambda x, y: segkernels.confusion_matrix(x * 2.0, y, 4), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(logits, labels), reference_confusion_matrix(logits * 2.0, labels, 4))


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_under_interpreter():
    from segkernels._library import triton_runs_on
    from segkernels.ops.confusion_matrix.triton import _confusion_matrix_triton

    logits, labels = _case((2, 13, 17), 5, torch.float32, "cpu")
    if not triton_runs_on(logits):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
    logits[0, 2, 0, 0] = float("nan")
    logits[1, :, 1, 1] = 1.0  # a full tie
    expected = reference_confusion_matrix(logits, labels, 5)
    for x in (logits, logits.contiguous(memory_format=torch.channels_last), logits.argmax(1)):
        cm, invalid = _confusion_matrix_triton(x, labels, 5, 255)
        assert torch.equal(cm, expected) and int(invalid) == 0
    labels[1, 0, 0] = 7
    labels[1, 0, 1] = -3
    assert int(_confusion_matrix_triton(logits, labels, 5, 255)[1]) == 2
    # more classes than the in-register histogram holds: the per-position atomic path
    logits, labels = _case((1, 9, 11), 70, torch.float32, "cpu")
    assert torch.equal(_confusion_matrix_triton(logits, labels, 70, 255)[0], reference_confusion_matrix(logits, labels, 70))


class _GridRecorder:
    """Stands in for a Triton kernel and records each launch grid before launching."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_grid_is_one_flat_axis_and_rows_are_one_image(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65535: flattened maps and (N, C) rows of 70000 positions
    # must not put one program per position on a second axis.
    import segkernels.ops.confusion_matrix.triton as mod
    from segkernels._library import triton_runs_on

    logits = torch.randn(70000, 6)
    if not triton_runs_on(logits):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
    recorder = _GridRecorder(mod._confusion_kernel)
    monkeypatch.setattr(mod, "_confusion_kernel", recorder)
    labels = torch.randint(0, 6, (70000,))
    labels[::9] = 255
    expected = reference_confusion_matrix(logits, labels, 6)
    for x in (logits, logits.t().contiguous().t(), logits.argmax(1)):
        cm, invalid = mod._confusion_matrix_triton(x, labels, 6, 255)
        assert torch.equal(cm, expected) and int(invalid) == 0
    batched, batched_labels = _case((3, 37, 29), 5, torch.float32, "cpu")
    cm, _ = mod._confusion_matrix_triton(batched, batched_labels, 5, 255)
    assert torch.equal(cm, reference_confusion_matrix(batched, batched_labels, 5))
    assert all(len(g) == 1 for g in recorder.grids), recorder.grids
    assert max(g[0] for g in recorder.grids[:3]) <= 64, recorder.grids  # ~70000 / tile, not 70000


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_float64_logits_compare_in_float64():
    from segkernels._library import triton_runs_on
    from segkernels.ops.confusion_matrix.triton import _confusion_matrix_triton

    logits = torch.tensor([[[1.0, 1e300], [1.0 + 1e-12, 2e300]]], dtype=torch.float64)  # (1, 2, 2)
    if not triton_runs_on(logits):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
    labels = torch.tensor([[1, 1]])
    cm, _ = _confusion_matrix_triton(logits, labels, 2, 255)
    assert torch.equal(cm, reference_confusion_matrix(logits, labels, 2))
    assert torch.equal(cm, torch.tensor([[0, 0], [0, 2]]))  # float32 would tie both: class 0


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("classes", [7, 40])
def test_triton_kernel_several_tiles_per_program(classes):
    # Several full tiles per program (histogram accumulated across them), with the unrolled
    # class loop (7) and the runtime one with an in-register histogram (40).
    from segkernels._library import triton_runs_on
    from segkernels.ops.confusion_matrix.triton import _confusion_matrix_triton

    logits, labels = _case((2, 41, 57), classes, torch.float32, "cpu")
    if not triton_runs_on(logits):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
    cm, invalid = _confusion_matrix_triton(logits, labels, classes, 255)
    assert torch.equal(cm, reference_confusion_matrix(logits, labels, classes)) and int(invalid) == 0


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """Ahead-of-time compilation (Triton to cubin) of every launch the launcher makes, for an
    H100/H200: checks the types and constexpr branches that the interpreter does not (int64
    channel offsets, the float64 compare, the histogram and atomic paths)."""
    import segkernels.ops.confusion_matrix.triton as mod

    def run():
        for classes in (5, 40, 70):  # unrolled classes; a loop with the histogram; a loop with atomics
            labels = torch.randint(0, classes, (2, 6, 7))
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                mod._confusion_matrix_triton(torch.randn(2, classes, 6, 7).to(dtype), labels, classes, 255)
            mod._confusion_matrix_triton(labels.clone(), labels, classes, 255)  # a prediction map
        mod._confusion_matrix_triton(torch.randn(30, 5), torch.randint(0, 5, (30,)), 5, 255)  # (N, C) rows

    launches = record_triton_launches(mod, run)
    assert compile_launches_for_sm90(launches) == {"_confusion_kernel"}

def test_reference_agrees_with_torchmetrics():
    # The reference is the oracle of every back end; torchmetrics is what users compute it with.
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    logits, labels = _case((3, 9, 11), 6, torch.float64, "cpu")
    expected = multiclass_confusion_matrix(logits.argmax(1), labels, 6, ignore_index=255)
    assert torch.equal(reference_confusion_matrix(logits, labels, 6), expected)


# ----------------------------------------------------------------------------------------------
# Logits smaller than the labels (scored through upsample_argmax)


def _low_res_case(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 8, 10, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, 5, (3, 61, 77), generator=g)
    labels[:, :3] = 255  # an ignored border
    return logits, labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_low_resolution_logits_are_upsampled(align_corners, device, monkeypatch):
    from segkernels.ops import confusion_matrix as cm_module

    logits, labels = _low_res_case(torch.float64, device)
    up = F.interpolate(logits.cpu(), size=(61, 77), mode="bilinear", align_corners=align_corners)
    expected = reference_confusion_matrix(up, labels.cpu(), 5)  # float64: no near-ties to round
    got = segkernels.confusion_matrix(logits, labels, 5, 255, align_corners=align_corners)
    assert torch.equal(got.cpu(), expected)
    monkeypatch.setattr(cm_module, "_CHUNK_PIXELS", 61 * 77 * 2)  # two images, then one
    assert torch.equal(segkernels.confusion_matrix(logits, labels, 5, align_corners=align_corners).cpu(), expected)


def test_low_resolution_float32_differs_only_at_near_ties():
    logits, labels = _low_res_case(torch.float32, seed=1)
    up = F.interpolate(logits.double(), size=(61, 77), mode="bilinear")
    expected = reference_confusion_matrix(up, labels, 5)
    top2 = up.topk(2, dim=1).values
    near_ties = ((top2[:, 0] - top2[:, 1]) <= 1e-5 * (1 + top2[:, 0].abs())) & (labels != 255)
    got = segkernels.confusion_matrix(logits, labels, 5)
    assert int(got.sum()) == int(expected.sum())
    assert int((got - expected).abs().sum()) <= 2 * int(near_ties.sum())


def test_low_resolution_errors():
    logits, labels = _low_res_case(torch.float32)
    with pytest.raises(ValueError, match="of their size or larger"):
        segkernels.confusion_matrix(logits, labels[:, :5, :5], 5)
    with pytest.raises(ValueError, match="channels"):
        segkernels.confusion_matrix(logits, labels, 6)
    with pytest.raises(TypeError, match="align_corners"):
        segkernels.confusion_matrix(logits, labels, 5, align_corners=None)
    labels[0, 10, 10] = 7
    with pytest.raises(IndexError, match="outside"):
        segkernels.confusion_matrix(logits, labels, 5)


def test_low_resolution_with_no_pixels():
    logits = torch.randn(2, 3, 0, 4)
    assert torch.equal(segkernels.confusion_matrix(logits, torch.zeros(2, 0, 8, dtype=torch.long), 3),
                       torch.zeros(3, 3, dtype=torch.long))


def test_low_resolution_under_torch_compile():
    logits, labels = _low_res_case(torch.float64)
    compiled = torch.compile(lambda x, y: segkernels.confusion_matrix(x, y, 5), fullgraph=True)
    assert torch.equal(compiled(logits, labels), segkernels.confusion_matrix(logits, labels, 5))
