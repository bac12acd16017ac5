"""The checkpoint families the converter reads, each renamed to the official MAE names.

    recognise(source) -> Family (or FormatError: one line saying what was found instead)
    family.to_official(source) -> (tensors under official names, torch layout; facts)

The official names (DESIGN.md 3.1: timm's ViT names, plus `blocks.{i}.ls{1,2}.gamma`,
`blocks.{i}.attn.{q,v}_bias` and `blocks.{i}.attn.relative_position_bias_table` for the
variants of 3.5) are what convert_official.py turns into Paddle's layout by its one rule.
`facts` carries what the tensors cannot say (heads, LayerNorm eps, loss settings, class names)
from the source's own config, when it has one.

The HuggingFace names are one table (HF_BLOCK, HF_QKV, HF_TOP), read here from HF to official
and by export_official.py the other way. Two HF spellings exist: the files on the hub and what
save_pretrained writes (`vit.encoder.layer.{i}.attention.attention.query`), and the module
names of transformers 5.x (`vit.layers.{i}.attention.q_proj`); both are read.
"""
import re

import numpy as np

from torchfile import FormatError

# official block sub-module <-> HF ViT / ViTMAE layer sub-module (file spelling, 5.x spelling)
HF_BLOCK = (
    ('norm1', 'layernorm_before', 'layernorm_before'),
    ('norm2', 'layernorm_after', 'layernorm_after'),
    ('attn.proj', 'attention.output.dense', 'attention.o_proj'),
    ('mlp.fc1', 'intermediate.dense', 'mlp.fc1'),
    ('mlp.fc2', 'output.dense', 'mlp.fc2'),
)
# the fused qkv's three row blocks, in order: (file spelling, 5.x spelling)
HF_QKV = (('attention.attention.query', 'attention.q_proj'),
          ('attention.attention.key', 'attention.k_proj'),
          ('attention.attention.value', 'attention.v_proj'))
# official top-level module <-> HF ViTMAEForPreTraining / ViTForImageClassification module
HF_TOP = (
    ('cls_token', 'vit.embeddings.cls_token'),
    ('pos_embed', 'vit.embeddings.position_embeddings'),
    ('patch_embed.proj', 'vit.embeddings.patch_embeddings.projection'),
    ('norm', 'vit.layernorm'),
    ('head', 'classifier'),
    ('mask_token', 'decoder.mask_token'),
    ('decoder_pos_embed', 'decoder.decoder_pos_embed'),
    ('decoder_embed', 'decoder.decoder_embed'),
    ('decoder_norm', 'decoder.decoder_norm'),
    ('decoder_pred', 'decoder.decoder_pred'),
)
# HF modules with no counterpart in the MAE models (ViTModel's pooler, a BEiT-style mask token)
HF_UNUSED = ('vit.pooler.', 'vit.embeddings.mask_token')
HF_ENCODER_LAYER = re.compile(r'vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)$')
HF_DECODER_LAYER = re.compile(r'decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$')


class Family:
    """A kind of checkpoint: `label` for the report, `matches(source)`, `to_official`."""
    label = ''

    def matches(self, source):
        raise NotImplementedError

    def to_official(self, source):
        raise NotImplementedError


class OfficialLayout(Family):
    """Official MAE files and timm VisionTransformer state dicts: already the official names
    (timm's LayerScale `ls1.gamma` / `ls2.gamma` included)."""
    label = 'official MAE / timm VisionTransformer layout'

    def matches(self, source):
        return source.hf_config is None and 'patch_embed.proj.weight' in source.tensors

    def to_official(self, source):
        return dict(source.tensors), {}


