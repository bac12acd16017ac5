"""Configuration: yacs defaults <- YAML file (with BASE inheritance) <- command-line flags / -opts.

Schema: DESIGN.md section 4. Every key a YAML file or -opts sets must exist here, and its value
must have the default's type (ints are accepted for floats, and '1e-4'-style strings too, since
YAML 1.1 reads an exponent without a dot as a string). Mistakes raise ConfigError naming the
file and the key.
"""
import os
import re

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']  # YAML files this one inherits from, relative to it; later ones win

# ---------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.DATA_PATH = ''                # folder with the list files (or class sub-folders)
_C.DATA.TRAIN_LIST = 'train_list.txt'
_C.DATA.VAL_LIST = 'val_list.txt'
_C.DATA.IMAGE_SIZE = 224              # model input resolution (pixels, square)
_C.DATA.BATCH_SIZE = 64               # per process
_C.DATA.BATCH_SIZE_EVAL = 64          # per process
_C.DATA.NUM_WORKERS = 8               # loader worker processes per training process
_C.DATA.CROP_PCT = 0.875              # eval: resize to IMAGE_SIZE / CROP_PCT, centre-crop
_C.DATA.MEAN = [0.485, 0.456, 0.406]  # ImageNet, RGB in [0, 1]
_C.DATA.STD = [0.229, 0.224, 0.225]
_C.DATA.ON_BAD_IMAGE = 'error'        # 'error': stop naming the file; 'skip': use another image
_C.DATA.TRAIN_SHARDS = ''             # tar shards (webdataset layout) instead of TRAIN_LIST: a
                                      # brace pattern, absolute or relative to DATA_PATH, e.g.
                                      # 'train-{0000..1023}.tar' ('' = list file / folders)
_C.DATA.VAL_SHARDS = ''               # the same for evaluation, instead of VAL_LIST
_C.DATA.SHARD_SHUFFLE_BUFFER = 1000   # pipe: shards, training: samples in the shuffle buffer
_C.DATA.TRAIN_PARQUET = ''            # parquet files (HF image datasets) instead of TRAIN_LIST:
                                      # glob patterns relative to DATA_PATH or absolute, '::'-joined
_C.DATA.VAL_PARQUET = ''              # the same for evaluation, instead of VAL_LIST
_C.DATA.PARQUET_IMAGE_COLUMN = 'image'  # struct {bytes, path} (HF Image) or binary: encoded image
_C.DATA.PARQUET_LABEL_COLUMN = 'label'  # integer class index
# semantic segmentation (DESIGN.md 3.4): the crop / sliding window is IMAGE_SIZE
_C.DATA.IGNORE_INDEX = 255            # annotation value left out of loss / metrics; not a class
_C.DATA.REDUCE_ZERO_LABEL = False     # ADE20K: 0 ('other') -> IGNORE_INDEX, 1..150 -> 0..149
_C.DATA.SEG_SCALE = [2048, 512]       # resize into (long side, short side) bounds, ratio kept
_C.DATA.SEG_RATIO_RANGE = [0.5, 2.0]  # training: SEG_SCALE times a ratio drawn from this range
_C.DATA.SEG_CAT_MAX_RATIO = 0.75      # training crop: retried (10x) while one class covers more
_C.DATA.SEG_PHOTOMETRIC = True        # training: mmseg's PhotoMetricDistortion

# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.NAME = 'mae_vit_base_patch16'  # a factory of transformer.py
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.GLOBAL_POOL = True           # classifier: mean of patch tokens + fc_norm; else cls token
_C.MODEL.DROP_PATH = 0.0              # stochastic depth rate of the last block (classifier)
_C.MODEL.MASK_RATIO = 0.75            # pre-training: fraction of patches removed
_C.MODEL.NORM_PIX_LOSS = False        # pre-training: per-patch normalised pixel targets
_C.MODEL.REL_POS_BIAS = False        # BEiT-style relative position bias per block, zero init
_C.MODEL.RECOMPUTE = False            # activation checkpointing of every block (GPU memory, L/H)
# encoder variants of the MAE family (DESIGN.md 3.5); the defaults are the official MAE / ViT
_C.MODEL.LAYER_SCALE = 0.0            # LayerScale init value of each encoder block's branches
                                      # (blocks.i.ls1/ls2.gamma, BEiT 0.1); 0 = off
