"""MATLAB 5 .mat files read without SciPy (numpy only): the ILSVRC2012 devkit's meta.mat.

    load(path) -> {variable name: value}

Values: a struct array -> a list of {field: value} dicts (MATLAB's column-major order), a cell
array -> a list, a char array -> a str (one row) or a list of str, a numeric array -> a numpy
array (a 1x1 one -> a Python number). Compressed elements (zlib) are read. Sparse, object and
function-handle arrays, and the HDF5-based v7.3 files, are refused with FormatError.

Written by hand because the only reader people have is SciPy's (a large optional dependency
for one small file); the format is MATLAB's documented "MAT-File Format", level 5.
"""
import struct
import zlib

import numpy as np

from safepickle import FormatError

# data element types -> numpy dtypes (little-endian; big-endian files swap them)
_TYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8',
          13: 'u8', 16: 'u1', 17: 'u2', 18: 'u4'}
_MATRIX, _COMPRESSED = 14, 15
# array classes
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_NUMERIC = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4',
            14: 'i8', 15: 'u8'}


class _Reader:
    def __init__(self, data, order, path):
        self.data, self.order, self.path = data, order, path

    def error(self, msg):
        return FormatError(f'{self.path}: {msg}')

    def elements(self, data):
        """(type, payload bytes) of each data element in data."""
        pos = 0
        while pos + 8 <= len(data):
            first, second = struct.unpack(self.order + 'II', data[pos:pos + 8])
            if first >> 16:  # small data element: 2-byte size, 2-byte type, 4 data bytes
                size, kind = first >> 16, first & 0xFFFF
                if size > 4:
                    raise self.error('malformed small data element')
                yield kind, data[pos + 4:pos + 4 + size]
                pos += 8
                continue
            kind, size = first, second
            end = pos + 8 + size
            if end > len(data):
                raise self.error('truncated: a data element runs past the end of the file')
            yield kind, data[pos + 8:end]
            pos = end if kind == _COMPRESSED else end + (-size % 8)

    def numbers(self, kind, payload):
        if kind not in _TYPES:
            raise self.error(f'unsupported data type {kind}')
        return np.frombuffer(payload, np.dtype(_TYPES[kind]).newbyteorder(self.order))

    def variables(self):
        out = {}
        for kind, payload in self.elements(self.data):
            if kind == _COMPRESSED:
                try:
                    payload = zlib.decompress(payload)
                except zlib.error as e:
                    raise self.error(f'a compressed element is damaged ({e})') from None
                inner = list(self.elements(payload))
                if len(inner) != 1:
                    raise self.error('a compressed element holds more than one variable')
                kind, payload = inner[0]
            if kind != _MATRIX:
                raise self.error(f'top-level element of type {kind}, expected an array')
            name, value = self.matrix(payload)
            out[name] = value
        return out

    def matrix(self, payload):
        """A miMATRIX payload -> (name, value)."""
        if not payload:
            return '', None
        parts = list(self.elements(payload))
        if len(parts) < 3:
            raise self.error('an array without flags, dimensions and name')
        flags = self.numbers(*parts[0])
        cls, complex_ = int(flags[0]) & 0xFF, bool(int(flags[0]) & 0x800)
        dims = tuple(int(d) for d in self.numbers(*parts[1]))
        name = bytes(parts[2][1]).decode('ascii', 'replace')
        count = int(np.prod(dims)) if dims else 0
        rest = parts[3:]
        if cls == _STRUCT:
            width = int(self.numbers(*rest[0])[0])
            raw = bytes(rest[1][1])
            fields = [raw[i:i + width].split(b'\0')[0].decode('ascii')
                      for i in range(0, len(raw), width)] if width else []
            items = rest[2:]
            if len(items) != count * len(fields):
                raise self.error(f'struct {name!r}: {len(items)} values for {count} x '
                                 f'{len(fields)} fields')
            return name, [{f: self.matrix(items[i * len(fields) + j][1])[1]
                           for j, f in enumerate(fields)} for i in range(count)]
        if cls == _CELL:
            return name, [self.matrix(p)[1] for _, p in rest[:count]]
        if cls == _CHAR:
            chars = self.numbers(*rest[0]) if rest else np.zeros(0, 'u2')
            text = ''.join(map(chr, chars.tolist()))
            rows = dims[0] if dims else 0
            if rows <= 1:
                return name, text
            cols = len(text) // rows  # column-major: row r is text[r::rows]
            return name, [text[r::rows][:cols] for r in range(rows)]
        if cls in _NUMERIC:
            if complex_:
                raise self.error(f'{name!r}: complex arrays are not read')
            values = self.numbers(*rest[0]).astype(_NUMERIC[cls]) if rest else np.zeros(0)
            if values.size != count:
                raise self.error(f'{name!r}: {values.size} values for dimensions {dims}')
            array = values.reshape(dims[::-1]).T if dims else values  # column-major
            return name, array.item() if array.size == 1 else array
        raise self.error(f'{name!r}: array class {cls} (sparse, object, function) is not read')


def load(path):
    """The variables of a MATLAB 5 .mat file, a path or a binary file object (module doc);
    FormatError names the file."""
    try:
        if hasattr(path, 'read'):
            data, path = path.read(), getattr(path, 'name', 'meta.mat')
        else:
            with open(path, 'rb') as f:
                data = f.read()
    except OSError as e:
        raise FormatError(f'{path}: cannot read ({e})') from None
    if len(data) < 128:
        raise FormatError(f'{path}: not a MATLAB .mat file (too short)')
    if data[:19] == b'MATLAB 7.3 MAT-file' or data[:8] == b'\x89HDF\r\n\x1a\n':
        raise FormatError(f'{path}: a MATLAB 7.3 (HDF5) file; re-save it with -v7 or read it '
                          f'with h5py')
    endian = data[126:128]
    if endian not in (b'IM', b'MI') or not data.startswith(b'MATLAB'):
        raise FormatError(f'{path}: not a MATLAB 5 .mat file (no MATLAB header)')
    return _Reader(data[128:], '<' if endian == b'IM' else '>', path).variables()
