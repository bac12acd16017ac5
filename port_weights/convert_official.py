"""Convert an official PyTorch MAE checkpoint (.pth) into a Paddle state dict (.pdparams).

    python port_weights/convert_official.py --src mae_pretrain_vit_base.pth \
        --dst mae_pretrain_vit_base.pdparams

PyTorch is not needed: the .pth file (a zip written by torch.save, torch >= 1.6) is read with
zipfile and a restricted unpickler that only rebuilds tensors, OrderedDicts and argparse.Namespace.

Kinds, detected from the keys:
    pretrain-encoder  cls_token, pos_embed, patch_embed.*, blocks.*, norm.*  (mae_pretrain_vit_*)
    pretrain-full     the above + mask_token, decoder_*                      (mae_visualize_vit_*)
    finetuned         head.* + fc_norm.* (global pool) or norm.* (cls token) (mae_finetuned_vit_*)
                      (linear probe: head.0 = BatchNorm buffers, head.1 = Linear)

The Paddle models in transformer.py use the official parameter names (DESIGN.md section 3.1), so
the conversion is KEY_TABLE (BatchNorm buffer names) plus one rule: every 2-D `.weight` is a
Linear weight and is transposed (torch [out, in] -> Paddle [in, out]). The result is checked
against the Paddle model built from the shapes: every source key used, every target key set,
every shape equal.
"""
import argparse
import collections
import hashlib
import io
import math
import os
import pickle
import sys
import warnings
import zipfile
import zlib

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Official release files -> leading hex digits of their md5, as the official READMEs give them.
OFFICIAL_MD5 = {
    'mae_pretrain_vit_base.pth': '8cad7c',
    'mae_pretrain_vit_large.pth': 'b8b06e',
    'mae_pretrain_vit_huge.pth': '9bdbb0',
    'mae_finetuned_vit_base.pth': '1b25e9',
    'mae_finetuned_vit_large.pth': '51f550',
    'mae_finetuned_vit_huge.pth': '2541f2',
}

# torch key suffix <-> Paddle key suffix; None = not carried over. Every other key is kept as is.
# export_official.py reads the table backwards (torch_key) and writes the step counter back.
STEP_COUNTER = '.num_batches_tracked'  # torch BatchNorm's; Paddle's BatchNorm keeps none
KEY_TABLE = (
    ('.running_mean', '._mean'),
    ('.running_var', '._variance'),
    (STEP_COUNTER, None),
)

# num_heads is not stored in a checkpoint (no shape depends on it): the official sizes.
OFFICIAL_NUM_HEADS = {768: 12, 1024: 16, 1280: 16}
OFFICIAL_DECODER_NUM_HEADS = {512: 16}

KIND_DESCRIPTIONS = {
    'pretrain-encoder': 'MAE pre-trained encoder (cls_token, pos_embed, patch_embed, blocks, norm)',
    'pretrain-full': 'MAE pre-training model with its decoder (mask_token, decoder_*)',
    'finetuned': 'ViT classifier',
}


class ConversionError(Exception):
    """A problem with the user's input; main() prints it as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------
# Torch-free reader for torch.save zip files
# ----------------------------------------------------------------------------------------------
# torch storage class -> dtype of its raw bytes ('bfloat16' is read as uint16 and widened)
STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool',
}
# torch dtype objects, pickled by name (torch.float32 -> global 'torch float32')
TORCH_DTYPES = {
    'float32': 'float32', 'float': 'float32', 'float64': 'float64', 'double': 'float64',
    'float16': 'float16', 'half': 'float16', 'bfloat16': 'bfloat16', 'int64': 'int64',
    'long': 'int64', 'int32': 'int32', 'int': 'int32', 'int16': 'int16', 'short': 'int16',
    'int8': 'int8', 'uint8': 'uint8', 'bool': 'bool',
}


class _StorageType:
    """Stands for a torch.*Storage class in the pickle."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class TorchDtype:
    """Stands for a torch dtype object (e.g. torch.float32) met in a pickle; .name is numpy's."""

    def __init__(self, name):
        self.name = TORCH_DTYPES[name]

    def __repr__(self):
        return f'torch.{self.name}'


