"""Checkpoints: the one module that writes and reads them, for every entry point and tool.

- save_checkpoint: latest.pdparams (model) + latest.pdopt (optimizer, training state, scaler),
  written under temporary names and renamed, the previous pair kept as previous.*;
- resume_prefix / find_resume_checkpoint: what -resume (a prefix, a file, or 'auto') points at;
- resume: a pair loaded back; load_pretrained: MODEL.PRETRAINED (ours or converted official
  weights) into a model, with the report of what was missing or unused; load_model: any
  checkpoint that carries its config -> (model, config).
"""
import fnmatch
import hashlib
import os
import warnings

import paddle

import classnames
import config as cfgmod
import paddlefile
import torchfile
import transformer
from utils import NO_SPACE, UserError, is_main_process

PATCH_EMBED = 'patch_embed.proj.weight'  # what every ViT / MAE state dict holds
ENCODER_PARTS = ('blocks.', 'pos_embed', 'cls_token', 'patch_embed.')  # names of the encoder
# A checkpoint's .pdparams also holds, under this key, what the run was: {'config': the
# resolved config as YAML, 'classes': the class names or None}. set_state_dict ignores it.
META_KEY = '_meta'
# what a model is: a config that says otherwise cannot evaluate or export its weights
MODEL_KEYS = ('TRAIN.MODE', 'MODEL.NAME', 'MODEL.ENCODER', 'MODEL.DECODER', 'MODEL.NUM_CLASSES',
              'MODEL.GLOBAL_POOL', 'DATA.IMAGE_SIZE', 'MODEL.LAYER_SCALE', 'MODEL.QKV_BIAS',
              'MODEL.ABS_POS_EMBED', 'MODEL.REL_POS_BIAS', 'MODEL.LAYER_NORM_EPS')
# what a segmentor's label values mean: evaluated with others, it scores other classes
LABEL_KEYS = ('DATA.REDUCE_ZERO_LABEL', 'DATA.IGNORE_INDEX', 'MODEL.NUM_CLASSES')
SEGMENTOR_MARK = 'backbone.' + PATCH_EMBED  # a segmentor's encoder lives under backbone.


