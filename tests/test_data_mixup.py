"""mixup.py: targets sum to 1, CutMix lambda = pasted area, equal to timm's Mixup on seeds."""
import numpy as np
import paddle
import pytest

import helpers as H
import mixup

torch = pytest.importorskip('torch')
timm_mixup = pytest.importorskip('timm.data.mixup')
timm_loss = pytest.importorskip('timm.loss')


def batch(n=8, classes=10, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return x, y


@pytest.mark.parametrize('mix,cut', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_equals_timm_on_fixed_seeds(mix, cut):
    kinds = set()
    for seed in range(12):
        x, y = batch(seed=seed)
        ours = mixup.Mixup(mixup_alpha=mix, cutmix_alpha=cut, label_smoothing=0.1, num_classes=10)
        theirs = timm_mixup.Mixup(mixup_alpha=mix, cutmix_alpha=cut, label_smoothing=0.1,
                                  num_classes=10)
        np.random.seed(seed)
        xa, ta = ours(paddle.to_tensor(x), paddle.to_tensor(y))
        np.random.seed(seed)
        xb, tb = theirs(torch.from_numpy(x.copy()), torch.from_numpy(y))
        assert np.allclose(xa.numpy(), xb.numpy(), atol=1e-6)
        assert np.allclose(ta.numpy(), tb.numpy(), atol=1e-6)
        np.random.seed(seed)
        kinds.add('cut' if ours.sample()[1] else 'mix')
    assert kinds == ({'cut', 'mix'} if mix and cut else {'cut'} if cut else {'mix'})


def test_targets_are_distributions_with_smoothing():
    m = mixup.Mixup(label_smoothing=0.1, num_classes=10)
    for seed in range(20):
        np.random.seed(seed)
        x, y = batch(seed=seed)
        _, t = m(paddle.to_tensor(x), paddle.to_tensor(y))
        t = t.numpy()
        assert t.shape == (8, 10) and t.dtype == np.float32
        assert np.allclose(t.sum(1), 1.0, atol=1e-6)
        assert t.min() >= 0.1 / 10 - 1e-7  # smoothing floor


def test_cutmix_lambda_is_the_pasted_area():
    """Each image is a constant equal to its index; image 0 receives a box of image n-1."""
    n, size = 6, 24
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                        (n, 3, size, size)).copy()
    y = np.arange(n, dtype=np.int64)
    m = mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=n)
    for seed in range(30):
        np.random.seed(seed)
        xm, t = m(paddle.to_tensor(x), paddle.to_tensor(y))
        xm, t = xm.numpy(), t.numpy()
        pasted = (xm[0] == n - 1).mean()  # fraction of image 0 now from image n-1
        assert np.isclose(t[0, n - 1], pasted, atol=1e-6)
        assert np.isclose(t[0, 0], 1.0 - pasted, atol=1e-6)
        assert np.allclose(t.sum(1), 1.0, atol=1e-6)
        assert set(np.unique(xm[0])) <= {0.0, n - 1.0}


def test_cutmix_box_clips_and_corrects_lambda():
    np.random.seed(3)
    for lam in (0.1, 0.5, 0.9):
        (y0, y1, x0, x1), corrected = mixup.cutmix_box((2, 3, 20, 30), lam)
        assert 0 <= y0 <= y1 <= 20 and 0 <= x0 <= x1 <= 30
        assert np.isclose(corrected, 1 - (y1 - y0) * (x1 - x0) / 600)


def test_mixup_blends_with_the_reversed_batch():
    x, y = batch()
    m = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10)
    np.random.seed(0)
    lam, use_cutmix = m.sample()
    np.random.seed(0)
    xm, t = m(paddle.to_tensor(x), paddle.to_tensor(y))
    assert not use_cutmix and 0 < lam < 1
    assert np.allclose(xm.numpy(), lam * x + (1 - lam) * x[::-1], atol=1e-6)
    assert np.isclose(t.numpy()[0, y[0]], lam + (1 - lam) * (y[-1] == y[0]), atol=1e-6)


def test_prob_zero_only_smooths_and_odd_batch_is_refused():
    x, y = batch()
    m = mixup.Mixup(prob=0.0, label_smoothing=0.1, num_classes=10)
    xm, t = m(paddle.to_tensor(x), paddle.to_tensor(y))
    assert np.array_equal(xm.numpy(), x)
    expected = np.full((8, 10), 0.01, np.float32)
    expected[np.arange(8), y] = 0.91
    assert np.allclose(t.numpy(), expected, atol=1e-7)
    with pytest.raises(ValueError, match='even batch size'):
        m(paddle.to_tensor(x[:7]), paddle.to_tensor(y[:7]))


def test_losses_equal_timm():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    soft = rng.random((8, 10)).astype(np.float32)
    soft /= soft.sum(1, keepdims=True)
    ours = mixup.SoftTargetCrossEntropy()(paddle.to_tensor(logits), paddle.to_tensor(soft))
    theirs = timm_loss.SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(soft))
    assert np.isclose(float(ours), float(theirs), atol=1e-6)
    ours = mixup.LabelSmoothingCrossEntropy(0.1)(paddle.to_tensor(logits), paddle.to_tensor(y))
    theirs = timm_loss.LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits),
                                                       torch.from_numpy(y))
    assert np.isclose(float(ours), float(theirs), atol=1e-6)


def test_builders_follow_the_config():
    ft = H.tiny_config('finetune')
    m = mixup.build_mixup(ft)
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.label_smoothing,
            m.num_classes) == (0.8, 1.0, 1.0, 0.5, 0.1, ft.MODEL.NUM_CLASSES)
    assert isinstance(mixup.build_criterion(ft), mixup.SoftTargetCrossEntropy)
    lp = H.tiny_config('linearprobe')
    assert mixup.build_mixup(lp) is None
    assert isinstance(mixup.build_criterion(lp), paddle.nn.CrossEntropyLoss)
    smooth = H.tiny_config('finetune', TRAIN__MIXUP_ALPHA=0.0, TRAIN__CUTMIX_ALPHA=0.0)
    assert mixup.build_mixup(smooth) is None
    assert isinstance(mixup.build_criterion(smooth), mixup.LabelSmoothingCrossEntropy)
