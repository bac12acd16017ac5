"""Mixup / CutMix with label smoothing into soft targets, and the matching losses.

Semantics of timm's `Mixup` in 'batch' mode, as the official MAE fine-tuning uses it: one
(lambda, mixup-or-cutmix) draw per batch; each image is mixed with the batch reversed;
CutMix's lambda is corrected to the pasted box's area after clipping to the image. Random
numbers come from NumPy's global RNG in timm's order, so a seeded run matches timm's.

Criterion choice (official main_finetune.py): soft-target cross-entropy when mixup/cutmix is
on, label-smoothing cross-entropy when only smoothing is on, plain cross-entropy otherwise.
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def smooth_one_hot(target, num_classes, smoothing=0.0):
    """target: int labels [N] -> float32 [N, num_classes], smoothing spread over all classes."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return F.one_hot(target.astype('int64').reshape([-1]), num_classes) * (on - off) + off


def mix_target(target, num_classes, lam=1.0, smoothing=0.0):
    """Soft targets of a batch mixed with its reverse: lam * y + (1 - lam) * y[::-1]."""
    y = smooth_one_hot(target, num_classes, smoothing)
    return y * lam + paddle.flip(y, axis=[0]) * (1.0 - lam)


def cutmix_box(shape, lam):
    """A box covering about (1 - lam) of an image of shape [..., H, W] (timm's rand_bbox):
    side ratio sqrt(1 - lam), centre uniform over the image, clipped to it.
    Returns (y0, y1, x0, x1) and the corrected lam = 1 - box area / image area."""
    img_h, img_w = shape[-2:]
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    cy = np.random.randint(0, img_h)
    cx = np.random.randint(0, img_w)
    y0, y1 = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + (cut_h + 1) // 2, 0, img_h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + (cut_w + 1) // 2, 0, img_w)
    lam = 1.0 - float((y1 - y0) * (x1 - x0)) / float(img_h * img_w)
    return (int(y0), int(y1), int(x0), int(x1)), lam


class Mixup:
    """Mix a batch with its reverse by mixup or CutMix and return soft targets.

    mixup_alpha / cutmix_alpha: Beta(alpha, alpha) for lambda; 0 turns that method off.
    prob: probability that a batch is mixed at all; switch_prob: probability of CutMix when
    both are on. label_smoothing is applied to the targets whether or not the batch is mixed.
    correct_lam: set CutMix's lambda to the pasted area's complement after clipping.
    """

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                 label_smoothing=0.1, num_classes=1000, correct_lam=True):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError('Mixup needs mixup_alpha > 0 or cutmix_alpha > 0')
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.correct_lam = correct_lam

    def sample(self):
        """-> (lam, use_cutmix) for one batch."""
        if np.random.rand() >= self.prob:
            return 1.0, False
        use_cutmix = False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = np.random.rand() < self.switch_prob
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        elif self.mixup_alpha > 0:
            alpha = self.mixup_alpha
        else:
            use_cutmix, alpha = True, self.cutmix_alpha
        return float(np.random.beta(alpha, alpha)), bool(use_cutmix)

    def __call__(self, images, target):
        """images: float [N, C, H, W] (N even); target: int [N].
        Returns (mixed images [N, C, H, W], soft targets float32 [N, num_classes])."""
        if images.shape[0] % 2:
            raise ValueError(f'Mixup/CutMix pairs each image with the reversed batch and needs '
                             f'an even batch size, got {images.shape[0]} (use drop_last and an '
                             f'even DATA.BATCH_SIZE)')
        lam, use_cutmix = self.sample()
        if lam != 1.0:
            flipped = paddle.flip(images, axis=[0])
            if use_cutmix:
                (y0, y1, x0, x1), box_lam = cutmix_box(images.shape, lam)
                if self.correct_lam:
                    lam = box_lam
                images = images.clone()
                if y1 > y0 and x1 > x0:
                    images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            else:
                images = images * lam + flipped * (1.0 - lam)
        return images, mix_target(target, self.num_classes, lam, self.label_smoothing)


class SoftTargetCrossEntropy(nn.Layer):
    """mean over the batch of -sum(target * log_softmax(logits)); target [N, K] soft labels."""

    def forward(self, logits, target):
        return (-target * F.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


class LabelSmoothingCrossEntropy(nn.Layer):
    """Cross-entropy against (1 - smoothing) * one-hot + smoothing / K; target [N] int."""

    def __init__(self, smoothing=0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'label smoothing must be in [0, 1), got {smoothing}')
        self.smoothing = smoothing

    def forward(self, logits, target):
        logp = F.log_softmax(logits, axis=-1)
        nll = -paddle.take_along_axis(logp, target.astype('int64').reshape([-1, 1]), axis=-1)
        return ((1.0 - self.smoothing) * nll.squeeze(-1) - self.smoothing * logp.mean(-1)).mean()


def build_mixup(config):
    """Mixup from TRAIN.MIXUP_ALPHA, CUTMIX_ALPHA, MIXUP_PROB, MIXUP_SWITCH_PROB, SMOOTHING and
    MODEL.NUM_CLASSES; None when both alphas are 0."""
    t = config.TRAIN
    if t.MIXUP_ALPHA <= 0 and t.CUTMIX_ALPHA <= 0:
        return None
    return Mixup(mixup_alpha=t.MIXUP_ALPHA, cutmix_alpha=t.CUTMIX_ALPHA, prob=t.MIXUP_PROB,
                 switch_prob=t.MIXUP_SWITCH_PROB, label_smoothing=t.SMOOTHING,
                 num_classes=config.MODEL.NUM_CLASSES)


def build_criterion(config):
    """The training loss of the official fine-tuning: soft-target CE with mixup/cutmix,
    label-smoothing CE with smoothing alone, else plain CE. Evaluation uses plain CE."""
    t = config.TRAIN
    if t.MIXUP_ALPHA > 0 or t.CUTMIX_ALPHA > 0:
        return SoftTargetCrossEntropy()
    if t.SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(t.SMOOTHING)
    return nn.CrossEntropyLoss()