_C.MODEL.QKV_BIAS = 'qkv'             # encoder qkv biases: 'qkv' | 'qv' (BEiT's q_bias, v_bias,
                                      # no key bias) | 'none'
_C.MODEL.ABS_POS_EMBED = True         # vit_*: learned pos_embed; False: none (BEiT; mae_* need it)
_C.MODEL.LAYER_NORM_EPS = 1e-6        # eps of every LayerNorm (official 1e-6; HF ViT(MAE): 1e-12)
_C.MODEL.PRETRAINED = ''              # .pdparams to start from (fine-tune / probe / eval)
_C.MODEL.RESUME = ''                  # checkpoint prefix to resume, or 'auto'
_C.MODEL.ENCODER = CN()
_C.MODEL.ENCODER.PATCH_SIZE = 16
_C.MODEL.ENCODER.EMBED_DIM = 768
_C.MODEL.ENCODER.DEPTH = 12
_C.MODEL.ENCODER.NUM_HEADS = 12
_C.MODEL.ENCODER.MLP_RATIO = 4.0
_C.MODEL.DECODER = CN()
_C.MODEL.DECODER.EMBED_DIM = 512
_C.MODEL.DECODER.DEPTH = 8
_C.MODEL.DECODER.NUM_HEADS = 16
_C.MODEL.SEGMENTATION = CN()          # UperNet on the encoder (segmentation.py)
_C.MODEL.SEGMENTATION.OUT_INDICES = [3, 5, 7, 11]  # 0-based blocks feeding fpn1..fpn4
_C.MODEL.SEGMENTATION.CHANNELS = 768  # UperHead width
_C.MODEL.SEGMENTATION.POOL_SCALES = [1, 2, 3, 6]
_C.MODEL.SEGMENTATION.AUX_CHANNELS = 256  # auxiliary FCN head on the third level
_C.MODEL.SEGMENTATION.AUX_WEIGHT = 0.4   # 0: no auxiliary head
_C.MODEL.SEGMENTATION.DROPOUT = 0.1   # before each head's 1x1 classifier conv
_C.MODEL.SEGMENTATION.SLIDE_STRIDE = 341  # evaluation: sliding windows of IMAGE_SIZE, this stride

# ---------------------------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.MODE = 'pretrain'            # 'pretrain' | 'finetune' | 'linearprobe'
_C.TRAIN.NUM_EPOCHS = 800
_C.TRAIN.WARMUP_EPOCHS = 40.0         # (fractions allowed: 1.5 epochs of 1000 iterations = 1500)
_C.TRAIN.BASE_LR = 1.5e-4             # lr = BASE_LR * eff_batch / LR_SCALE_DIVISOR
_C.TRAIN.MIN_LR = 0.0                 # end of the half-cycle cosine (or of the poly decay)
_C.TRAIN.LR_SCHEDULE = 'cosine'       # after the warmup: 'cosine' (MAE) | 'poly' (power 1, as
                                      # mmsegmentation's ADE20K recipes)
_C.TRAIN.LR_SCALE_DIVISOR = 256
_C.TRAIN.ITERS_PER_EPOCH = 0          # optimizer steps an epoch; 0 = one pass over the training
                                      # set. Else epochs cut a stream of shuffled passes: an
                                      # iteration budget (ADE20K: 160 x 1000 = 160k iterations)
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.LAYER_DECAY = 1.0            # layer-wise lr decay; 1.0 = off
_C.TRAIN.ACCUM_ITER = 1               # gradient accumulation steps per optimizer step
_C.TRAIN.GRAD_CLIP = 0.0              # max global grad norm; 0 = off
_C.TRAIN.AMP = ''                     # '' (fp32) | 'float16' | 'bfloat16' (GPU only)
_C.TRAIN.AMP_LEVEL = 'O1'             # 'O1': autocast (fp32 weights) | 'O2': half weights + fp32
                                      # master weights in AdamW
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'AdamW'     # 'AdamW' | 'LARS' | 'SGD' (momentum; MoCo v3's probe)
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.95]
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9     # LARS, SGD
_C.TRAIN.SMOOTHING = 0.0              # label smoothing
_C.TRAIN.MIXUP_ALPHA = 0.0            # 0 = off
_C.TRAIN.CUTMIX_ALPHA = 0.0           # 0 = off
_C.TRAIN.MIXUP_PROB = 1.0             # probability of applying mixup or cutmix to a batch
_C.TRAIN.MIXUP_SWITCH_PROB = 0.5      # probability of cutmix instead of mixup when both are on
_C.TRAIN.RAND_AUGMENT = ''            # timm policy string, e.g. 'rand-m9-mstd0.5-inc1'; '' = off
_C.TRAIN.RANDOM_ERASE_PROB = 0.0
_C.TRAIN.RANDOM_ERASE_MODE = 'pixel'  # 'pixel' (per-pixel normal noise) | 'rand' | 'const'
_C.TRAIN.RANDOM_ERASE_COUNT = 1
_C.TRAIN.RRC_SCALE = [0.08, 1.0]      # RandomResizedCrop area range

