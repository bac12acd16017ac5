"""paddle.save's files (.pdparams, .pdopt), read without running code from them.

    load(path)                    -> what paddle.load(path) returns, tensors included
    load(path, return_numpy=True) -> the same with numpy arrays for tensors

paddle.load unpickles anything: a file whose pickle calls os.system runs it. Here the pickle is
read by safepickle.Unpickler, which builds only what paddle.save writes -- NumPy arrays, dtypes
and scalars (under NumPy 1.x or 2.x names), builtin containers, OrderedDict, strings and
numbers -- and refuses any other global (FormatError, one line naming it) before anything is
called. What paddle.load then does to the unpickled object is done the same way here (Paddle
keeps it in private helpers, so it is restated): tensors split by paddle.save for pickle
protocols 2-3 ('UnpackBigParamInfor@@') joined back, arrays turned into tensors named after
the 'StructuredToParameterName@@' table (which is dropped), or, in files without one (an
optimizer state: tensors pickled as (name, array) pairs), every pair or else every array.
"""
import collections
import os

import numpy as np
import paddle

import safepickle
from safepickle import FormatError  # noqa: F401 (this module's error, for its callers)

NAME_TABLE = 'StructuredToParameterName@@'
SPLIT_INFO = 'UnpackBigParamInfor@@'  # (sic: Paddle's spelling)


def _numpy_globals():
    """NumPy's pickle entry points, under the names NumPy 1.x and 2.x write, mapped to the
    running NumPy's own functions."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float32(0).__reduce__()[0]
    table = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        table[(mod, '_reconstruct')] = reconstruct
        table[(mod, 'scalar')] = scalar
    return table


_ALLOWED = {**safepickle.BUILTINS, **_numpy_globals(),
            ('collections', 'OrderedDict'): collections.OrderedDict}
ALLOWS = 'NumPy arrays, dtypes and scalars, builtin containers, OrderedDict'


def unpickle(path):
    """The object pickled in path, built from the allowed globals only."""
    with open(path, 'rb') as f:
        head = f.read(1)
        if head != b'\x80':  # paddle.save writes pickle protocol 2..4, which start so
            raise FormatError(f'{path}: not a file written by paddle.save (not a pickle)'
                              if head else f'{path}: the file is empty')
        f.seek(0)
        try:
            return safepickle.Unpickler(f, _ALLOWED, ALLOWS, encoding='latin1').load()
        except FormatError as e:
            raise FormatError(f'{path}: {e}') from None
        except Exception as e:  # a damaged pickle fails in many ways; all are the file's fault
            raise FormatError(f'{path}: cannot be read ({type(e).__name__}: {e}); truncated '
                              f'or not written by paddle.save?') from None


def load(path, return_numpy=False):
    """paddle.load(path) for files written by paddle.save, without running code (module doc)."""
    if not os.path.isfile(path):
        raise FormatError(f'{path}: no such file')
    obj = unpickle(path)
    if isinstance(obj, dict):
        _join_split(obj, path)
        if NAME_TABLE in obj:
            table = obj.pop(NAME_TABLE)
            for key, name in table.items():
                if isinstance(obj.get(key), np.ndarray) and not return_numpy:
                    obj[key] = _tensor(obj[key], name)
            return obj
    return _to_tensors(obj, return_numpy)


def _join_split(obj, path):
    """Tensors paddle.save cut into slices ('key@@.0', ...) for pickle protocols < 4."""
    info = obj.pop(SPLIT_INFO, None)
    if info is None:
        return
    try:
        for key, rec in info.items():
            obj[key] = np.concatenate([obj.pop(part) for part in rec['slices']]).reshape(
                rec['OriginShape'])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f'{path}: a split tensor cannot be joined back ({e})') from None


def _tensor(array, name=None):
    t = paddle.to_tensor(array)
    if name:
        t.name = name
    return t


def _is_pair(x):
    """A tensor as paddle.save pickles it outside a state dict: (name, array)."""
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], np.ndarray))


def _contains(obj, test):
    if test(obj):
        return True
    if type(obj) in (dict, collections.OrderedDict):
        return any(_contains(v, test) for v in obj.values())
    if type(obj) in (list, tuple):
        return any(_contains(v, test) for v in obj)
    return False


def _to_tensors(obj, return_numpy):
    """paddle.load's conversion of a file without a name table: the (name, array) pairs become
    tensors if there are any, else every array does; other values stay as they are."""
    if _contains(obj, _is_pair):
        test, make = _is_pair, (lambda p: p[1] if return_numpy else _tensor(p[1], p[0]))
    else:
        test, make = (lambda x: isinstance(x, np.ndarray)), (lambda a: a if return_numpy
                                                             else _tensor(a))
    return _convert(obj, test, make)


def _convert(obj, test, make):
    if test(obj):
        return make(obj)
    kind = type(obj)
    if kind in (dict, collections.OrderedDict):
        for k in list(obj):
            obj[k] = _convert(obj[k], test, make)
        return obj
    if kind is list:
        obj[:] = [_convert(v, test, make) for v in obj]
        return obj
    if kind in (tuple, set):
        return kind(_convert(v, test, make) for v in obj)
    return obj