def _fingerprint(path):
    """Cheap identity of a checkpoint file: size + SHA-1 of its first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha1(str(size).encode())
    with open(path, 'rb') as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def _atomic_save(obj, path):
    tmp = path + '.tmp'
    paddle.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(output_dir, model, optimizer, state, scaler=None, copies=(), meta=None):
    """Write latest.pdparams (model) and latest.pdopt (optimizer + state + scaler).

    state: dict with at least 'epoch' (epochs finished) and 'iter' (iterations into the next
    epoch). Files are written under temporary names and renamed; the previous pair is kept as
    previous.* (hard links) so that a kill between the two renames leaves one good pair, which
    find_resume_checkpoint picks. copies: names under which the model is also kept, e.g.
    ('epoch_4', 'best') -> epoch_4.pdparams, best.pdparams (hard links, replaced atomically).
    meta (run_meta): stored in the .pdparams under META_KEY. Only the main process writes.
    A write that finds no room (disk full, quota, file size limit) removes what it wrote and
    raises UserError: the pair saved before stays as it was.
    """
    if not is_main_process():
        return
    try:
        _save_pair(output_dir, model, optimizer, state, scaler, copies, meta)
    except OSError as e:
        remove_temporary(output_dir)
        if e.errno not in NO_SPACE:
            raise
        latest = os.path.join(output_dir, 'latest')
        kept = (f'{latest}.pdparams (+ .pdopt) is the last whole checkpoint' if os.path.exists(
            latest + '.pdopt') else 'no checkpoint was saved before this one')
        raise UserError(f'cannot save a checkpoint in {output_dir}: {e.strerror} (disk full, '
                        f'quota or file size limit); {kept}; free some space, then go on with '
                        f'the same command and -resume auto') from None


def _save_pair(output_dir, model, optimizer, state, scaler, copies, meta):
    latest = os.path.join(output_dir, 'latest')
    params = dict(model.state_dict())
    if meta is not None:
        params[META_KEY] = meta
    params_tmp = _atomic_save(params, latest + '.pdparams.next')
    opt = {'optimizer': optimizer.state_dict(), 'state': dict(state),
           'model_fingerprint': _fingerprint(params_tmp)}
    if scaler is not None:
        opt['scaler'] = scaler.state_dict()
    opt_tmp = _atomic_save(opt, latest + '.pdopt.next')
    for ext in ('.pdparams', '.pdopt'):  # keep the current pair as previous.*
        if os.path.exists(latest + ext):
            _link(latest + ext, os.path.join(output_dir, 'previous' + ext))
    os.replace(params_tmp, latest + '.pdparams')
    os.replace(opt_tmp, latest + '.pdopt')
    for name in copies:
        _link(latest + '.pdparams', os.path.join(output_dir, name + '.pdparams'))


TEMPORARY = ('.tmp', '.next')  # endings of what a save writes before renaming it


def remove_temporary(output_dir):
    """Remove what a save that did not finish left in output_dir (temporary names, TEMPORARY):
    it never holds the newest good pair, and may fill the disk. Main process only."""
    if not is_main_process() or not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.endswith(TEMPORARY) and name.startswith(('latest.', 'previous.', 'best.',
                                                          'epoch_')):
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                pass


def _link(src, dst):
    """dst becomes a hard link to src, atomically (a temporary link, then a rename)."""
    tmp = dst + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    os.link(src, tmp)
    os.replace(tmp, dst)


def run_meta(config, classes=None):
    """What a checkpoint carries besides the weights (see META_KEY)."""
    return {'config': config.dump(),
            'classes': classnames.canonical(classes) if classes else None}


def split_meta(state):
    """-> (the tensors of a loaded .pdparams, its META_KEY entry or None)."""
    if isinstance(state, dict) and META_KEY in state:
        state = dict(state)
        return state, state.pop(META_KEY)
    return state, None


def saved_meta(path):
    """The META_KEY entry of a .pdparams (None: not one of this project's checkpoints)."""
    return split_meta(load_file(path, 'weights'))[1]


def load_model(path):
    """-> (model, config) for any .pdparams of the project that carries its config (a training
    checkpoint, or converted weights): the model its task trains (transformer.build_model: the
    tasks hand their builders down when tasks.py is imported), every tensor of the file
    loaded, in eval mode. Its forward is the task's (classifier: logits; MAE:
    model(imgs, mask_ratio=, noise=) -> (loss, pred, mask); segmentor: decode logits)."""
    state, meta = split_meta(load_file(path, 'weights'))
    if meta is None:
        raise UserError(f'{path} carries no config of this project: convert the original with '
                        f'port_weights/convert_official.py (which stores one)')
    config = cfgmod.from_text(meta['config'], f'the config saved in {path}')
    if not transformer.MODEL_BUILDERS:
        raise RuntimeError('checkpoint.load_model builds models through the builders tasks.py '
                           'registers: import tasks first')
    model = transformer.build_model(config)
    own = model.state_dict()
    differ = sorted(set(own) ^ set(state)) + [
        k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if differ:
        raise UserError(f'{path}: its tensors do not fit the model its own config builds '
                        f'({describe_weights(state)}); e.g. {_summarise(differ)[:4]}')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.set_state_dict(state)
    model.eval()
    return model, config


def config_for(cfg_file, weights, update):
    """The config that builds the model `weights` hold, for -eval and the tools.

    A checkpoint of this project carries its config: without cfg_file that one is used; a
    cfg_file that says otherwise about what the model is (MODEL_KEYS) is an error, not a resize;
    so is, for a segmentor, a cfg_file or -opts that says otherwise about what its label values
    mean (LABEL_KEYS). Weights without a config (converted official ones) need cfg_file.
    update(config) applies the command line's flags and -opts (to either)."""
    config = cfgmod.get_config(cfg_file) if cfg_file else cfgmod.get_config()
    from_file = config.clone()
    update(config)
    weights = weights or config.MODEL.PRETRAINED
    meta = saved_meta(weights) if weights else None
    if meta is None:
        if not cfg_file:
            raise UserError(f'-cfg FILE is needed: {weights or "(no weights given)"} carries no '
                            f'config of this project (a converted official checkpoint?)')
        return config
    saved = cfgmod.from_text(meta['config'], f'the config saved in {weights}')
    carried = saved.clone()
    update(saved)
    segmentor = saved.TRAIN.MODE == 'segmentation'
    labels = LABEL_KEYS if segmentor else ()
    if cfg_file:  # (a classifier has no decoder: its MODEL.DECODER keys say nothing)
        if segmentor and config.TRAIN.MODE != 'segmentation':
            state = split_meta(load_file(weights, 'weights'))[0]
            raise UserError(segmentor_message(weights, state))
        keys = [k for k in MODEL_KEYS
                if k != 'MODEL.DECODER' or saved.MODEL.NAME.startswith('mae_')]
        differ = _differences(saved, config, lambda k: _under(k, keys)) + _differences(
            carried, config, lambda k: k in labels and not _under(k, keys)
            and cfgmod.get_key(from_file, k) != cfgmod.get_key(carried, k))
        if differ:
            raise UserError(f'{cfg_file} contradicts the config {weights} carries: '
                            f'{"; ".join(differ)} (leave -cfg out to use the checkpoint\'s own)')
    chosen = config if cfg_file else saved
    differ = _differences(carried, chosen, lambda k: k in labels)
    if differ:  # (set by -opts)
        raise UserError(f'-opts contradicts the config {weights} carries: {"; ".join(differ)} '
                        f'(a segmentor\'s label values mean what they meant in its training)')
    return chosen


def segmentor_message(path, state):
    """What to do with a segmentor's weights (path, its state) given where an encoder or a
    classifier is expected."""
    encoder = describe_weights(_strip(state, 'backbone.'))
    return (f'{path} is a segmentor (UperNet on {encoder}): evaluate it with '
            f'main_multi_gpu_segmentation.py -eval -pretrained {path}; classifiers and '
            f'pre-training start from an encoder (MAE pre-training or a fine-tuned classifier), '
            f'e.g. the one this segmentor was trained from')


def check_file(path, what):
    """A UserError naming `what` unless path is a file paddlefile may read: missing, or a
    PyTorch checkpoint (with the command converting it)."""
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    if is_torch_checkpoint(path):
        stem = os.path.splitext(path)[0]
        raise UserError(f'{path} is a PyTorch checkpoint; convert it first: python '
                        f'port_weights/convert_official.py --src {path} --dst {stem}.pdparams')


def load_file(path, what):
    """paddlefile.load(path) (paddle.load's result, and no code from the file runs), after
    check_file; an unreadable or refused file is a UserError naming it."""
    check_file(path, what)
    try:
        return paddlefile.load(path)
    except paddlefile.FormatError as e:
        raise UserError(f'cannot read {what} {e}') from None
    except Exception as e:  # what the file holds cannot be made into tensors
        raise UserError(f'cannot read {what} {path}: {type(e).__name__}: {e}') from None


def is_torch_checkpoint(path):
    """torch.save's zip format (torchfile.is_torch_checkpoint); paddle.save writes pickles."""
    return torchfile.is_torch_checkpoint(path)


def load_checkpoint_pair(prefix):
    """-> (model_state, opt_dict) for prefix.pdparams / prefix.pdopt, checking they belong
    together; raises UserError naming the file otherwise."""
    params, opt = prefix + '.pdparams', prefix + '.pdopt'
    if not os.path.isfile(params):
        raise UserError(f'checkpoint file not found: {params}')
    opt_state = load_file(opt, 'checkpoint file')
    if not isinstance(opt_state, dict) or 'state' not in opt_state:
        raise UserError(f'{opt} is not a checkpoint written by this project')
    fp = opt_state.get('model_fingerprint')
    if fp is not None and fp != _fingerprint(params):
        raise UserError(f'{params} and {opt} are from different saves (interrupted save?)')
    return split_meta(load_file(params, 'checkpoint file'))[0], opt_state


def resume_prefix(resume, output_dir, log=print):
    """MODEL.RESUME -> the checkpoint prefix to load, or None to start from scratch.

    resume: '' (no resume), 'auto' (the newest usable pair in output_dir, if any), or a prefix
    such as OUT/latest, also given as OUT/latest.pdparams or OUT/latest.pdopt."""
    if not resume:
        return None
    if resume == 'auto':
        prefix = find_resume_checkpoint(output_dir)
        if prefix is None:
            log(f'resume auto: no checkpoint in {output_dir}, starting from scratch')
        return prefix
    for ext in ('.pdparams', '.pdopt'):
        if resume.endswith(ext):
            return resume[:-len(ext)]
    return resume


RUN_FILES = ('config.yaml', 'log.txt', 'latest.pdparams', 'latest.pdopt', 'previous.pdparams',
             'previous.pdopt')
# keys that may change when a run is resumed: they do not change what is computed
RESUME_MAY_CHANGE = ('MODEL.RESUME', 'MODEL.PRETRAINED', 'OUTPUT', 'DATA.DATA_PATH',
                     'DATA.NUM_WORKERS', 'DATA.BATCH_SIZE_EVAL', 'REPORT_FREQ', 'SAVE_FREQ',
                     'SAVE_FREQ_ITERS', 'VALIDATE_FREQ')


def check_run_folder(config):
    """Before anything is written: OUTPUT must be a folder we may write, and a run already in it
    (a checkpoint, or an epoch in log.txt) is never overwritten: without MODEL.RESUME that is an
    error giving the two ways on; a config.yaml alone (a start that failed) is replaced.
    Returns, for a resume, the settings that differ from the run's saved config.yaml ('KEY old
    -> new', keys of RESUME_MAY_CHANGE left out) for the log: a resume may change them on
    purpose (a lower TRAIN.BASE_LR after a divergence), never silently."""
    out = config.OUTPUT
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f'-output {out} is a file, not a folder')
    parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f'-output {out}: cannot write in {parent} (permission denied)')
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))] + \
        sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
               if f.startswith('epoch_') and f.endswith('.pdparams'))
    # a start that failed before any progress (a data error in the first epoch) leaves only its
    # config.yaml: nothing to keep, so the folder is used again
    progress = [f for f in found if f != 'config.yaml' and
                (f != 'log.txt' or os.path.getsize(os.path.join(out, f)))]
    if not config.MODEL.RESUME:
        if progress:
            raise UserError(f'{out} already holds a run ({", ".join(found[:4])}): continue it '
                            f'with -resume auto, or start a new one with another -output')
        if found and is_main_process():
            print(f'note: {out} holds the config.yaml of a start that saved no checkpoint and '
                  f'logged no epoch: starting there again', flush=True)
        return []
    folder = out if config.MODEL.RESUME == 'auto' else os.path.dirname(config.MODEL.RESUME)
    saved = os.path.join(folder, 'config.yaml')
    return config_differences(saved, config) if os.path.isfile(saved) else []