# ---------------------------------------------------------------------------------------------
_C.SAVE_FREQ = 20         # epochs between epoch_{N}.pdparams (latest.* is written every epoch)
_C.SAVE_FREQ_ITERS = 0    # also write latest.* every this many iterations; 0 = off
_C.REPORT_FREQ = 20       # iterations between log lines
_C.VALIDATE_FREQ = 1      # epochs between validations (fine-tune / linear probe)
_C.SEED = 0
_C.OUTPUT = ''           # run folder; '' = output/<config file name without .yaml>

CHOICES = {
    'DATA.ON_BAD_IMAGE': ('error', 'skip'),
    'TRAIN.MODE': ('pretrain', 'finetune', 'linearprobe', 'segmentation'),
    'MODEL.QKV_BIAS': ('qkv', 'qv', 'none'),
    'TRAIN.AMP': ('', 'float16', 'bfloat16'),
    'TRAIN.LR_SCHEDULE': ('cosine', 'poly'),
    'TRAIN.AMP_LEVEL': ('O1', 'O2'),
    'TRAIN.OPTIMIZER.NAME': ('AdamW', 'LARS', 'SGD'),
    'TRAIN.RANDOM_ERASE_MODE': ('pixel', 'rand', 'const'),
}


# key -> (test, what a valid value is): values a user can get wrong, checked by check_values()
RANGES = {
    'DATA.IMAGE_SIZE': (lambda v: v >= 1, '>= 1'),
    'DATA.BATCH_SIZE': (lambda v: v >= 1, '>= 1'),
    'DATA.BATCH_SIZE_EVAL': (lambda v: v >= 1, '>= 1'),
    'DATA.NUM_WORKERS': (lambda v: v >= 0, '>= 0 (0: load in the training process)'),
    'DATA.CROP_PCT': (lambda v: 0 < v <= 1, 'in (0, 1]'),
    'MODEL.NUM_CLASSES': (lambda v: v >= 1, '>= 1'),
    'MODEL.DROP_PATH': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'MODEL.MASK_RATIO': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'MODEL.LAYER_SCALE': (lambda v: v >= 0, '>= 0 (0: off, else the init value)'),
    'MODEL.LAYER_NORM_EPS': (lambda v: v > 0, '> 0'),
    'MODEL.SEGMENTATION.CHANNELS': (lambda v: v >= 1, '>= 1'),
    'MODEL.SEGMENTATION.AUX_CHANNELS': (lambda v: v >= 1, '>= 1'),
    'MODEL.SEGMENTATION.AUX_WEIGHT': (lambda v: v >= 0, '>= 0 (0: no auxiliary head)'),
    'MODEL.SEGMENTATION.DROPOUT': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'MODEL.SEGMENTATION.SLIDE_STRIDE': (lambda v: v >= 1, '>= 1 (pixels)'),
    'MODEL.SEGMENTATION.OUT_INDICES': (lambda v: len(v) == 4, 'four block indices (fpn1..fpn4)'),
    'MODEL.SEGMENTATION.POOL_SCALES': (lambda v: len(v) >= 1 and min(v) >= 1,
                                       'a list of pooled sizes >= 1'),
    'DATA.SEG_SCALE': (lambda v: len(v) == 2 and min(v) >= 1, '[long side, short side] >= 1'),
    'DATA.SEG_RATIO_RANGE': (lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                             '[low, high], 0 < low <= high'),
    'DATA.SEG_CAT_MAX_RATIO': (lambda v: 0 < v <= 1, 'in (0, 1] (1: off)'),
    'TRAIN.ITERS_PER_EPOCH': (lambda v: v >= 0, '>= 0 (0: one pass over the data)'),
    'TRAIN.NUM_EPOCHS': (lambda v: v >= 1, '>= 1'),
    'TRAIN.WARMUP_EPOCHS': (lambda v: v >= 0, '>= 0'),
    'TRAIN.BASE_LR': (lambda v: v > 0, '> 0'),
    'TRAIN.MIN_LR': (lambda v: v >= 0, '>= 0'),
    'TRAIN.LR_SCALE_DIVISOR': (lambda v: v > 0, '> 0'),
    'TRAIN.WEIGHT_DECAY': (lambda v: v >= 0, '>= 0'),
    'TRAIN.LAYER_DECAY': (lambda v: 0 < v <= 1, 'in (0, 1] (1: off)'),
    'TRAIN.ACCUM_ITER': (lambda v: v >= 1, '>= 1'),
    'TRAIN.GRAD_CLIP': (lambda v: v >= 0, '>= 0 (0: off)'),
    'TRAIN.SMOOTHING': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'TRAIN.MIXUP_ALPHA': (lambda v: v >= 0, '>= 0 (0: off)'),
    'TRAIN.CUTMIX_ALPHA': (lambda v: v >= 0, '>= 0 (0: off)'),
    'TRAIN.MIXUP_PROB': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'TRAIN.MIXUP_SWITCH_PROB': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'TRAIN.RANDOM_ERASE_PROB': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'TRAIN.RANDOM_ERASE_COUNT': (lambda v: v >= 1, '>= 1'),
    'TRAIN.RRC_SCALE': (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                        '[low, high] with 0 < low <= high <= 1'),
    'SAVE_FREQ': (lambda v: v >= 1, '>= 1 (epochs)'),
    'SAVE_FREQ_ITERS': (lambda v: v >= 0, '>= 0 (0: off)'),
    'REPORT_FREQ': (lambda v: v >= 1, '>= 1 (iterations)'),
    'VALIDATE_FREQ': (lambda v: v >= 1, '>= 1 (epochs)'),
}


