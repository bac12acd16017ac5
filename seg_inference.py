"""Semantic segmentation inference: whole-image predictions by sliding windows, mmseg's
slide_inference. The windows run through `predict`, a function of NumPy arrays, so a dygraph
segmentor (model_predictor) and an exported Paddle Inference model are slid the same way;
evaluation (tasks.Segmentation) and the tools (visualize, predict) share this.
"""
import numpy as np
import paddle

import seg_transforms
import segmentation
import utils


def slide_boxes(height, width, window, stride):
    """mmseg's slide_inference windows over an (height, width) image, each >= window in size:
    -> [(y1, y2, x1, x2)], rows then columns; the last row / column is moved back to end at the
    border, so windows may overlap more there."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2 = min(i * stride + window, height)
            x2 = min(j * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def sliding_window(predict, img, window, stride, num_classes, batch=8):
    """Whole-image logits by sliding windows, mmseg's slide_inference (crop = window).

    predict: numpy (B, 3, window, window) float32 -> numpy logits (B, num_classes, window,
      window) (a Paddle model in eval mode, or an exported Paddle Inference predictor).
    img: (3, H, W) float32, normalised. Returns (num_classes, H, W) float32: for every pixel the
    mean of the logits of the windows covering it (windows every `stride` pixels per axis, the
    last one moved back to end at the border). Windows are run `batch` at a time.

    An image smaller than the window in a dimension is zero-padded at the bottom / right up to
    the window (mmseg would run the smaller crop; here the encoder's patch grid, and with it its
    relative position tables, are fixed) and the logits of the padding are dropped.
    """
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f'sliding_window takes one image (3, H, W), got shape {img.shape}')
    channels, height, width = img.shape
    if stride < 1 or window < 1 or batch < 1:
        raise ValueError(f'window {window}, stride {stride} and batch {batch} must be >= 1')
    padded_h, padded_w = max(height, window), max(width, window)
    if (padded_h, padded_w) != (height, width):
        canvas = np.zeros((channels, padded_h, padded_w), np.float32)
        canvas[:, :height, :width] = img
        img = canvas
    boxes = slide_boxes(padded_h, padded_w, window, stride)
    logits = np.zeros((num_classes, padded_h, padded_w), np.float32)
    count = np.zeros((padded_h, padded_w), np.float32)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        windows = np.stack([img[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = np.asarray(predict(windows))
        expected = (len(chunk), num_classes, window, window)
        if out.shape != expected:
            raise ValueError(f'predict returned logits of shape {out.shape} for {len(chunk)} '
                             f'windows; expected {expected}')
        for (y1, y2, x1, x2), o in zip(chunk, out):
            logits[:, y1:y2, x1:x2] += o
            count[y1:y2, x1:x2] += 1
    logits /= count[None]
    return logits[:, :height, :width]


def predict_label_map(predict, img, size, config):
    """One image's predicted classes: sliding windows of DATA.IMAGE_SIZE (stride
    MODEL.SEGMENTATION.SLIDE_STRIDE, DATA.BATCH_SIZE_EVAL windows at once) over the
    preprocessed img (3, h, w), logits resized (bilinear) to size = (H, W), the image's
    original size, argmax -> int64 (H, W). What evaluation scores and the tools draw."""
    logits = sliding_window(predict, img, config.DATA.IMAGE_SIZE,
                            config.MODEL.SEGMENTATION.SLIDE_STRIDE, config.MODEL.NUM_CLASSES,
                            batch=config.DATA.BATCH_SIZE_EVAL)
    logits = segmentation.resize(paddle.to_tensor(logits[None]), size)
    return logits.argmax(axis=1)[0].numpy().astype(np.int64)


def image_label_map(predict, image, config, transform=None):
    """An RGB PIL image -> its predicted classes (H, W) at its own size: the evaluation
    transform (seg_transforms.build_seg_transform(False, config), or `transform`), then
    predict_label_map. What the tools draw and write."""
    transform = transform or seg_transforms.build_seg_transform(False, config)
    chw, _ = transform(image, np.zeros((image.height, image.width), np.int64))
    return predict_label_map(predict, chw, (image.height, image.width), config)


def model_predictor(model, config):
    """predict for sliding_window from a segmentor in eval mode (under the config's AMP)."""

    @paddle.no_grad()
    def predict(windows):
        with utils.amp_context(config):
            out = model(paddle.to_tensor(windows))
        return out.astype('float32').numpy()
    return predict