def config_differences(saved_path, config):
    """'KEY saved -> now' for each config key (but RESUME_MAY_CHANGE) that differs."""
    try:
        saved = cfgmod.get_config(saved_path)
    except cfgmod.ConfigError as e:
        raise UserError(f'cannot read the saved config of the run: {e}') from None
    return _differences(saved, config, lambda k: not _under(k, RESUME_MAY_CHANGE))


def _under(key, names):
    """key is one of names, or inside one of them (a section such as MODEL.ENCODER)."""
    return any(key == n or key.startswith(n + '.') for n in names)


def _differences(a, b, wanted):
    """'KEY a -> b' for every leaf key for which wanted(KEY) and whose values differ."""
    def flat(node, prefix=''):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(flat(v, f'{prefix}{k}.'))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a), flat(b)
    return [f'{k} {fa.get(k)!r} -> {fb.get(k)!r}' for k in sorted(set(fa) | set(fb))
            if k != 'BASE' and wanted(k) and fa.get(k) != fb.get(k)]


def find_resume_checkpoint(output_dir):
    """For -resume auto: the newest pair in output_dir that loads and belongs together
    (latest.*, else previous.*), or None when the folder has none."""
    errors = []
    for name in ('latest', 'previous'):
        prefix = os.path.join(output_dir, name)
        if not os.path.exists(prefix + '.pdopt'):
            continue
        try:
            load_checkpoint_pair(prefix)
            return prefix
        except UserError as e:
            errors.append(str(e))
    if errors:
        print('resume: skipped unusable checkpoints: ' + '; '.join(errors), flush=True)
    return None


