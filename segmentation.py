"""Semantic segmentation: UperNet (with an auxiliary FCN head) on the ViT encoder, DESIGN.md 3.4.

The network the MAE paper's ADE20K transfer trains (its A.4, as mmsegmentation's
upernet_mae-base_fp16_8x2_512x512_160k_ade20k states it; DESIGN.md 5):

    imgs -> backbone.forward_intermediates(OUT_INDICES)  4 maps on the patch grid (stride p)
         -> neck (Feature2Pyramid): x4 up, x2 up, identity, x2 down  (strides p/4 .. 2p)
         -> decode_head (UPerHead: pyramid pooling on the coarsest level, FPN top-down,
            fuse all levels at the finest)                               -> logits at stride p/4
         -> auxiliary_head (FCNHead on the third level, training only)  -> logits at stride p

Parameter names are mmsegmentation's (`backbone.*`, `neck.fpn1.0.weight`,
`decode_head.psp_modules.0.1.conv.weight`, `auxiliary_head.conv_seg.bias`, ...), so ADE20K
checkpoints trained with it convert by a key table; BatchNorm uses PyTorch's eps and momentum.
Inference by sliding windows is seg_inference.py's.
"""
import math
import numbers

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import transformer
from config import ConfigError

BN_EPS = 1e-5        # PyTorch's BatchNorm default (mmcv's BN / SyncBN)
BN_MOMENTUM = 0.9    # Paddle's running = m * running + (1 - m) * batch: PyTorch's momentum 0.1


def resize(x, size):
    """Bilinear resize with half-pixel centres (align_corners False), as mmseg's `resize` with
    the heads' align_corners=False; size: [h, w]."""
    return F.interpolate(x, size=list(size), mode='bilinear', align_corners=False)


def _param(init):
    return paddle.ParamAttr(initializer=init)


def _torch_default_uniform(fan_in):
    """PyTorch's default conv init, kaiming_uniform(a=sqrt(5)) for the weight and the same bound
    for the bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return _param(nn.initializer.Uniform(-bound, bound))


def _conv_transpose_2x2(channels):
    """ConvTranspose 2x2 stride 2 (x2 upsampling), initialised as PyTorch's ConvTranspose2d
    default: the weight is (in, out, 2, 2) and PyTorch takes fan_in from its second axis, so
    fan_in = out * 2 * 2."""
    fan_in = channels * 2 * 2
    return nn.Conv2DTranspose(channels, channels, kernel_size=2, stride=2,
                              weight_attr=_torch_default_uniform(fan_in),
                              bias_attr=_torch_default_uniform(fan_in))


class ConvModule(nn.Layer):
    """mmcv's ConvModule as the heads use it: conv (no bias: the BN follows) -> BN -> ReLU.

    Init as mmcv's ConvModule.init_weights: kaiming-normal for ReLU in fan_out mode,
    std = sqrt(2 / (out * k * k)); BN weight 1, bias 0 (Paddle's BN default)."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        std = math.sqrt(2.0 / (out_channels * kernel_size * kernel_size))
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, padding=padding,
                              weight_attr=_param(nn.initializer.Normal(0.0, std)),
                              bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPS)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class Feature2Pyramid(nn.Layer):
    """mmseg's Feature2Pyramid (BEiT's fpn1..fpn4): four maps on the patch grid -> strides x4
    finer, x2 finer, the same, x2 coarser. fpn1 = ConvT, BN, GELU (exact), ConvT; fpn2 = ConvT;
    fpn3 identity; fpn4 max-pool 2x2. Conv-transposes keep PyTorch's default init, as mmseg
    leaves them."""

    def __init__(self, embed_dim):
        super().__init__()
        self.fpn1 = nn.Sequential(
            _conv_transpose_2x2(embed_dim),
            nn.BatchNorm2D(embed_dim, momentum=BN_MOMENTUM, epsilon=BN_EPS),
            nn.GELU(),
            _conv_transpose_2x2(embed_dim))
        self.fpn2 = nn.Sequential(_conv_transpose_2x2(embed_dim))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2D(kernel_size=2, stride=2)

    def forward(self, features):
        if len(features) != 4:
            raise ValueError(f'Feature2Pyramid takes 4 feature maps, got {len(features)}')
        return [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]),
                self.fpn4(features[3])]


