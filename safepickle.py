"""Pickle reading that cannot run code: the one restricted unpickler of the project.

A pickle names the globals (functions, classes) it calls while it is read; that is how a file
runs code (os.system in a __reduce__). Unpickler builds only the globals of an allow table its
caller hands down (torchfile: torch's tensor records; paddlefile: NumPy arrays) and refuses any
other one in one line that names it, before anything is called. The standard library offers the
hook (find_class) but no restricted unpickler, hence this module.
"""
import _codecs
import pickle

# Python 2 names that protocol-2 pickles use for builtins (pickle maps them only in the default
# find_class, which Unpickler replaces)
_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


class FormatError(Exception):
    """A file that is not a readable checkpoint (or an object a writer cannot write)."""


def _latin1_encode(text, encoding='latin1'):
    """_codecs.encode as protocol-2 pickles use it (bytes stored as latin-1 text) and nothing
    else."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise FormatError('malformed bytes record in the pickle')
    return _codecs.encode(text, encoding)


# builtins a pickle of plain data may reference: containers and numbers only
BUILTINS = {('builtins', n.__name__): n
            for n in (tuple, list, dict, set, frozenset, complex, bytes, bytearray)}
BUILTINS[('_codecs', 'encode')] = _latin1_encode


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come from `allowed` ({(module, name): object}) only;
    `allows` says in words what that is, for the refusal message."""

    def __init__(self, file, allowed, allows, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.allows = allowed, allows

    def find_class(self, module, name):
        key = (_PY2_MODULES.get(module, module), name)
        try:
            return self.allowed[key]
        except (KeyError, TypeError):
            raise FormatError(f'refusing to load {key[0]}.{name}: the pickle references a global '
                              f'that a weights file does not need (allowed: {self.allows})'
                              ) from None

    def persistent_load(self, pid):
        raise FormatError(f'unknown persistent record {pid!r:.80} in the pickle')
