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

Segmentors (UperNet on a ViT: mmsegmentation's MAE / BEiT, unilm's BEiT, HF's
BeitForSemanticSegmentation) are renamed to the project's segmentor names (DESIGN.md 3.4):
`backbone.` + the official names above, the neck `neck.fpn1.{0,1,3}` / `neck.fpn2.0`, and
mmsegmentation's head names (`decode_head.*`, `auxiliary_head.*`), by a table of renames each.
Their facts add the settings the weights do not fix (the blocks feeding the neck, pool scales,
the sliding-window stride), read from the config the checkpoint carries.
"""
import ast
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

    def describe(self, source):
        """What was found, for the report."""
        return self.label

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
        _fuse_qkv(parts, out, source.path)
        facts = {'unused': unused, 'norm_eps': float(cfg.get('layer_norm_eps', 1e-12))}
        if cfg:
            facts['num_heads'] = cfg.get('num_attention_heads')
            if cfg.get('model_type') == 'vit_mae':
                facts.update(decoder_num_heads=cfg.get('decoder_num_attention_heads'),
                             norm_pix_loss=bool(cfg.get('norm_pix_loss', False)),
                             mask_ratio=float(cfg.get('mask_ratio', 0.75)))
            if 'head.weight' in out:
                facts['classes'] = _hf_labels(cfg)
        return out, facts


def _hf_labels(cfg):
    """The class names of an HF config.json (id2label), None when it names none (HF's
    placeholders LABEL_0, LABEL_1, ... included)."""
    labels = cfg.get('id2label') or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))]
    return names if names and names != [f'LABEL_{i}' for i in range(len(names))] else None


HF_LAYERS = ((HF_ENCODER_LAYER, 'blocks'), (HF_DECODER_LAYER, 'decoder_blocks'))


def _hf_key_to_official(key, parts, value, layers=HF_LAYERS, block_rows=HF_BLOCK, top=HF_TOP):
    """One HF key -> its official key; '' when it is a q / k / v part (collected in parts);
    None when no row names it. layers: (layer pattern, official prefix); block_rows / top:
    (official, *HF spellings) of the modules in a layer / outside the layers."""
    for pattern, prefix in layers:
        m = pattern.match(key)
        if m:
            block, rest = f'{prefix}.{m[1]}', m[2]
            sub, _, kind = rest.rpartition('.')
            for i, spellings in enumerate(HF_QKV):
                if sub in spellings:
                    parts.setdefault((block, kind), {})[i] = value
                    return ''
            return _by_prefix(rest, block_rows, block + '.')
    return _by_prefix(key, top)


def _by_prefix(name, rows, prefix=''):
    """name -> prefix + official name by the rows (official, *spellings) whose spelling is name
    or a module path it starts with; None when no row matches."""
    for official, *spellings in rows:
        for spelling in spellings:
            if name == spelling or name.startswith(spelling + '.'):
                return prefix + official + name[len(spelling):]
    return None


def _fuse_qkv(parts, out, path):
    """The q / k / v parts of each block -> the fused `attn.qkv.{weight,bias}`; biases of q and
    v only (BEiT: the key has none) -> `attn.q_bias`, `attn.v_bias`."""
    for (block, kind), rows in parts.items():
        if len(rows) == 3:
            out[f'{block}.attn.qkv.{kind}'] = np.concatenate([rows[i] for i in range(3)], 0)
        elif kind == 'bias' and sorted(rows) == [0, 2]:
            out[f'{block}.attn.q_bias'], out[f'{block}.attn.v_bias'] = rows[0], rows[2]
        else:
            names = [HF_QKV[i][0].rpartition('.')[2] for i in sorted(rows)]
            raise FormatError(f'{path}: {block} holds only {names} of query, key and value '
                              f'{kind}')


# ----------------------------------------------------------------------------------------------
# Segmentors: mmsegmentation (MAE / BEiT), unilm BEiT, HF BeitForSemanticSegmentation
# ----------------------------------------------------------------------------------------------
BACKBONE = 'backbone.'
# one table for every block (unilm / HF use_shared_rel_pos_bias), under its unilm name
SHARED_TABLE = 'backbone.rel_pos_bias.relative_position_bias_table'
BLOCK_TABLE = 'backbone.blocks.{}.attn.relative_position_bias_table'


def _block_renames(blocks, rows):
    """Rename rows for block sub-modules: `<blocks>.{i}.<source>` -> `backbone.blocks.{i}.
    <official>`, for the (official, source) rows."""
    return tuple((rf'^{blocks}\.(\d+)\.{re.escape(src)}(?=\.|$)', rf'backbone.blocks.\1.{dst}')
                 for dst, src in rows)


# Each layout: (pattern, replacement) rows applied in turn to every key (re.sub); what no row
# changes is kept (the heads' names are mmsegmentation's in every layout).
MMSEG_RENAMES = _block_renames(r'backbone\.layers', (
    ('norm1', 'ln1'), ('norm2', 'ln2'), ('attn', 'attn'), ('ls1.gamma', 'gamma_1'),
    ('ls2.gamma', 'gamma_2'), ('mlp.fc1', 'ffn.layers.0.0'), ('mlp.fc2', 'ffn.layers.1'),
)) + (
    (r'^backbone\.patch_embed\.projection\.', 'backbone.patch_embed.proj.'),
    (r'^neck\.upsample_4x\.', 'neck.fpn1.'),  # Feature2Pyramid: (ConvT, BN, GELU, ConvT)
    (r'^neck\.upsample_2x\.', 'neck.fpn2.'),
)
# unilm beit/semantic_segmentation/backbone/beit.py: timm's block names with BEiT's gammas, the
# neck inside the backbone (fpn1 = ConvT, SyncBN, GELU, ConvT; fpn2 = ConvT)
UNILM_RENAMES = _block_renames(r'backbone\.blocks', (
    ('ls1.gamma', 'gamma_1'), ('ls2.gamma', 'gamma_2'),
)) + (
    (r'^backbone\.(fpn[12])\.', r'neck.\1.'),
)
# HF BeitForSemanticSegmentation outside the encoder, file spelling and transformers 5.x
HF_BEIT_RENAMES = (
    (r'^(?:fpn1\.0|fpn\.fpn1\.conv_transpose1)\.', 'neck.fpn1.0.'),
    (r'^(?:fpn1\.1|fpn\.fpn1\.normalization)\.', 'neck.fpn1.1.'),
    (r'^(?:fpn1\.3|fpn\.fpn1\.conv_transpose2)\.', 'neck.fpn1.3.'),
    (r'^(?:fpn2\.0|fpn\.fpn2)\.', 'neck.fpn2.0.'),
    (r'\.psp_modules\.blocks\.(\d+)\.conv\.', r'.psp_modules.\1.1.'),
    (r'\.psp_bottleneck\.', '.bottleneck.'),
    (r'\.convolution\.', '.conv.'),
    (r'\.normalization\.', '.bn.'),
    (r'\.classifier\.', '.conv_seg.'),
)
# HF BEiT encoder: the ViT rows plus BEiT's (official, file spelling, 5.x spelling)
HF_BEIT_BLOCK = HF_BLOCK + (
    ('ls1.gamma', 'lambda_1', 'lambda_1'),
    ('ls2.gamma', 'lambda_2', 'lambda_2'),
    ('attn', 'attention.attention.relative_position_bias', 'relative_position_bias'),
)
HF_BEIT_TOP = (
    ('backbone.cls_token', 'beit.embeddings.cls_token'),
    ('backbone.pos_embed', 'beit.embeddings.position_embeddings'),
    ('backbone.patch_embed.proj', 'beit.embeddings.patch_embeddings.projection'),
    ('backbone.rel_pos_bias', 'beit.encoder.relative_position_bias', 'beit.shared_position_bias'),
)
HF_BEIT_LAYERS = ((re.compile(r'beit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)$'),
                   'backbone.blocks'),)
# modules of BeitModel that the segmentor does not run
HF_BEIT_UNUSED = ('beit.embeddings.mask_token', 'beit.layernorm.', 'beit.pooler.')

# Settings the weights do not fix, from the `model = dict(...)` of the config text an
# mmsegmentation / unilm checkpoint carries in its meta: fact <- path in that dict.
MM_SETTINGS = (
    ('out_indices', ('backbone', 'out_indices')),
    ('num_heads', ('backbone', 'num_heads')),
    ('img_size', ('backbone', 'img_size')),
    ('pool_scales', ('decode_head', 'pool_scales')),
    ('dropout', ('decode_head', 'dropout_ratio')),
    ('aux_weight', ('auxiliary_head', 'loss_decode', 'loss_weight')),
    ('slide_stride', ('test_cfg', 'stride')),
)
# ... and what the project's segmentor takes as fixed: (path, the value it needs, what it is)
MM_FIXED = (
    (('decode_head', 'align_corners'), False, 'the heads resize with align_corners False'),
    (('decode_head', 'in_index'), [0, 1, 2, 3], 'the decode head reads the 4 neck levels'),
    (('auxiliary_head', 'in_index'), 2, 'the auxiliary head reads the third neck level'),
    (('neck', 'rescales'), [4, 2, 1, 0.5], 'the neck rescales by 4, 2, 1, 0.5'),
)
LAYER_NORM_EPS_MM = 1e-5  # mmcv's LN (torch's default) when a norm_cfg gives no eps


def _rename(name, renames):
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def _renamed(tensors, renames):
    return {_rename(name, renames): value for name, value in tensors.items()}


def _num_blocks(out):
    ids = {int(m[1]) for m in map(re.compile(r'backbone\.blocks\.(\d+)\.').match, out) if m}
    return max(ids) + 1 if ids else 0


def _segmentor(out, facts, path):
    """The shared relative position table (if any) expanded into every block, and the heads
    read from the tables: -> (out, facts)."""
    shared = out.pop(SHARED_TABLE, None)
    if shared is not None:  # added to every block's logits: each block gets it (+ its own)
        for i in range(_num_blocks(out)):
            own = out.get(BLOCK_TABLE.format(i))
            if own is not None and own.shape != shared.shape:
                raise FormatError(f'{path}: {SHARED_TABLE} {list(shared.shape)} and block {i}\'s '
                                  f'table {list(own.shape)} differ in shape')
            out[BLOCK_TABLE.format(i)] = shared if own is None else own + shared
    table = out.get(BLOCK_TABLE.format(0))
    if not facts.get('num_heads') and np.ndim(table) == 2:  # (entries, heads)
        facts['num_heads'] = int(table.shape[1])
    return out, facts


def config_model(text):
    """The `model = dict(...)` of an mm-style config text (mmcv's / mmengine's pretty_text),
    read without running it: literals and dict(...) only, anything else None; {} if none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, TypeError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == 'model' for t in node.targets):
            value = _literal(node.value)
            return value if isinstance(value, dict) else {}
    return {}


