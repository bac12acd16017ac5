"""File formats of the PyTorch world, read and written without torch (numpy only).

torch.save's zip checkpoint (torch >= 1.6): <dir>/data.pkl (the pickled object, tensors as
persistent records), <dir>/data/<key> (one storage's raw bytes each), <dir>/byteorder,
<dir>/version.

    load(path)                 -> the saved object, tensors as numpy arrays
    load_state_dict(path)      -> (state dict {key: numpy array}, names of the other
                                  entries, the entries asked for)
    save(obj, path)            writes obj in torch.save's layout (torch.load reads it)
    is_torch_checkpoint(path)  -> whether path is such a zip

safetensors (timm's hub, HF): load_safetensors(path) -> (tensors, metadata),
save_safetensors(tensors, path, metadata), is_safetensors(path).

Reading is safe: a restricted unpickler rebuilds tensors, OrderedDicts, argparse.Namespace
(as CheckpointArgs) and torch dtypes only, and refuses any other global, so a checkpoint cannot
run code. Problems with a file (or an object save cannot write) raise FormatError, one line
naming the file.
"""
import collections
import io
import json
import os
import struct
import zipfile
import zlib

import numpy as np

import safepickle
from safepickle import FormatError  # noqa: F401 (this module's error, for its callers)

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
STORAGE_ALIGNMENT = 64  # torch.save aligns every record's data to 64 bytes (mmap loading)