def check_values(config):
    """Every value of RANGES in its range and of CHOICES among them, else ConfigError naming
    the key, the value and what would be valid (and, in segmentation, DATA.IGNORE_INDEX outside
    the classes). Reading a file or -opts checks types and CHOICES as well, naming the file;
    this covers values set in code too."""
    for key, (ok, valid) in RANGES.items():
        value = get_key(config, key)
        if not ok(value):
            raise ConfigError(f'config key {key} must be {valid}, got {value!r}')
    for key, choices in CHOICES.items():
        value = get_key(config, key)
        if value not in choices:
            raise ConfigError(f'config key {key} is {value!r}; choose one of {list(choices)}')
    ignore, classes = config.DATA.IGNORE_INDEX, config.MODEL.NUM_CLASSES
    if config.TRAIN.MODE == 'segmentation' and 0 <= ignore < classes:
        raise ConfigError(f'config key DATA.IGNORE_INDEX {ignore} is a class of MODEL.NUM_CLASSES '
                          f'{classes} (0..{classes - 1}): it must lie outside them (255 for 8-bit '
                          f'annotations; e.g. 65535 or -1 for 16-bit ones)')
    return config


def get_key(config, key):
    """The value of a dotted key such as MODEL.ENCODER.DEPTH."""
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


class ConfigError(ValueError):
    """A mistake in a config file or command-line override; the message names the key."""


def _coerce(key, value, default, where):
    """Return value converted to the type of default, or raise ConfigError naming key."""
    def bad():
        return ConfigError(f'{where}: config key {key} must be {type(default).__name__} '
                           f'(like the default {default!r}), got {value!r}')
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if default and len(value) and key != 'BASE':
            return [_coerce(f'{key}[{i}]', v, default[0], where) for i, v in enumerate(value)]
        return list(value)
    raise bad()