def _literal(node):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict':
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Dict):
        pairs = ((_literal(k), v) for k, v in zip(node.keys, node.values) if k is not None)
        return {k: _literal(v) for k, v in pairs if isinstance(k, (str, int, float))}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _get(tree, path):
    for part in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _square(value, what, path):
    """An int, or an (h, w) pair with h == w -> int."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise FormatError(f'{path}: {what} {value} is not square; the project\'s segmentor '
                              f'takes square crops and windows')
        value = value[0]
    return value


def _mm_facts(source):
    """What an mmsegmentation / unilm checkpoint's meta says: class names (mmengine's
    dataset_meta, mmcv's CLASSES) and the settings of its config text ('cfg' / 'config');
    LayerNorm eps 1e-6 (the ADE20K configs' and unilm's) unless its norm_cfg says otherwise."""
    meta, path = source.meta or {}, source.path
    classes = _get(meta, ('dataset_meta', 'classes')) or meta.get('CLASSES')
    facts = {'classes': [str(c) for c in classes]} if isinstance(classes, (list, tuple)) \
        else {}
    model = _meta_model(meta)
    for fact, where in MM_SETTINGS:
        value = _get(model, where)
        if value is not None:
            facts[fact] = value
    for fact in ('img_size', 'slide_stride'):
        if fact in facts:
            facts[fact] = _square(facts[fact], fact, path)
    for where, needed, what in MM_FIXED:
        value = _get(model, where)
        if value is not None and value != needed:
            raise FormatError(f'{path}: its config says {".".join(where)} {value!r}; the '
                              f'project\'s segmentor has {needed!r} ({what})')
    norm_cfg = _get(model, ('backbone', 'norm_cfg'))
    facts['norm_eps'] = float(norm_cfg.get('eps', LAYER_NORM_EPS_MM)) \
        if isinstance(norm_cfg, dict) else 1e-6
    if model:
        facts['notes'] = ['settings from the config in the checkpoint\'s meta: '
                          + ', '.join(f for f, _ in MM_SETTINGS if f in facts)]
    return facts


def _meta_model(meta):
    """The model dict of the config text in an mm checkpoint's meta (mmengine: 'cfg', mmcv:
    'config'); {} without one."""
    text = (meta or {}).get('cfg') or (meta or {}).get('config')
    return config_model(text) if isinstance(text, str) else {}


def _backbone_type(source):
    kind = _get(_meta_model(source.meta), ('backbone', 'type'))
    return kind if isinstance(kind, str) else None


class MMSegSegmentor(Family):
    """mmsegmentation's EncoderDecoder with its MAE or BEiT backbone, Feature2Pyramid neck,
    UPerHead and FCNHead ({'meta', 'state_dict'})."""
    label = 'mmsegmentation segmentor'
    LAYER = re.compile(r'backbone\.layers\.\d+\.ln1\.')

    def matches(self, source):
        keys = source.tensors
        return (source.hf_config is None and any(k.startswith('decode_head.') for k in keys)
                and any(self.LAYER.match(k) for k in keys))

    def describe(self, source):
        kind = _backbone_type(source) or (
            'BEiT' if 'backbone.layers.0.attn.q_bias' in source.tensors else 'MAE')
        return f'{self.label}, {kind} backbone'

    def to_official(self, source):
        return _segmentor(_renamed(source.tensors, MMSEG_RENAMES), _mm_facts(source),
                          source.path)


class UnilmBeitSegmentor(Family):
    """microsoft/unilm beit/semantic_segmentation checkpoints: the BEiT backbone with its neck
    (backbone.fpn1..fpn4), q / v biases, gamma_1 / gamma_2, relative position tables per block
    or shared (backbone.rel_pos_bias), mmseg 0.x heads."""
    label = 'unilm BEiT segmentor (backbone.fpn1..fpn4)'

    def matches(self, source):
        keys = source.tensors
        return (source.hf_config is None and any(k.startswith('decode_head.') for k in keys)
                and any(k.startswith(('backbone.fpn1.', 'backbone.blocks.')) for k in keys))

    def to_official(self, source):
        return _segmentor(_renamed(source.tensors, UNILM_RENAMES), _mm_facts(source),
                          source.path)


class HuggingFaceBeitSegmentation(Family):
    """HF BeitForSemanticSegmentation: a folder (config.json: heads, LayerNorm eps, out_indices,
    pool scales, auxiliary head, labels) or its bare weights (HF's defaults then).

    HF taps hidden_states[i - 1] for each out_indices entry i, hidden_states[0] being the
    embeddings: the output of 0-based block i - 2, which is what the converted model reads
    (MODEL.SEGMENTATION.OUT_INDICES = [i - 2 ...]), so it gives HF's own outputs."""
    label = 'HuggingFace BeitForSemanticSegmentation'

    def matches(self, source):
        cfg = source.hf_config
        if cfg is not None:
            return cfg.get('model_type') == 'beit'
        keys = source.tensors
        return (any(k.startswith('beit.') for k in keys)
                and any(k.startswith('decode_head.') for k in keys))

    def to_official(self, source):
        cfg, path = source.hf_config or {}, source.path
        if not any(k.startswith('decode_head.') for k in source.tensors):
            arch = ', '.join(cfg.get('architectures') or []) or 'no decode_head.*'
            raise FormatError(f'{path}: a BEiT without segmentation heads ({arch}); this '
                              f'converter reads BeitForSemanticSegmentation')
        if cfg.get('hidden_act', 'gelu') != 'gelu':
            raise FormatError(f'{path}: hidden_act {cfg["hidden_act"]!r}; the project\'s ViT '
                              f'uses the exact GELU (gelu)')
        out, parts, unused = {}, {}, []
        for name, value in source.tensors.items():
            if name.startswith(HF_BEIT_UNUSED):
                unused.append(name)
                continue
            if name.startswith('beit.'):
                key = _hf_key_to_official(name, parts, value, HF_BEIT_LAYERS, HF_BEIT_BLOCK,
                                          HF_BEIT_TOP)
                if key is None:
                    raise FormatError(f'{path}: {name}: not a BEiT encoder weight')
            else:
                key = _rename(name, HF_BEIT_RENAMES)
            if key:
                out[key] = value
        _fuse_qkv(parts, out, path)
        facts = {'unused': unused, 'norm_eps': float(cfg.get('layer_norm_eps', 1e-12)),
                 'num_heads': cfg.get('num_attention_heads'),
                 'pool_scales': list(cfg.get('pool_scales', [1, 2, 3, 6])),
                 'img_size': _square(cfg.get('image_size'), 'image_size', path),
                 'classes': _hf_labels(cfg)}
        if cfg.get('use_auxiliary_head', True):
            facts['aux_weight'] = float(cfg.get('auxiliary_loss_weight', 0.4))
        if 'out_indices' in cfg:
            taps = list(cfg['out_indices'])
            blocks = [int(i) - 2 for i in taps]
            if any(b < 0 for b in blocks):
                raise FormatError(f'{path}: out_indices {taps} tap hidden_states[i - 1]; an '
                                  f'index below 2 takes the embeddings, not a block\'s output, '
                                  f'which the project\'s segmentor does not read')
            facts['out_indices'] = blocks
            facts['notes'] = [f'HF out_indices {taps} feed the neck hidden_states[i - 1] = the '
                              f'outputs of 0-based blocks {blocks}: '
                              f'MODEL.SEGMENTATION.OUT_INDICES {blocks}']
        else:
            facts['notes'] = ['no config.json: HF\'s LayerNorm eps 1e-12, and the blocks '
                              'feeding the neck of the project\'s config']
        return _segmentor(out, {k: v for k, v in facts.items() if v is not None}, path)


FAMILIES = [HuggingFaceBeitSegmentation(), HuggingFaceViT(), MMSegSegmentor(),
            UnilmBeitSegmentor(), OfficialLayout()]


def recognise(source):
    """The family of source, or FormatError saying what the source is instead."""
    for family in FAMILIES:
        if family.matches(source):
            return family
    cfg = source.hf_config
    if cfg is not None:
        arch = ', '.join(cfg.get('architectures') or []) or 'no architectures entry'
        types = HuggingFaceViT.MODEL_TYPES + ('beit',)
        raise FormatError(f'{source.path}: config.json says model_type '
                          f'{cfg.get("model_type")!r} ({arch}); this converter reads HF '
                          f'model types {", ".join(types)}')
    keys = sorted(source.tensors)
    if any(k.startswith('decode_head.') for k in keys):
        modules = sorted({k.split('.')[1] for k in keys if k.startswith(BACKBONE)})
        kind = _backbone_type(source)
        found = (f'type {kind!r} (its config), ' if kind else '') + \
            f'modules backbone.{{{", ".join(modules[:6])}{", ..." if len(modules) > 6 else ""}}}'
        raise FormatError(f'{source.path}: a segmentor (decode_head.*) whose backbone is not a '
                          f'ViT this converter reads ({found}); it reads mmsegmentation MAE / '
                          f'BEiT (backbone.layers.N.ln1), unilm BEiT (backbone.blocks.N, '
                          f'backbone.fpn1) and HF BeitForSemanticSegmentation')
    raise FormatError(f'{source.path}: not an MAE / ViT checkpoint of a known layout (no '
                      f'patch_embed.proj.weight nor HF vit.embeddings.*; keys: '
                      f'{", ".join(keys[:6])}{" ..." if len(keys) > 6 else ""})')