def is_torch_checkpoint(path):
    """torch.save's zip format: an archive holding one <dir>/data.pkl (paddle.save writes
    pickles)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return len(_data_pkl_names(z)) == 1
    except (OSError, zipfile.BadZipFile):
        return False


def _data_pkl_names(zf):
    return [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
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
        raise FormatError('malformed tensor record in data.pkl')
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


class _RestrictedUnpickler(safepickle.Unpickler):
    """Rebuilds only tensors, OrderedDicts and Namespaces: a checkpoint cannot run code."""

    def __init__(self, file):
        super().__init__(file, _ALLOWED_GLOBALS, 'tensors, OrderedDict, argparse.Namespace')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise FormatError(f'unknown persistent record {pid!r:.80} in data.pkl')
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, TorchDtype):
            dtype = storage_type.name
        elif isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        else:
            raise FormatError(f'storage record {key!r} has no known storage type')
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise FormatError('malformed storage record in data.pkl')
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
        return ('this is a Paddle file already (written by paddle.save), not a PyTorch '
                'checkpoint: use it as it is (-pretrained FILE.pdparams)')
    if head.startswith(b'\x80') or head[257:262] == b'ustar':
        return ('this is a legacy (torch < 1.6) checkpoint or a plain pickle, which this reader '
                'does not open; re-save it with a torch >= 1.6, e.g. python -c "import torch; '
                "torch.save(torch.load('OLD.pth', map_location='cpu'), 'NEW.pth')\"")
    return 'not a PyTorch checkpoint (not a zip archive written by torch.save)'


class _ZipReader:
    """`with _ZipReader(p) as r: obj = r.load()` gives the pickled object with tensors as lazy
    records; `r.array(t)` or `r.materialize(obj)` turns them into numpy arrays."""

    def __init__(self, path):
        self.path = path
        self.zip = None

    def error(self, msg):
        return FormatError(f'{self.path}: {msg}')

    def __enter__(self):
        if not os.path.isfile(self.path):
            raise self.error('no such file')
        try:
            if not zipfile.is_zipfile(self.path):
                raise self.error(_describe_non_zip(self.path))
            self.zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as e:
            raise self.error(f'cannot open: {e}') from None
        pkls = _data_pkl_names(self.zip)
        if len(pkls) != 1:
            self.zip.close()
            raise self.error('a zip archive but not a PyTorch checkpoint (no <dir>/data.pkl)')
        self.prefix = pkls[0][:-len('data.pkl')]
        self.byteorder = '<'
        if self.prefix + 'byteorder' in self.zip.namelist():
            order = self._read(self.prefix + 'byteorder').strip()
            if order not in (b'little', b'big'):
                raise self.error(f'unknown byteorder {order[:20]!r}')
            self.byteorder = '<' if order == b'little' else '>'
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()

    def _read(self, name):
        try:
            return self.zip.read(name)
        except KeyError:
            raise self.error(f'{name} is missing from the archive') from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise self.error(f'corrupted archive member {name}: {e}') from None

    def load(self):
        data = self._read(self.prefix + 'data.pkl')
        try:
            return _RestrictedUnpickler(io.BytesIO(data)).load()
        except FormatError as e:
            raise self.error(str(e)) from None
        except Exception as e:  # a damaged pickle can fail in many ways; all are the file's fault
            raise self.error(f'data.pkl cannot be read ({type(e).__name__}: {e})') from None

    def array(self, t):
        """_LazyTensor -> numpy array (a copy; bfloat16 widened to float32)."""
        st = t.storage
        raw_dtype = 'uint16' if st.dtype == 'bfloat16' else st.dtype
        dt = np.dtype(raw_dtype).newbyteorder(self.byteorder)
        raw = self._read(f'{self.prefix}data/{st.key}')
        if len(raw) < st.numel * dt.itemsize:
            raise self.error(f'storage data/{st.key} holds {len(raw)} bytes, '
                             f'expected {st.numel * dt.itemsize}')
        buf = np.frombuffer(raw, dtype=dt, count=st.numel)
        if any(s == 0 for s in t.shape):
            out = np.zeros(t.shape, dtype=buf.dtype.newbyteorder('='))
        else:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
            if t.offset < 0 or min(t.stride, default=0) < 0 or last >= st.numel:
                raise self.error(f'a tensor reaches outside its storage data/{st.key}')
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


def load(path):
    """Read a torch.save zip file (torch >= 1.6) without PyTorch.

    Returns the saved object with tensors as numpy arrays (bfloat16 -> float32), argparse
    Namespaces as CheckpointArgs. Raises FormatError (naming the file) for anything that is not
    such a file or that references a global other than tensors/OrderedDict/Namespace.
    """
    with _ZipReader(path) as reader:
        return reader.materialize(reader.load())


STATE_DICT_KEYS = ('model', 'state_dict')  # the official / timm and mmsegmentation wrappers


def load_state_dict(path, keep=()):
    """-> (state dict {key: numpy array}, sorted names of the other top-level entries,
    {name: entry} for the names in `keep` that the file holds, tensors in them read too).

    The file holds {'model': state_dict, ...} (a training checkpoint, as the official MAE
    files), {'state_dict': ..., 'meta': ...} (mmsegmentation) or a bare state dict; only the
    tensors of the state dict (and of `keep`) are read from the archive (an optimizer state
    never is).
    """
    with _ZipReader(path) as reader:
        obj = reader.load()
        wrapper = next((k for k in STATE_DICT_KEYS if isinstance(obj, dict)
                        and isinstance(obj.get(k), dict)), None)
        if wrapper is not None:
            sd, ignored = obj[wrapper], sorted(str(k) for k in obj if k != wrapper)
        elif (isinstance(obj, dict) and obj
              and all(isinstance(v, _LazyTensor) for v in obj.values())):
            sd, ignored = obj, []
        else:
            keys = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
            raise reader.error(f"holds neither {{'model' or 'state_dict': state_dict}} nor a "
                               f'state_dict (found: {keys})')
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, _LazyTensor):
                raise reader.error(f'entry {k!r} of the state_dict is not a tensor')
        kept = {k: reader.materialize(obj[k]) for k in keep if k in ignored}
        return {k: reader.array(v) for k, v in sd.items()}, ignored, kept


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
_STORAGE_NAMES = {np.dtype(d): name for name, d in STORAGE_DTYPES.items() if d != 'bfloat16'}


def _pickle_bytes(obj):
    """obj (dicts, OrderedDicts, lists, tuples, str, int, float, bool, None, numpy arrays) ->
    (data.pkl in torch.save's protocol-2 form, the arrays in storage-key order).

    Written opcode by opcode: the globals (torch._utils._rebuild_tensor_v2, torch.FloatStorage,
    collections.OrderedDict) are names in the stream and need no torch here. No memo is used;
    every array is its own storage, tensors are contiguous."""
    out, arrays = [b'\x80\x02'], []

    def text(s):
        b = s.encode('utf-8')
        out.append(b'X' + struct.pack('<I', len(b)) + b)

    def integer(i):
        if 0 <= i < 256:
            out.append(b'K' + bytes([i]))
        elif 0 <= i < 65536:
            out.append(b'M' + struct.pack('<H', i))
        elif -2 ** 31 <= i < 2 ** 31:
            out.append(b'J' + struct.pack('<i', i))
        else:
            b = i.to_bytes((i.bit_length() + 8) // 8, 'little', signed=True)
            out.append(b'\x8a' + bytes([len(b)]) + b)

    def items(pairs):
        pairs = list(pairs)
        if pairs:
            out.append(b'(')
            for k, v in pairs:
                emit(k)
                emit(v)
            out.append(b'u')

    def tensor(a):
        if a.dtype not in _STORAGE_NAMES:
            raise FormatError(f'no torch storage type for dtype {a.dtype}')
        key = str(len(arrays))
        arrays.append(a)
        shape = tuple(int(s) for s in a.shape)
        stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        out.append(b'ctorch._utils\n_rebuild_tensor_v2\n(')
        out.append(b'(')  # persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
        text('storage')
        out.append(b'ctorch\n' + _STORAGE_NAMES[a.dtype].encode() + b'\n')
        text(key)
        text('cpu')
        integer(int(a.size))
        out.append(b'tQ')
        integer(0)  # storage offset
        emit(shape)
        emit(stride)
        out.append(b'\x89')  # requires_grad False
        out.append(b'ccollections\nOrderedDict\n)R')  # backward hooks
        out.append(b'tR')

    def emit(x):
        if isinstance(x, np.ndarray):
            tensor(x)
        elif x is None:
            out.append(b'N')
        elif isinstance(x, (bool, np.bool_)):
            out.append(b'\x88' if x else b'\x89')
        elif isinstance(x, (int, np.integer)):
            integer(int(x))
        elif isinstance(x, (float, np.floating)):
            out.append(b'G' + struct.pack('>d', float(x)))
        elif isinstance(x, str):
            text(x)
        elif isinstance(x, tuple):
            if not x:
                out.append(b')')
            else:
                out.append(b'(')
                for v in x:
                    emit(v)
                out.append(b't')
        elif isinstance(x, list):
            out.append(b']')
            if x:
                out.append(b'(')
                for v in x:
                    emit(v)
                out.append(b'e')
        elif isinstance(x, collections.OrderedDict):
            out.append(b'ccollections\nOrderedDict\n)R')
            items(x.items())
        elif isinstance(x, dict):
            out.append(b'}')
            items(x.items())
        else:
            raise TypeError(f'cannot write {type(x).__name__} into a torch checkpoint')

    emit(obj)
    out.append(b'.')
    return b''.join(out), arrays


def _add_record(zf, name, data):
    """One stored (uncompressed) member whose data starts on a STORAGE_ALIGNMENT boundary, as
    torch's writer pads it (an 'FB' extra field), so torch.load(mmap=True) can map it."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder('<'))
        view = memoryview(arr.reshape(-1).view(np.uint8))
    else:
        view = memoryview(data)
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.file_size = view.nbytes
    zip64 = view.nbytes * 1.05 > zipfile.ZIP64_LIMIT  # (zipfile's own rule: adds 20 bytes)
    used = zf.fp.tell() + 30 + len(name.encode('utf-8')) + 4 + (20 if zip64 else 0)
    pad = (-used) % STORAGE_ALIGNMENT
    info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
    with zf.open(info, 'w', force_zip64=zip64) as f:
        step = 1 << 26
        for i in range(0, view.nbytes, step):
            f.write(view[i:i + step])


def save(obj, path):
    """Write obj to path in torch.save's zip layout (torch >= 1.6), without torch:
    archive/data.pkl, one archive/data/<key> per array (raw little-endian bytes), byteorder,
    version. Numpy arrays become tensors; torch.load(path, weights_only=True) and load() read
    it. An array dtype torch has no storage for raises FormatError."""
    data_pkl, arrays = _pickle_bytes(obj)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        _add_record(zf, 'archive/data.pkl', data_pkl)
        _add_record(zf, 'archive/byteorder', b'little')
        for i, a in enumerate(arrays):
            _add_record(zf, f'archive/data/{i}', a)
        _add_record(zf, 'archive/version', b'3\n')


# ----------------------------------------------------------------------------------------------
# safetensors (how timm's hub and HF ship weights): an 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}, '__metadata__': {str: str}}, then the raw bytes.
# Read and written by hand: the safetensors package's numpy API cannot hold bfloat16, and the
# format is this small.
# ----------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
    'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool',
}
_SAFETENSORS_NAMES = {np.dtype(d): n for n, d in SAFETENSORS_DTYPES.items() if d != 'bfloat16'}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def is_safetensors(path):
    """Whether path starts like a safetensors file (a plausible header length, then '{')."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return (len(head) == 9 and head[8:9] == b'{'
            and 0 < struct.unpack('<Q', head[:8])[0] <= _MAX_HEADER)


def load_safetensors(path):
    """-> ({name: numpy array} in the file's order, the '__metadata__' dict); bfloat16 widened
    to float32. A file that is not one, truncated, or whose header does not describe its
    bytes raises FormatError naming it."""
    def error(msg):
        return FormatError(f'{path}: {msg}')
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(8)
            n = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise error('not a safetensors file (no header), or truncated')
            header = json.loads(f.read(n).decode('utf-8'))
            data = f.read()
    except OSError as e:
        raise error(f'cannot read: {e}') from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error('the safetensors header is not valid JSON: damaged file?') from None
    if not isinstance(header, dict):
        raise error('the safetensors header is not a JSON object')
    meta = header.pop('__metadata__', None) or {}
    out = {}
    for name, rec in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[rec['dtype']]
            shape = tuple(int(s) for s in rec['shape'])
            begin, end = (int(v) for v in rec['data_offsets'])
        except (KeyError, TypeError, ValueError):
            raise error(f'tensor {name!r}: unsupported or malformed record {rec!r:.120}') from None
        raw_dtype = np.dtype('<u2' if dtype == 'bfloat16' else dtype).newbyteorder('<')
        count = int(np.prod(shape, dtype=np.int64))
        if end > len(data):
            raise error(f'truncated: tensor {name!r} ends at byte {end} of the data, which has '
                        f'{len(data)} (download it again)')
        if not 0 <= begin <= end or end - begin != count * raw_dtype.itemsize:
            raise error(f'tensor {name!r}: its offsets do not fit shape {list(shape)} {dtype}')
        arr = np.frombuffer(data, raw_dtype, count, begin).reshape(shape)
        if dtype == 'bfloat16':
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.astype(arr.dtype.newbyteorder('='))  # a copy, native byte order
    return out, meta


def save_safetensors(tensors, path, metadata=None):
    """Write {name: numpy array} as a safetensors file (tensors in name order, header padded to
    8 bytes as the library does); metadata: {str: str}. An unsupported dtype raises
    FormatError."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a if a.flags.c_contiguous else a.copy()  # (ascontiguousarray makes 0-d arrays 1-d)
        if a.dtype not in _SAFETENSORS_NAMES:
            raise FormatError(f'no safetensors dtype for {name!r} ({a.dtype})')
        a = a.astype(a.dtype.newbyteorder('<'), copy=False)
        header[name] = {'dtype': _SAFETENSORS_NAMES[a.dtype.newbyteorder('=')],
                        'shape': list(a.shape), 'data_offsets': [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header = {'__metadata__': {str(k): str(v) for k, v in metadata.items()}, **header}
    text = json.dumps(header, separators=(',', ':')).encode('utf-8')
    text += b' ' * (-len(text) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
