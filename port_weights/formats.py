"""What a converter input holds, read without torch.

    read(path) -> Source(tensors, hf_config, meta, container, ignored)

path is a file -- torch.save's zip (.pth / .pt / .bin, through torchfile's restricted
unpickler: no code from a file runs) or .safetensors, told apart by their bytes, not their
names -- or a HuggingFace folder as save_pretrained writes it (config.json + model.safetensors,
pytorch_model.bin, or their sharded *.index.json forms). Anything else raises FormatError in one
line naming the path.
"""
import dataclasses
import json
import os

import torchfile
from torchfile import FormatError

HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')


@dataclasses.dataclass
class Source:
    path: str
    container: str            # what the bytes are, for the report
    tensors: dict             # name -> numpy array, the source's own names and layout
    hf_config: dict = None    # config.json of an HF folder
    meta: dict = None         # mmsegmentation's 'meta' entry (class names, config)
    ignored: list = dataclasses.field(default_factory=list)  # other top-level entries


def read(path):
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.isfile(path):
        raise FormatError(f'{path}: no such file or folder')
    if torchfile.is_safetensors(path):
        tensors, _ = torchfile.load_safetensors(path)
        return Source(path, 'safetensors', tensors)
    if torchfile.is_torch_checkpoint(path):
        tensors, ignored, kept = torchfile.load_state_dict(path, keep=('meta',))
        meta = kept.get('meta') if isinstance(kept.get('meta'), dict) else None
        return Source(path, 'torch.save zip', tensors, meta=meta, ignored=ignored)
    try:
        torchfile.load_state_dict(path)  # raises FormatError saying what the file is instead
    except FormatError as e:
        generic = 'not a PyTorch checkpoint (not a zip archive written by torch.save)'
        raise FormatError(str(e).replace(generic, 'neither a PyTorch checkpoint (a zip written '
                                         'by torch.save) nor a .safetensors file')) from None
    raise FormatError(f'{path}: not a checkpoint this converter reads')


def _read_hf_folder(path):
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_path):
        raise FormatError(f'{path}: a folder without config.json, so not a HuggingFace model '
                          f'folder; give the weights file itself (.pth, .bin, .safetensors) '
                          f'or the folder save_pretrained wrote')
    try:
        with open(cfg_path, encoding='utf-8') as f:
            hf_config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f'{cfg_path}: not readable JSON ({e})') from None
    if not isinstance(hf_config, dict):
        raise FormatError(f'{cfg_path}: not a JSON object')
    files = _weight_files(path)
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FormatError(f'{file}: missing (named by the folder\'s index file)')
        if torchfile.is_safetensors(file):
            part = torchfile.load_safetensors(file)[0]
        else:
            part = torchfile.load_state_dict(file)[0]
        tensors.update(part)
    container = f'HuggingFace folder ({", ".join(files[:2])}{" ..." if len(files) > 2 else ""})'
    return Source(path, container, tensors, hf_config=hf_config)


def _weight_files(path):
    """The weight files of an HF folder, in load order (shards listed by the index file)."""
    for name in HF_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return [name]
        index = os.path.join(path, name + '.index.json')
        if os.path.isfile(index):
            try:
                with open(index, encoding='utf-8') as f:
                    weight_map = json.load(f)['weight_map']
                return sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f'{index}: not an index of weight files ({e})') from None
    raise FormatError(f'{path}: config.json but no weights ({" or ".join(HF_WEIGHTS)}, or a '
                      f'sharded *.index.json)')