def resume(prefix, model, optimizer, scaler=None):
    """Load a checkpoint pair into model / optimizer / scaler; returns the saved state dict.
    A pair of another model or optimizer is a UserError saying what it is."""
    model_state, opt_state = load_checkpoint_pair(prefix)
    own = model.state_dict()
    wrong = [k for k in own if k not in model_state
             or tuple(model_state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(f'-resume {prefix}: the checkpoint does not fit the model of this config: '
                        f'it is {describe_weights(model_state)}, the config builds '
                        f'{describe_weights(own)} ({len(wrong)} tensors differ, e.g. {wrong[0]})')
    model.set_state_dict(model_state)
    try:
        optimizer.set_state_dict(opt_state['optimizer'])
    except Exception as e:  # (Paddle raises assertion and key errors of its own here)
        raise UserError(f'-resume {prefix}: cannot restore the optimizer state of '
                        f'{prefix}.pdopt into {type(optimizer).__name__} '
                        f'(TRAIN.OPTIMIZER changed?): {type(e).__name__} {e}') from None
    if scaler is not None and 'scaler' in opt_state:
        scaler.load_state_dict(opt_state['scaler'])
    return opt_state['state']


# ---------------------------------------------------------------------------------------------
# pre-trained weights
# ---------------------------------------------------------------------------------------------
def load_pretrained(model, path, log=print, reinit=('head.',), eval_only=False,
                    head_init_std=2e-5, prefix=''):
    """Load MODEL.PRETRAINED (a Paddle .pdparams: ours or converted official) into model.

    The weights must fit: a tensor of the model that the checkpoint lacks, or holds in another
    shape, is a UserError saying what the checkpoint is and what the config builds -- except
    names matching `reinit` (prefixes, or fnmatch patterns when they hold a '*'), the parts the
    task initialises afresh by design (a classifier's head and, with global pooling, fc_norm;
    pre-training's decoder; a segmentor's neck, heads and relative position tables), and except
    pos_embed and relative position tables, which are resized when only the patch grid
    differs (encoder.checkpoint_filter: fine-tuning or evaluating at another resolution).
    eval_only (-eval, export): nothing may be missing or differ. Tensors of the checkpoint the
    model does not use (the decoder, in fine-tuning) are listed, not an error -- but encoder
    weights the model has no place for (a variant the config lacks) are.
    prefix: where the encoder lives in the model ('backbone.' in the segmentor); a checkpoint
    of a bare encoder (pre-training, fine-tuning, converted official) is loaded under it, one
    of the whole model as it is. A head initialised afresh gets trunc-normal head_init_std
    (2e-5 fine-tune, 0.01 probe, as the official scripts). Returns (missing, unused).
    """
    state = split_meta(load_file(path, 'pretrained weights'))[0]
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        state = state['model']
    mark = prefix + PATCH_EMBED  # every encoder has it (pos_embed not: BEiT has none)
    added = isinstance(state, dict) and prefix and mark not in state and PATCH_EMBED in state
    if added:
        state = {prefix + k: v for k, v in state.items()}
        log(f'pretrained: {path} holds a bare encoder: loading it under {prefix}')
    if isinstance(state, dict) and not prefix and SEGMENTOR_MARK in state:
        raise UserError(segmentor_message(path, state))
    if not isinstance(state, dict) or mark not in state:
        raise UserError(f'{path} holds no ViT/MAE weights (no {PATCH_EMBED}); official .pth '
                        f'files must be converted first: port_weights/convert_official.py')
    own = model.state_dict()
    reinit = () if eval_only else tuple(reinit)
    encoder = model
    for part in prefix.strip('.').split('.') if prefix else ():
        encoder = getattr(encoder, part)
    # position embeddings / tables of another patch grid resized (also to evaluate at another
    # resolution, as mmsegmentation loads BEiT's 640 checkpoints at 512)
    state = encoder.checkpoint_filter(state, prefix, log)
    usable, unused, misfit = {}, [], []
    for k, v in state.items():
        if k in own and tuple(v.shape) == tuple(own[k].shape):
            usable[k] = v
        elif k in own:
            misfit.append(k)
        else:
            unused.append(k)
    missing = [k for k in own if k not in usable]
    # encoder weights the model has no place for: a variant of the family the config lacks
    # (LayerScale gammas, q / v biases, position tables); dropping them changes the model
    dropped = [k for k in unused if k.startswith(tuple(prefix + n for n in ENCODER_PARTS))]
    if dropped:
        raise UserError(f'{path} holds encoder weights the model of this config has no place '
                        f'for: {_summarise(dropped)}; the checkpoint is a variant the config '
                        f'does not build (MODEL.LAYER_SCALE, MODEL.QKV_BIAS, '
                        f'MODEL.ABS_POS_EMBED, MODEL.REL_POS_BIAS: the config saved with '
                        f'converted weights says which)')
    if added:  # the checkpoint's own names for what it has and the model does not use
        unused = [k[len(prefix):] for k in unused]
    wrong = [k for k in misfit if not _fresh(k, reinit)]
    absent = [k for k in missing if k not in misfit and not _fresh(k, reinit)]
    if wrong or absent:
        what = describe_weights(_strip(state, prefix))
        builds = describe_weights(_strip(own, prefix))
        details = '; '.join(
            [f'{k} is {list(state[k].shape)} there, {list(own[k].shape)} here' for k in wrong[:3]]
            + ([f'missing there: {_summarise(absent)}'] if absent else []))
        hint = (' (-eval and export need the weights of exactly this model)' if eval_only else '')
        raise UserError(f'{path} does not fit the model of this config{hint}: the checkpoint is '
                        f'{what}, the config builds {builds}; {details}')
    with warnings.catch_warnings():  # Paddle warns per key it skips; the report below says it
        warnings.simplefilter('ignore')
        model.set_state_dict(usable)
    if encoder is model and model.init_missing_head(missing, head_init_std):
        log(f'pretrained: head initialised fresh (trunc-normal std {head_init_std})')
    log(f'pretrained: loaded {len(usable)} tensors from {path}')
    if missing:
        log(f'pretrained: missing (kept as initialised): {_summarise(missing)}')
    if misfit:
        log(f'pretrained: not loaded, shape differs (initialised afresh by design): {misfit}')
    if unused:
        log(f'pretrained: unused: {_summarise(unused)}')
    return missing, unused + misfit


def _fresh(name, reinit):
    """Whether a parameter name is one the task initialises afresh (see load_pretrained)."""
    return any(fnmatch.fnmatchcase(name, r) if '*' in r else name.startswith(r) for r in reinit)


def _strip(state, prefix):
    """The encoder's part of a state dict, its names without prefix (for describe_weights)."""
    if not prefix:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def describe_weights(state):
    """A ViT state dict in words: 'ViT-B/16: embed 768, 12 blocks, 14x14 patches' (the label
    when the patch size, width and depth are a named size's)."""
    pe, proj = state.get('pos_embed'), state.get(PATCH_EMBED)
    if proj is None:
        return f'not a ViT (no {PATCH_EMBED})'
    embed, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max([int(k.split('.')[1]) for k in state if k.startswith('blocks.')],
                    default=-1)
    label = next((lbl for name, (lbl, shape) in transformer.NAMED_SHAPES.items()
                  if name.startswith('vit_') and (shape['patch_size'], shape['embed_dim'],
                                                  shape['depth']) == (patch, embed, depth)),
                 f'ViT/{patch}')
    if pe is None:
        return f'{label}: embed {embed}, {depth} blocks, no absolute position embedding'
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    return f'{label}: embed {embed}, {depth} blocks, {grid}x{grid} patches of {patch}'


def _summarise(keys):
    """Collapse numbered keys (decoder_blocks.N.*, backbone.blocks.N.*) so the report stays
    readable: 'backbone.blocks.*.attn.relative_position_bias_table (12)'."""
    groups = {}
    for k in keys:
        parts = k.split('.')
        numbered = [i for i, p in enumerate(parts) if p.isdigit()]
        if numbered and numbered[0] + 1 < len(parts):
            i = numbered[0]  # weights of numbered layers go together; a named tensor stays named
            plain = parts[-1] in ('weight', 'bias', '_mean', '_variance')
            g = '.'.join(parts[:i]) + ('.*' if plain else '.*.' + '.'.join(parts[i + 1:]))
        else:
            g = k
        groups[g] = groups.get(g, 0) + 1
    return [f'{g} ({n})' if n > 1 else g for g, n in groups.items()]