def _merge(node, updates, where, prefix=''):
    """Merge a plain dict into a CfgNode in place, checking names and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f'{where}: {prefix.rstrip(".") or "the file"} must be a mapping of '
                          f'config keys, got {updates!r}')
    for k, v in updates.items():
        full = prefix + str(k)
        if k not in node:
            raise ConfigError(f'{where}: unknown config key {full}')
        if isinstance(node[k], CN):
            _merge(node[k], v, where, full + '.')
            continue
        v = _coerce(full, v, node[k], where)
        if full in CHOICES and v not in CHOICES[full]:
            raise ConfigError(f'{where}: config key {full} is {v!r}; '
                              f'choose one of {list(CHOICES[full])}')
        node[k] = v


def load_yaml(stream, where):
    """yaml.safe_load, except that a key written twice in one mapping (a section or a key
    repeated in the same file) is a ConfigError naming `where`, the key and both lines: the
    YAML loader would silently keep the second."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_unique_keys(node, where, prefix=''):
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, where, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen = {}
    for key, value in node.value:
        if key.tag == 'tag:yaml.org,2002:merge':  # '<<': YAML's own merge, overriding on purpose
            continue
        name = prefix + str(key.value)
        line = key.start_mark.line + 1
        if name in seen:
            raise ConfigError(f'{where}: {name} is written twice (lines {seen[name]} and {line});'
                              f' YAML would keep only the second: merge them into one')
        seen[name] = line
        _check_unique_keys(value, where, name + '.')


def _read_yaml(path, chain=()):
    """-> list of (file, dict) in merge order: bases first (recursively), then the file itself."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f'{path}: BASE inheritance loops back to this file')
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}' +
                          (f' (a BASE of {chain[-1]})' if chain else ''))
    try:
        with open(path) as f:
            data = load_yaml(f, path) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        line = f' line {mark.line + 1}' if mark is not None else ''
        raise ConfigError(f'{path}{line}: not valid YAML ({getattr(e, "problem", e)})') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: a config file must be a mapping of keys, got {data!r}')
    bases = data.pop('BASE', [''])
    if isinstance(bases, str):
        bases = [bases]
    out = []
    for b in bases:
        if b:
            out += _read_yaml(os.path.join(os.path.dirname(path), b), chain + (path,))
    out.append((path, data))
    return out


def get_config(cfg_file=None):
    """Defaults, merged with cfg_file (and its BASE files) when given. Returns an unfrozen copy."""
    config = _C.clone()
    if cfg_file:
        for path, data in _read_yaml(cfg_file):
            _merge(config, data, path)
        config.BASE = ['']
    return config


def from_text(text, where):
    """Defaults merged with a resolved config's YAML text (e.g. the one a checkpoint carries)."""
    config = _C.clone()
    try:
        data = load_yaml(text, where) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{where}: not valid YAML ({e})') from None
    data.pop('BASE', None)
    _merge(config, data, where)
    return config


def merge_opts(config, opts):
    """Apply ['KEY.SUB', 'VALUE', ...] overrides (values read as YAML, e.g. '[0.9,0.95]')."""
    keyish = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
    for i in range(0, len(opts), 2):
        if not keyish.match(str(opts[i])):  # e.g. a value the shell split or brace-expanded
            raise ConfigError(
                f'-opts takes KEY VALUE pairs; {opts[i]!r} stands where a KEY should'
                + (f' (after {opts[i - 2]} {opts[i - 1]!r})' if i else '')
                + ': quote a value with spaces, braces or wildcards, e.g. '
                  "DATA.TRAIN_SHARDS 'shards/train-{0000..0143}.tar'")
    if len(opts) % 2:
        raise ConfigError(f'-opts takes KEY VALUE pairs; got an odd number of items: {opts} '
                          f'(quote a value with spaces, braces or wildcards)')
    for key, raw in zip(opts[0::2], opts[1::2]):
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        if value is None:
            value = ''
        _set_key(config, key, value, '-opts')
    return config


def _set_key(config, key, value, where):
    tree = value
    for part in reversed(key.split('.')):
        tree = {part: tree}
    _merge(config, tree, where)


def update_config(config, args):
    """Apply the entry points' command-line flags (DESIGN.md 3.3), then -opts; -opts wins."""
    config.defrost()
    flags = {  # flag attribute -> config key
        'data_path': 'DATA.DATA_PATH', 'output': 'OUTPUT', 'batch_size': 'DATA.BATCH_SIZE',
        'pretrained': 'MODEL.PRETRAINED', 'resume': 'MODEL.RESUME', 'amp': 'TRAIN.AMP',
    }
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            _set_key(config, key, value, f'-{attr}')
    merge_opts(config, list(getattr(args, 'opts', None) or []))
    return config


def dump_config(config, path):
    """Write the resolved config as YAML (temporary name, then rename)."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(config.dump())
        os.replace(tmp, path)
    except BaseException:  # (a full disk: nothing half-written is left)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