class CheckpointArgs:
    """Plain stand-in for the argparse.Namespace of training checkpoints: attributes only."""

    def __repr__(self):
        return f'CheckpointArgs({vars(self)})'


class _Storage:
    __slots__ = ('key', 'dtype', 'numel')

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LazyTensor:
    """A tensor record from data.pkl; its bytes are read from the zip only when needed, so the
    optimizer state of a training checkpoint is never loaded."""
    __slots__ = ('storage', 'offset', 'shape', 'stride')

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _is_int_tuple(x):
    return isinstance(x, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not (isinstance(storage, _Storage) and isinstance(storage_offset, int)
            and _is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise ConversionError('malformed tensor record in data.pkl')
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('argparse', 'Namespace'): CheckpointArgs,
}
_ALLOWED_GLOBALS.update({('torch', n): _StorageType(n) for n in STORAGE_DTYPES})
_ALLOWED_GLOBALS.update({('torch', n): TorchDtype(n) for n in TORCH_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only tensors, OrderedDicts and Namespaces: a checkpoint cannot run code."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise ConversionError(
                f'refusing to load {module}.{name}: the pickle references a global that a weights '
                f'file does not need (allowed: tensors, OrderedDict, argparse.Namespace)') from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise ConversionError(f'unknown persistent record {pid!r:.80} in data.pkl')
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, TorchDtype):
            dtype = storage_type.name
        elif isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        else:
            raise ConversionError(f'storage record {key!r} has no known storage type')
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise ConversionError('malformed storage record in data.pkl')
        return _Storage(key, dtype, numel)


def _describe_non_zip(path):
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'the file is empty'
    if head.startswith(b'PK\x03\x04'):
        return ('the zip archive is incomplete or corrupted (truncated download?): '
                'download it again')
    if path.endswith(('.pdparams', '.pdopt', '.pdiparams')):
        return ('this is a Paddle file already (written by paddle.save): give it to the entry '
                'points as it is (-pretrained FILE.pdparams); --src takes an official .pth')
    if head.startswith(b'\x80') or head[257:262] == b'ustar':
        return ('this is a legacy (torch < 1.6) checkpoint or a plain pickle, which this reader '
                'does not open; re-save it with a torch >= 1.6, e.g. python -c "import torch; '
                "torch.save(torch.load('OLD.pth', map_location='cpu'), 'NEW.pth')\"")
    return 'not a PyTorch checkpoint (not a zip archive written by torch.save)'


class TorchZipReader:
    """Reads a torch.save zip (torch >= 1.6) without torch: `with TorchZipReader(p) as r:
    obj = r.load()` gives the pickled object with tensors as lazy records; `r.array(t)` or
    `r.materialize(obj)` turns them into numpy arrays. Errors: ConversionError naming the file."""

    def __init__(self, path):
        self.path = path
        self.zip = None

    def _error(self, msg):
        return ConversionError(f'{self.path}: {msg}')

    def __enter__(self):
        if not os.path.isfile(self.path):
            raise self._error('no such file')
        try:
            if not zipfile.is_zipfile(self.path):
                raise self._error(_describe_non_zip(self.path))
            self.zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as e:
            raise self._error(f'cannot open: {e}') from None
        pkls = [n for n in self.zip.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pkls) != 1:
            self.zip.close()
            raise self._error('a zip archive but not a PyTorch checkpoint (no <dir>/data.pkl)')
        self.prefix = pkls[0][:-len('data.pkl')]
        self.byteorder = '<'
        if self.prefix + 'byteorder' in self.zip.namelist():
            order = self._read(self.prefix + 'byteorder').strip()
            if order not in (b'little', b'big'):
                raise self._error(f'unknown byteorder {order[:20]!r}')
            self.byteorder = '<' if order == b'little' else '>'
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()

    def _read(self, name):
        try:
            return self.zip.read(name)
        except KeyError:
            raise self._error(f'{name} is missing from the archive') from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise self._error(f'corrupted archive member {name}: {e}') from None

    def load(self):
        data = self._read(self.prefix + 'data.pkl')
        try:
            return _RestrictedUnpickler(io.BytesIO(data)).load()
        except ConversionError as e:
            raise self._error(str(e)) from None
        except Exception as e:  # a damaged pickle can fail in many ways; all are the file's fault
            raise self._error(f'data.pkl cannot be read ({type(e).__name__}: {e})') from None

    def array(self, t):
        """_LazyTensor -> numpy array (a copy; bfloat16 widened to float32)."""
        st = t.storage
        raw_dtype = 'uint16' if st.dtype == 'bfloat16' else st.dtype
        dt = np.dtype(raw_dtype).newbyteorder(self.byteorder)
        raw = self._read(f'{self.prefix}data/{st.key}')
        if len(raw) < st.numel * dt.itemsize:
            raise self._error(f'storage data/{st.key} holds {len(raw)} bytes, '
                              f'expected {st.numel * dt.itemsize}')
        buf = np.frombuffer(raw, dtype=dt, count=st.numel)
        if any(s == 0 for s in t.shape):
            out = np.zeros(t.shape, dtype=buf.dtype.newbyteorder('='))
        else:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
            if t.offset < 0 or min(t.stride, default=0) < 0 or last >= st.numel:
                raise self._error(f'a tensor reaches outside its storage data/{st.key}')
            view = np.lib.stride_tricks.as_strided(
                buf[t.offset:], shape=t.shape, strides=[s * dt.itemsize for s in t.stride],
                writeable=False)
            out = np.array(view, dtype=dt.newbyteorder('='))  # copy, native byte order
        if st.dtype == 'bfloat16':  # bfloat16 = the upper half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def materialize(self, obj):
        """Replace every lazy tensor in nested dicts / lists / tuples / args by a numpy array."""
        if isinstance(obj, _LazyTensor):
            return self.array(obj)
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = self.materialize(obj[k])
            return obj
        if isinstance(obj, list):
            return [self.materialize(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.materialize(v) for v in obj)
        if isinstance(obj, CheckpointArgs):
            self.materialize(vars(obj))
        return obj


def load_torch_checkpoint(path):
    """Read a torch.save zip file (torch >= 1.6) without PyTorch.

    Returns the saved object with tensors as numpy arrays (bfloat16 -> float32), argparse
    Namespaces as CheckpointArgs. Raises ConversionError (naming the file) for anything that
    is not such a file or that references a global other than tensors/OrderedDict/Namespace.
    """
    with TorchZipReader(path) as reader:
        return reader.materialize(reader.load())


def _read_state_dict(path):
    """-> (state_dict of numpy arrays, names of the other top-level entries, which are ignored)."""
    with TorchZipReader(path) as reader:
        obj = reader.load()
        if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
            sd, ignored = obj['model'], sorted(str(k) for k in obj if k != 'model')
        elif (isinstance(obj, dict) and obj
              and all(isinstance(v, _LazyTensor) for v in obj.values())):
            sd, ignored = obj, []
        else:
            keys = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
            raise reader._error(f"holds neither {{'model': state_dict}} nor a state_dict "
                                f'(found: {keys})')
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, _LazyTensor):
                raise reader._error(f'entry {k!r} of the state_dict is not a tensor')
        return {k: reader.array(v) for k, v in sd.items()}, ignored


# ----------------------------------------------------------------------------------------------
# md5 of the official release files
# ----------------------------------------------------------------------------------------------
def file_md5(path, chunk_size=1 << 22):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def identify_official(filename, md5_hex, table=OFFICIAL_MD5):
    """-> (status, message): status 'official' (md5 matches a release file, named in the
    message), 'mismatch' (named like a release file, md5 differs) or 'unofficial'."""
    name = os.path.basename(filename)
    for official, prefix in table.items():
        if md5_hex.startswith(prefix):
            also = '' if name == official else f' (renamed to {name})'
            return 'official', f'md5 {md5_hex}: the official {official}{also}'
    if name in table:
        return 'mismatch', (f'WARNING: {name} is named like the official release file, but its md5 '
                            f'{md5_hex} does not start with {table[name]}: corrupted or partial '
                            f'download? Download it again.')
    return 'unofficial', (f'md5 {md5_hex}: not an official release file '
                          f'(fine for your own checkpoints)')


# ----------------------------------------------------------------------------------------------
# Kind, architecture, conversion
# ----------------------------------------------------------------------------------------------
def detect_kind(keys):
    """-> 'pretrain-full' | 'finetuned' | 'pretrain-encoder' from a state_dict's keys."""
    keys = set(keys)
    if 'mask_token' in keys or any(k.startswith('decoder_') for k in keys):
        return 'pretrain-full'
    if any(k.startswith('head.') for k in keys):
        return 'finetuned'
    if 'patch_embed.proj.weight' in keys and any(k.startswith('blocks.') for k in keys):
        return 'pretrain-encoder'
    raise ConversionError(f'not an MAE / ViT state_dict: no patch_embed.proj.weight and blocks.* '
                          f'(keys: {sorted(keys)[:8]})')


def _guess_heads(dim, official):
    """num_heads does not change any weight shape: the official value, else head dim 64 when it
    divides, else the largest of a few usual counts that divides."""
    if dim in official:
        return official[dim]
    if dim % 64 == 0:
        return dim // 64
    return next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if dim % h == 0)