class _ClassifierHead(nn.Layer):
    """What mmseg's BaseDecodeHead adds after the features: Dropout2D, then the 1x1 `conv_seg`
    (with bias; init normal std 0.01, bias 0, as mmseg's decode heads)."""

    def _build_classifier(self, channels, num_classes, dropout):
        self.dropout = nn.Dropout2D(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2D(channels, num_classes, kernel_size=1,
                                  weight_attr=_param(nn.initializer.Normal(0.0, 0.01)),
                                  bias_attr=_param(nn.initializer.Constant(0.0)))

    def classify(self, x):
        return self.conv_seg(self.dropout(x))


class UPerHead(_ClassifierHead):
    """mmseg's UPerHead: a pyramid pooling module (PSPNet) on the coarsest level, an FPN
    top-down path over all levels, then every level resized to the finest and fused.

    in_channels: the 4 levels' channels (finest first). Output: (N, num_classes, h0, w0) at the
    finest level's size."""

    def __init__(self, in_channels, channels, pool_scales, num_classes, dropout=0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.pool_scales = list(pool_scales)
        # psp_modules.j = [adaptive average pool to scale_j, 1x1 ConvModule] (mmseg's PPM)
        self.psp_modules = nn.LayerList([
            nn.Sequential(nn.AdaptiveAvgPool2D(scale), ConvModule(in_channels[-1], channels, 1))
            for scale in self.pool_scales])
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels,
                                     channels, 3, padding=1)
        self.lateral_convs = nn.LayerList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.LayerList([ConvModule(channels, channels, 3, padding=1)
                                       for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self._build_classifier(channels, num_classes, dropout)

    def psp_forward(self, x):
        """Pyramid pooling: x and its pooled-then-resized-back versions, fused by a 3x3 conv."""
        size = x.shape[2:]
        pooled = [resize(module(x), size) for module in self.psp_modules]
        return self.bottleneck(paddle.concat([x] + pooled, axis=1))

    def forward(self, inputs):
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        # top-down: each level gets the (upsampled) sum of the coarser ones
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])  # the pyramid-pooled level has no fpn conv
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.classify(self.fpn_bottleneck(paddle.concat(outs, axis=1)))


class FCNHead(_ClassifierHead):
    """mmseg's FCNHead as the auxiliary head of the recipe: one 3x3 ConvModule (`convs.0`), no
    concatenation of the input, on level `in_index` (2: the third, stride p) of the pyramid."""

    def __init__(self, in_channels, channels, num_classes, dropout=0.1, in_index=2):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self._build_classifier(channels, num_classes, dropout)

    def forward(self, inputs):
        return self.classify(self.convs(inputs[self.in_index]))


class Segmentor(nn.Layer):
    """UperNet + auxiliary FCN head on a ViT backbone (transformer.VisionTransformer, read only
    through forward_intermediates).

    forward(imgs (N, 3, H, W)):
      training: (logits, aux_logits), each at its head's own resolution -- the decode head at
        the finest level (stride p/4: (H/4, W/4) for patch 16), the auxiliary head at the third
        level (stride p) -- since mmseg's losses resize each head's logits straight to the label
        map (a second bilinear resize through another size would change the values);
        aux_logits is None without an auxiliary head (aux_channels 0, as an mmseg segmentor
        without auxiliary_head);
      eval: the decode head's logits resized (bilinear) to (H, W); the auxiliary head is not run.
    """

    def __init__(self, backbone, num_classes, out_indices=(3, 5, 7, 11), channels=768,
                 pool_scales=(1, 2, 3, 6), aux_channels=256, dropout=0.1):
        super().__init__()
        out_indices = [int(i) for i in out_indices]
        depth = backbone.get_num_layers()
        if (len(out_indices) != 4 or any(not 0 <= i < depth for i in out_indices)
                or any(a >= b for a, b in zip(out_indices, out_indices[1:]))):
            raise ValueError(f'out_indices {out_indices}: four increasing block indices from 0 to '
                             f'{depth - 1} (the backbone has {depth} blocks)')
        self.out_indices = out_indices
        self.num_classes = num_classes
        dim = backbone.embed_dim
        self.backbone = backbone
        self.neck = Feature2Pyramid(dim)
        self.decode_head = UPerHead([dim] * 4, channels, pool_scales, num_classes, dropout)
        self.auxiliary_head = (FCNHead(dim, aux_channels, num_classes, dropout, in_index=2)
                               if aux_channels else None)

    def extract_features(self, imgs):
        """imgs -> the 4 pyramid levels (neck outputs), finest first."""
        return self.neck(self.backbone.forward_intermediates(imgs, self.out_indices))

    def forward(self, imgs):
        levels = self.extract_features(imgs)
        logits = self.decode_head(levels)
        if self.training:
            aux = self.auxiliary_head(levels) if self.auxiliary_head is not None else None
            return logits, aux
        return resize(logits, imgs.shape[2:])


def build_segmentor(config):
    """The segmentor the config describes: a vit_* backbone (transformer.build_from_config, with
    features_only and MODEL.REL_POS_BIAS) and the heads of MODEL.SEGMENTATION, MODEL.NUM_CLASSES;
    AUX_WEIGHT 0 (no auxiliary loss) builds no auxiliary head. Mistakes raise
    config.ConfigError naming the key."""
    m, s = config.MODEL, config.MODEL.SEGMENTATION
    if not m.NAME.startswith('vit_'):
        raise ConfigError(f'MODEL.NAME {m.NAME!r}: segmentation needs a ViT encoder name vit_* '
                          f'(e.g. vit_base_patch16, or vit_custom with MODEL.ENCODER)')
    shape = transformer.model_shape(config)  # (checks the name, the shape and the image size)
    depth = shape['depth']
    indices = list(s.OUT_INDICES)
    if (len(indices) != 4
            or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in indices)
            or any(not 0 <= i < depth for i in indices)
            or any(a >= b for a, b in zip(indices, indices[1:]))):
        raise ConfigError(f'MODEL.SEGMENTATION.OUT_INDICES {indices}: four increasing 0-based '
                          f'block indices from 0 to {depth - 1} (the encoder has {depth} blocks)')
    grid = config.DATA.IMAGE_SIZE // shape['patch_size']
    if grid < 2:
        raise ConfigError(f'DATA.IMAGE_SIZE {config.DATA.IMAGE_SIZE} / MODEL.ENCODER.PATCH_SIZE '
                          f'{shape["patch_size"]} is a {grid}x{grid} patch grid; the neck '
                          f'max-pools it by 2, so it needs at least 2x2')
    backbone = transformer.build_from_config(config, features_only=True)
    return Segmentor(backbone, num_classes=m.NUM_CLASSES, out_indices=indices,
                     channels=s.CHANNELS, pool_scales=list(s.POOL_SCALES),
                     aux_channels=s.AUX_CHANNELS if s.AUX_WEIGHT > 0 else 0,
                     dropout=s.DROPOUT)
