"""nn.LabelAutoencoder and nn.LabelStructureLoss (Mostajabi et al.): shapes at odd sizes, stage 1
learning, the frozen halves in stage 2, where each variant's gradient goes, and their errors."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import requires_kernels
from segkernels.nn import LabelAutoencoder, LabelStructureLoss

pytestmark = requires_kernels


def _scenes(n, h, w, classes, seed=0):
    """Blocky label maps (a few rectangles of random classes on class 0), some pixels ignored."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, h, w, dtype=torch.int64)
    for i in range(n):
        for _ in range(3):
            y0, x0 = torch.randint(0, h - 4, (2,), generator=g).tolist()
            y[i, y0:y0 + h // 3, x0:x0 + w // 3] = int(torch.randint(1, classes, (1,), generator=g))
    y[:, 0] = 255
    return y


@pytest.mark.parametrize("size", [(32, 32), (37, 45)])
def test_autoencoder_shapes_at_any_size(size):
    ae = LabelAutoencoder(5, code_channels=6, width=4, levels=3)
    labels = _scenes(2, *size, 5)
    code = ae.encode(labels)
    assert code.shape == (2, 6, *ae.code_size(size))
    assert ae.decode(code, size).shape == (2, 5, *size)
    assert ae(labels).shape == (2, 5, *size)
    assert isinstance(ae.encoder[0], segkernels.nn.OneHotConv2d)  # no one-hot map is formed
    with pytest.raises(ValueError, match="code must be"):
        ae.decode(code[:, :3], size)
    with pytest.raises(ValueError, match="labels must be"):
        ae.encode(labels[:, :4])


def test_stage_one_learns_to_reconstruct_label_maps():
    torch.manual_seed(0)
    ae = LabelAutoencoder(4, code_channels=8, width=8, levels=2)
    batches = [_scenes(8, 24, 24, 4, seed=s) for s in range(4)]
    history = ae.fit(batches, epochs=30, lr=1e-2)
    assert history[-1] < 0.25 * history[0], history
    ae.freeze()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    test = _scenes(16, 24, 24, 4, seed=9)
    with torch.no_grad():
        pred = ae(test).argmax(1)
    counted = test != 255
    accuracy = float((pred[counted] == test[counted]).float().mean())
    background = float((test[counted] == 0).float().mean())  # what predicting class 0 everywhere scores
    assert accuracy > max(0.85, background + 0.1), (accuracy, background)


@pytest.mark.parametrize("mode", ["decoder", "encoder"])
def test_structure_loss_gradients(mode):
    torch.manual_seed(0)
    ae = LabelAutoencoder(4, code_channels=5, width=4, levels=2)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    loss_fn = LabelStructureLoss(ae, mode=mode, weight=0.5)
    loss_fn.train()
    assert not ae.training  # frozen: BatchNorm statistics stay
    labels = _scenes(2, 20, 22, 4)
    logits = torch.randn(2, 4, 20, 22, requires_grad=True)
    code = torch.randn(2, 5, *ae.code_size((20, 22)), requires_grad=True)
    out = loss_fn(logits, code, labels)
    torch.testing.assert_close(out.cross_entropy, F.cross_entropy(logits, labels, ignore_index=255))
    torch.testing.assert_close(out.total, out.cross_entropy + 0.5 * out.structure)
    g_logits, g_code = torch.autograd.grad(out.structure, (logits, code), allow_unused=True)
    if mode == "decoder":  # the structure term ties the output to the decoded code prediction
        assert g_logits.abs().sum() > 0 and g_code.abs().sum() > 0
        with torch.no_grad():
            decoded = ae.decode(code, (20, 22))
        torch.testing.assert_close(out.structure, F.mse_loss(logits.softmax(1), decoded.softmax(1)))
    else:  # the code prediction regresses onto the encoder's code of the ground truth
        assert g_logits is None and g_code.abs().sum() > 0
        torch.testing.assert_close(out.structure, F.mse_loss(code, ae.encode(labels)))
    for k, v in ae.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in ae.parameters())


def test_structure_loss_errors():
    ae = LabelAutoencoder(4, code_channels=5, width=4, levels=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        LabelStructureLoss(ae, mode="both")
    with pytest.raises(ValueError, match="weight must be"):
        LabelStructureLoss(ae, weight=-1.0)
    loss_fn = LabelStructureLoss(ae, mode="encoder")
    labels = _scenes(2, 16, 16, 4)
    with pytest.raises(ValueError, match="logits must be"):
        loss_fn(torch.randn(2, 3, 16, 16), torch.randn(2, 5, 4, 4), labels)
    with pytest.raises(ValueError, match="labels must be"):
        loss_fn(torch.randn(2, 4, 16, 16), torch.randn(2, 5, 4, 4), labels[:, :8])
    with pytest.raises(ValueError, match="code_prediction must be"):
        loss_fn(torch.randn(2, 4, 16, 16), torch.randn(2, 5, 3, 4), labels)