class HuggingFaceViT(Family):
    """HF ViTMAEForPreTraining / ViTMAEModel / ViTForImageClassification / ViTModel: a folder
    (its config.json gives heads, LayerNorm eps, loss settings, labels) or a bare weights file
    of one (HF's defaults then: LayerNorm eps 1e-12)."""
    label = 'HuggingFace ViT / ViTMAE'
    MODEL_TYPES = ('vit_mae', 'vit')

    def matches(self, source):
        cfg = source.hf_config
        if cfg is not None:
            return cfg.get('model_type') in self.MODEL_TYPES
        return any(k.startswith(('vit.embeddings.', 'embeddings.patch_embeddings'))
                   for k in source.tensors)

    def to_official(self, source):
        cfg = source.hf_config or {}
        if cfg.get('hidden_act', 'gelu') != 'gelu':
            raise FormatError(f'{source.path}: hidden_act {cfg["hidden_act"]!r}; the MAE models '
                              f'use the exact GELU (gelu)')
        out, parts, unused = {}, {}, []
        for name, value in source.tensors.items():
            key = name if name.startswith(('vit.', 'decoder.', 'classifier.')) else 'vit.' + name
            if key.startswith(HF_UNUSED):
                unused.append(name)
                continue
            official = _hf_key_to_official(key, parts, value)
            if official is None:
                raise FormatError(f'{source.path}: {name}: not a ViT / ViTMAE weight')
            if official:
                out[official] = value
        for (block, kind), rows in parts.items():
            if len(rows) != 3:
                raise FormatError(f'{source.path}: {block} holds only {sorted(rows)} of query, '
                                  f'key and value {kind}')
            out[f'{block}.attn.qkv.{kind}'] = np.concatenate([rows[i] for i in range(3)], 0)
        facts = {'unused': unused, 'norm_eps': float(cfg.get('layer_norm_eps', 1e-12))}
        if cfg:
            facts['num_heads'] = cfg.get('num_attention_heads')
            if cfg.get('model_type') == 'vit_mae':
                facts.update(decoder_num_heads=cfg.get('decoder_num_attention_heads'),
                             norm_pix_loss=bool(cfg.get('norm_pix_loss', False)),
                             mask_ratio=float(cfg.get('mask_ratio', 0.75)))
            labels = cfg.get('id2label') or {}
            if labels and 'head.weight' in out:
                facts['classes'] = [labels.get(str(i), labels.get(i)) for i in range(len(labels))]
        return out, facts


def _hf_key_to_official(key, parts, value):
    """One HF key -> its official key; '' when it is a q / k / v part (collected in parts);
    None when it is no ViT / ViTMAE key."""
    for pattern, prefix in ((HF_ENCODER_LAYER, 'blocks'), (HF_DECODER_LAYER, 'decoder_blocks')):
        m = pattern.match(key)
        if m:
            block = f'{prefix}.{m[1]}'
            sub, _, kind = m[2].rpartition('.')
            for i, spellings in enumerate(HF_QKV):
                if sub in spellings:
                    parts.setdefault((block, kind), {})[i] = value
                    return ''
            for official, *spellings in HF_BLOCK:
                if sub in spellings:
                    return f'{block}.{official}.{kind}'
            return None
    for official, hf in HF_TOP:
        if key == hf:
            return official
        if key.startswith(hf + '.'):
            return official + key[len(hf):]
    return None


FAMILIES = [HuggingFaceViT(), OfficialLayout()]


def recognise(source):
    """The family of source, or FormatError saying what the source is instead."""
    for family in FAMILIES:
        if family.matches(source):
            return family
    cfg = source.hf_config
    if cfg is not None:
        arch = ', '.join(cfg.get('architectures') or []) or 'no architectures entry'
        raise FormatError(f'{source.path}: config.json says model_type '
                          f'{cfg.get("model_type")!r} ({arch}); this converter reads HF '
                          f'model types {", ".join(HuggingFaceViT.MODEL_TYPES)}')
    keys = sorted(source.tensors)
    raise FormatError(f'{source.path}: not an MAE / ViT checkpoint of a known layout (no '
                      f'patch_embed.proj.weight nor HF vit.embeddings.*; keys: '
                      f'{", ".join(keys[:6])}{" ..." if len(keys) > 6 else ""})')