def _depth(keys, prefix):
    ids = {int(k[len(prefix):].split('.')[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split('.')[0].isdigit()}
    return max(ids) + 1 if ids else 0


def infer_architecture(sd, kind):
    """Shapes -> constructor arguments of the matching transformer.py model (see detect_kind)."""
    def shape(key, ndim):
        if key not in sd:
            raise ConversionError(f'key {key} is missing, needed to infer the architecture')
        s = tuple(sd[key].shape)
        if len(s) != ndim:
            raise ConversionError(f'key {key} has shape {list(s)}, expected {ndim} dimensions')
        return s

    dim, in_chans, p, p2 = shape('patch_embed.proj.weight', 4)
    if p != p2:
        raise ConversionError(f'patch_embed.proj.weight has non-square patches {p}x{p2}')
    tokens = shape('pos_embed', 3)[1] - 1  # + cls token
    grid = math.isqrt(max(tokens, 0))
    if tokens <= 0 or grid * grid != tokens:
        raise ConversionError(f'pos_embed has {tokens} patch positions: not a square grid')
    hidden = shape('blocks.0.mlp.fc1.weight', 2)[0]
    arch = dict(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim,
                depth=_depth(sd, 'blocks.'), num_heads=_guess_heads(dim, OFFICIAL_NUM_HEADS),
                mlp_ratio=hidden / dim)
    if kind == 'pretrain-full':
        ddim = shape('decoder_embed.weight', 2)[0]
        arch.update(decoder_embed_dim=ddim, decoder_depth=_depth(sd, 'decoder_blocks.'),
                    decoder_num_heads=_guess_heads(ddim, OFFICIAL_DECODER_NUM_HEADS))
        return 'MaskedAutoencoderViT', arch
    if kind == 'pretrain-encoder':
        arch.update(num_classes=0, global_pool=False)
        return 'VisionTransformer', arch
    linear_probe = any(k.startswith(('head.0.', 'head.1.')) for k in sd)
    head_key = 'head.1.weight' if linear_probe else 'head.weight'
    arch.update(num_classes=shape(head_key, 2)[0], global_pool='fc_norm.weight' in sd,
                linear_probe=linear_probe)
    return 'VisionTransformer', arch


def _import_paddle():
    with warnings.catch_warnings():  # keep Paddle's import-time notices (ccache ...) off stderr
        warnings.simplefilter('ignore')
        import paddle
    return paddle


def target_shapes(model_name, arch):
    """Build the transformer.py model (lazily: no weights allocated) -> {key: shape}."""
    paddle = _import_paddle()
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import transformer

    kwargs = {k: v for k, v in arch.items() if k != 'linear_probe'}
    guard = paddle.LazyGuard() if hasattr(paddle, 'LazyGuard') else _NullContext()
    device = paddle.get_device()
    paddle.set_device('cpu')  # only shapes are needed: never take GPU memory for them
    try:
        with guard:
            model = getattr(transformer, model_name)(**kwargs)
            if arch.get('linear_probe'):
                transformer.add_linear_probe_head(model)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    finally:
        paddle.set_device(device)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def convert_key(key):
    """torch key -> Paddle key (None = dropped), by KEY_TABLE."""
    for src, dst in KEY_TABLE:
        if key.endswith(src):
            return None if dst is None else key[:-len(src)] + dst
    return key


def torch_key(key):
    """Paddle key -> torch key: KEY_TABLE read backwards (the inverse of convert_key)."""
    for src, dst in KEY_TABLE:
        if dst is not None and key.endswith(dst):
            return key[:-len(dst)] + src
    return key


def is_linear_weight(key, value):
    """The one layout rule, both ways: every 2-D `.weight` is a Linear weight, torch [out, in],
    Paddle [in, out] (conv kernels, LayerNorm, tokens and biases are laid out alike)."""
    return key.endswith('.weight') and np.ndim(value) == 2


def _listing(keys, limit=12):
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def convert_state_dict(sd):
    """torch-layout state_dict {key: numpy array} -> (kind, Paddle state_dict, arch_info).

    Floats become float32, other dtypes are kept. arch_info holds the model class, its
    constructor arguments and counts. Raises ConversionError naming any key that is not used,
    not set or of the wrong shape for the model transformer.py builds from the same shapes.
    """
    extra = {'dist_token': 'a distillation token (a DeiT-distilled ViT)',
             'head_dist.weight': 'a distillation head (a DeiT-distilled ViT)',
             'reg_token': 'register tokens (a ViT with registers)'}
    found = [f'{k}: {why}' for k, why in extra.items() if k in sd]
    if found:
        raise ConversionError(f'{"; ".join(found)}. The MAE ViT has a cls token only, so these '
                              f'weights cannot be converted for it')
    kind = detect_kind(sd)
    model_name, arch = infer_architecture(sd, kind)
    expected = target_shapes(model_name, arch)  # before converting: keeps peak memory lower
    out, source_of, dropped, transposed = {}, {}, [], 0
    for key, value in sd.items():
        new = convert_key(key)
        if new is None:
            dropped.append(key)
            continue
        value = np.asarray(value)
        if is_linear_weight(key, value):  # Linear: [out, in] -> [in, out]
            value = value.T
            transposed += 1
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        out[new] = np.ascontiguousarray(value)
        source_of[new] = key

    unused = set(out) - set(expected)
    unset = set(expected) - set(out)
    if unused or unset:
        msg = []
        if unused:
            msg.append(f'unexpected keys for a {kind} {model_name}: '
                       f'{_listing(source_of[k] for k in unused)}')
        if unset:
            msg.append(f'missing keys {_listing(unset)}')
        raise ConversionError('; '.join(msg))
    wrong = [f'{source_of[k]} {list(sd[source_of[k]].shape)} (Paddle {k} needs {list(s)})'
             for k, s in expected.items() if tuple(out[k].shape) != s]
    if wrong:
        raise ConversionError(f'shape mismatch: {_listing(wrong)}')
    info = dict(model=model_name, arch=arch, num_tensors=len(out), transposed=transposed,
                dropped=dropped, renamed=sum(1 for k, v in source_of.items() if k != v))
    return kind, out, info


def _describe_kind(kind, arch):
    if kind != 'finetuned':
        return f'{kind} ({KIND_DESCRIPTIONS[kind]})'
    head = ('linear probe: head.0 BatchNorm + head.1 Linear' if arch.get('linear_probe')
            else 'head Linear')
    pool = 'global pool: fc_norm' if arch['global_pool'] else 'cls token: norm'
    return f'{kind} ({KIND_DESCRIPTIONS[kind]}, {pool}, {head})'


def convert_file(src, dst, log=print):
    """Convert the checkpoint `src` (.pth) to `dst` (.pdparams) -> (kind, info).

    dst is written to dst + '.tmp' and renamed, so no partial file is ever left at dst.
    Raises ConversionError (message names the file and key) for any problem with the input.
    """
    dst_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(dst_dir):
        raise ConversionError(f'{dst}: the folder {dst_dir} does not exist')
    if not os.path.isfile(src):
        raise ConversionError(f'{src}: no such file')
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError(f'{dst}: the output would overwrite the input')

    md5 = file_md5(src)
    status, message = identify_official(src, md5)
    if status == 'mismatch':
        print(message, file=sys.stderr)
    else:
        log(message)

    sd, ignored = _read_state_dict(src)
    try:
        kind, out, info = convert_state_dict(sd)
    except ConversionError as e:
        raise ConversionError(f'{src}: {e}') from None
    del sd
    info.update(md5=md5, official=status, ignored=ignored, src=src, dst=dst)

    write_atomically(dst, lambda tmp: _import_paddle().save(out, tmp))

    arch = info['arch']
    log(f'kind: {_describe_kind(kind, arch)}')
    if ignored:
        log(f'ignored checkpoint entries (not model weights): {", ".join(ignored)}')
    log(f'architecture: {info["model"]}(' + ', '.join(
        f'{k}={v}' for k, v in arch.items() if k != 'linear_probe') + ')')
    heads = ('num_heads' if 'decoder_num_heads' not in arch
             else 'num_heads, decoder_num_heads')
    log(f'  ({heads}: not stored in a checkpoint; the official value for this width, or a '
        f'divisor of it. Heads change no weight, so the file fits any head count.)')
    log(f'tensors: {info["num_tensors"]} ({info["transposed"]} Linear weights transposed, '
        f'{info["renamed"]} BatchNorm buffers renamed, {len(info["dropped"])} dropped: '
        f'{", ".join(info["dropped"]) or "none"})')
    log(f'saved: {dst}')
    log(f'use it with: {usage(kind, arch, dst)}')
    return kind, info


def write_atomically(path, write, error=ConversionError):
    """write(tmp) to a temporary name beside path, then rename it to path: nothing
    half-written is left behind. An OSError becomes error('PATH: cannot write (...)')."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise error(f'{path}: cannot write ({e})') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def usage(kind, arch, dst):
    """The config (and -opts) that build the converted model: a named size's config where the
    shape is one, MODEL.NAME *_custom with the shape keys otherwise."""
    size = {(16, 768, 12): 'vit_base_patch16', (16, 1024, 24): 'vit_large_patch16',
            (14, 1280, 32): 'vit_huge_patch14'}.get(
        (arch['patch_size'], arch['embed_dim'], arch['depth']))
    named = size is not None and arch['mlp_ratio'] == 4.0 and arch['in_chans'] == 3
    stage = {'pretrain-full': 'pretrain', 'pretrain-encoder': 'finetune'}.get(kind, 'finetune')
    if kind == 'finetuned' and arch.get('linear_probe'):
        stage = 'linearprobe'
    mae = kind == 'pretrain-full'
    if mae and (arch['decoder_embed_dim'], arch['decoder_depth']) != (512, 8):
        named = False
    cfg = f'configs/{size or "vit_base_patch16"}_224_{stage}.yaml'
    opts = []
    if not named:
        opts += ['MODEL.NAME', 'mae_vit_custom' if mae else 'vit_custom',
                 'MODEL.ENCODER.PATCH_SIZE', arch['patch_size'],
                 'MODEL.ENCODER.EMBED_DIM', arch['embed_dim'], 'MODEL.ENCODER.DEPTH',
                 arch['depth'], 'MODEL.ENCODER.NUM_HEADS', arch['num_heads'],
                 'MODEL.ENCODER.MLP_RATIO', arch['mlp_ratio']]
        if mae:
            opts += ['MODEL.DECODER.EMBED_DIM', arch['decoder_embed_dim'],
                     'MODEL.DECODER.DEPTH', arch['decoder_depth'],
                     'MODEL.DECODER.NUM_HEADS', arch['decoder_num_heads']]
    if arch['img_size'] != 224:
        opts += ['DATA.IMAGE_SIZE', arch['img_size']]
    if kind == 'finetuned':
        if arch['num_classes'] != 1000:
            opts += ['MODEL.NUM_CLASSES', arch['num_classes']]
        if arch['global_pool'] != (stage == 'finetune'):  # the configs' GLOBAL_POOL
            opts += ['MODEL.GLOBAL_POOL', arch['global_pool']]
    line = f'-cfg {cfg} -pretrained {dst}'
    return line + (' -opts ' + ' '.join(str(o) for o in opts) if opts else '')


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an official PyTorch MAE checkpoint (.pth) to Paddle (.pdparams). '
                    'PyTorch is not needed.')
    parser.add_argument('--src', required=True, help='official .pth file (torch.save zip)')
    parser.add_argument('--dst', required=True, help='output .pdparams file')
    args = parser.parse_args(argv)
    try:
        convert_file(args.src, args.dst)
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
