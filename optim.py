"""Parameter groups, optimizers and the learning-rate schedule (DESIGN.md section 5).

- Groups come from named_parameters() (official names, never Paddle's internal param.name).
- Layer-wise lr decay is a per-group lr multiplier: a Paddle parameter group's 'learning_rate'
  multiplies the optimizer's global lr, which is what paddlenlp's AdamWDL was used for.
- The schedule is stateless: lr_at(epoch_float) is set on the optimizer every iteration.
"""
import math
from collections import OrderedDict

import paddle

from config import ConfigError


def effective_batch(config, world_size):
    return config.DATA.BATCH_SIZE * config.TRAIN.ACCUM_ITER * world_size


def peak_lr(config, world_size):
    """Official linear scaling rule: lr = blr * eff_batch / 256."""
    return config.TRAIN.BASE_LR * effective_batch(config, world_size) / \
        config.TRAIN.LR_SCALE_DIVISOR


def lr_at(epoch, config, lr):
    """lr at a fractional epoch, by TRAIN.LR_SCHEDULE:

    cosine (official MAE): linear warmup from 0 to lr, then half-cycle cosine down to MIN_LR;
    poly (mmsegmentation / mmcv's PolyLrUpdaterHook, power 1): the poly value
    MIN_LR + (lr - MIN_LR) * (1 - epoch / NUM_EPOCHS), over the whole run, multiplied during
    the warmup by epoch / WARMUP_EPOCHS (mmcv's linear warmup, from a ratio of 0 instead of
    the recipe's 1e-6).
    """
    t = config.TRAIN
    if t.LR_SCHEDULE == 'poly':
        value = t.MIN_LR + (lr - t.MIN_LR) * max(1.0 - epoch / t.NUM_EPOCHS, 0.0)
        return value * epoch / t.WARMUP_EPOCHS if epoch < t.WARMUP_EPOCHS else value
    if epoch < t.WARMUP_EPOCHS:
        return lr * epoch / t.WARMUP_EPOCHS
    span = max(t.NUM_EPOCHS - t.WARMUP_EPOCHS, 1e-12)
    progress = min((epoch - t.WARMUP_EPOCHS) / span, 1.0)
    return t.MIN_LR + (lr - t.MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def find_encoder(model):
    """(prefix, encoder) of the outermost sub-layer (the model itself included) that speaks the
    encoder protocol of transformer.py -- layer_id(name), get_num_layers(), no_weight_decay() --
    as timm's layer-decay code asks the model's group_matcher instead of parsing names itself.
    prefix is '' for the model itself, 'backbone.' for a model that wraps it. (None, None) when
    no sub-layer does."""
    for name, layer in model.named_sublayers(include_self=True):
        if callable(getattr(layer, 'layer_id', None)):
            return (name + '.' if name else ''), layer
    return None, None


def param_rules(model, config):
    """-> OrderedDict name -> (lr_scale, weight_decay) for every trainable parameter.

    Weight decay: none for 1-D params, biases and the encoder's no_weight_decay() names (the
    ViT classifier: pos_embed, cls_token; the MAE model: none, so pre-training decays its
    cls / mask tokens as the official one does). Layer-wise lr decay (TRAIN.LAYER_DECAY < 1):
    lr_scale = LAYER_DECAY ** (L + 1 - layer_id), with L and the layer ids from the encoder;
    parameters outside the encoder (a head, a neck) get layer id L + 1, i.e. scale 1. Frozen
    parameters (stop_gradient, e.g. the linear probe's encoder) are left out.
    """
    t = config.TRAIN
    wd = t.WEIGHT_DECAY
    prefix, encoder = find_encoder(model)
    if encoder is None:
        if t.LAYER_DECAY != 1.0:
            raise ConfigError(f'TRAIN.LAYER_DECAY {t.LAYER_DECAY} needs a model whose encoder '
                              f'supplies layer ids (transformer.py); {type(model).__name__} '
                              f'has none')
        prefix, depth, skip = None, 0, set()
    else:
        depth = encoder.get_num_layers()
        skip = {prefix + n for n in encoder.no_weight_decay()}
    rules = OrderedDict()
    for name, p in model.named_parameters():
        if p.stop_gradient:
            continue
        decay = 0.0 if (p.ndim == 1 or name.endswith('.bias') or name in skip) else wd
        scale = 1.0
        if t.LAYER_DECAY != 1.0:
            inside = name.startswith(prefix)
            layer_id = encoder.layer_id(name[len(prefix):]) if inside else depth + 1
            scale = t.LAYER_DECAY ** (depth + 1 - layer_id)
        rules[name] = (scale, decay)
    return rules


def build_optimizer(model, config, world_size):
    """AdamW or momentum SGD (with lr-scale / weight-decay groups) or LARS, lr set per
    iteration by the engine."""
    t = config.TRAIN
    rules = param_rules(model, config)
    params = dict(model.named_parameters())
    base = peak_lr(config, world_size)
    grad_clip = paddle.nn.ClipGradByGlobalNorm(t.GRAD_CLIP) if t.GRAD_CLIP > 0 else None
    if t.OPTIMIZER.NAME == 'LARS':
        if grad_clip is not None:
            raise ConfigError('TRAIN.GRAD_CLIP is not supported with TRAIN.OPTIMIZER.NAME LARS')
        if t.AMP and t.AMP_LEVEL == 'O2':
            raise ConfigError('TRAIN.AMP_LEVEL O2 needs TRAIN.OPTIMIZER.NAME AdamW (LARS keeps no '
                              'float32 master weights); use O1')
        return LARS([(n, params[n]) for n in rules], learning_rate=base,
                    weight_decay=t.WEIGHT_DECAY, momentum=t.OPTIMIZER.MOMENTUM)
    groups = OrderedDict()
    for name, (scale, decay) in rules.items():
        groups.setdefault((scale, decay), []).append(params[name])
    param_groups = [{'params': ps, 'learning_rate': scale, 'weight_decay': decay}
                    for (scale, decay), ps in groups.items()]
    if t.OPTIMIZER.NAME == 'SGD':
        # MoCo v3's linear probe: momentum SGD with weight decay added to the gradient (a float
        # weight_decay is Paddle's L2Decay), the update of torch.optim.SGD (dampening 0)
        return paddle.optimizer.Momentum(
            learning_rate=base, momentum=t.OPTIMIZER.MOMENTUM, parameters=param_groups,
            weight_decay=t.WEIGHT_DECAY, grad_clip=grad_clip, multi_precision=bool(t.AMP))
    beta1, beta2 = t.OPTIMIZER.BETAS
    return paddle.optimizer.AdamW(
        learning_rate=base, beta1=beta1, beta2=beta2, epsilon=t.OPTIMIZER.EPS,
        parameters=param_groups, weight_decay=t.WEIGHT_DECAY, grad_clip=grad_clip,
        multi_precision=bool(t.AMP))


class LARS:
    """LARS as the official MAE linear probe uses it (util/lars.py semantics):

        for 2-D+ params: g = g + wd * p;  g = g * trust * ||p|| / ||g||  (1 if a norm is 0)
        mu = momentum * mu + g;  p = p - lr * mu

    1-D params (biases) get neither weight decay nor trust scaling. Written here because
    paddle.incubate's LarsMomentumOptimizer puts the lr inside the momentum buffer, trust-scales
    every parameter and excludes decay by internal parameter name, which is a different method.
    Interface: the parts of paddle.optimizer.Optimizer the engine and GradScaler use.
    """

    def __init__(self, named_parameters, learning_rate, weight_decay=0.0, momentum=0.9,
                 trust_coefficient=0.001):
        self._named = list(named_parameters)
        self._parameter_list = [p for _, p in self._named]
        self._param_groups = [{'params': self._parameter_list}]
        self._lr = float(learning_rate)
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.trust_coefficient = trust_coefficient
        self._mu = {}

    def get_lr(self):
        return self._lr

    def set_lr(self, value):
        self._lr = float(value)

    @paddle.no_grad()
    def step(self):
        for name, p in self._named:
            g = p.grad
            if g is None:
                continue
            if p.ndim > 1:
                g = g + self.weight_decay * p
                p_norm = paddle.linalg.norm(p)
                g_norm = paddle.linalg.norm(g)
                one = paddle.ones_like(p_norm)
                q = paddle.where(p_norm > 0, paddle.where(
                    g_norm > 0, self.trust_coefficient * p_norm / g_norm, one), one)
                g = g * q
            mu = self._mu.get(name)
            mu = g.clone() if mu is None else mu * self.momentum + g
            self._mu[name] = mu
            p.set_value(p - self._lr * mu)

    def clear_grad(self, set_to_zero=True):
        for p in self._parameter_list:
            p.clear_gradient(set_to_zero)

    def state_dict(self):
        state = {f'{name}.mu': mu for name, mu in self._mu.items()}
        state['LR'] = self._lr
        return state

    def set_state_dict(self, state):
        self._lr = float(state.get('LR', self._lr))
        known = {n for n, _ in self._named}
        for key, value in state.items():
            if key.endswith('.mu') and key[:-3] in known:
                self._mu[key[:-3]] = paddle.to_tensor(value)
