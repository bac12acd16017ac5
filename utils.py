"""Process set-up (CPU environment, distributed), seeding, logging and checkpoints.

Import this module BEFORE anything that imports Paddle: the CPU environment (thread count, MKL
code path) must be in os.environ when Paddle's math libraries load.
"""
import os
import sys


def _configure_cpu_environment():
    """Threads = cores available to this process / processes on this node, unless the user set
    OMP_NUM_THREADS. Paddle sets OMP_NUM_THREADS=1 when importing itself (so does its launcher,
    in every child), which is why under paddle.distributed.launch a '1' counts as unset.
    MKL_DEBUG_CPU_TYPE=5 makes the MKL bundled with Paddle take its AVX2 path on AMD CPUs
    (DESIGN.md section 6: sgemm 36 -> 178 GFLOP/s here)."""
    os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
    launched = 'PADDLE_LOCAL_SIZE' in os.environ
    user = os.environ.get('OMP_NUM_THREADS')
    if user and not (launched and user == '1'):
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = max(int(os.environ.get('PADDLE_LOCAL_SIZE', '1')), 1)
    os.environ['OMP_NUM_THREADS'] = str(max(cores // local, 1))


_ROOT = os.path.dirname(os.path.abspath(__file__))
_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '4294967296', 'MALLOC_TRIM_THRESHOLD_': '4294967296'}


def _reexec_with_malloc_settings():
    """glibc hands every large tensor a fresh mmap and page-faults it in; with the thresholds
    raised it reuses freed heap memory instead (element-wise ops 2-6x faster on CPU, DESIGN.md
    section 6). glibc reads these variables only at start-up, so this project's own scripts
    (not Python sessions or test runners that import it) restart themselves once with them."""
    main_file = getattr(sys.modules.get('__main__'), '__file__', None) or ''
    ours = os.path.dirname(os.path.abspath(main_file)) in (_ROOT, os.path.join(_ROOT, 'tools'))
    if not ours or not sys.platform.startswith('linux') or os.environ.get('MAE_NO_REEXEC'):
        return
    if all(k in os.environ for k in _MALLOC_ENV):
        return
    env = dict(os.environ, MAE_NO_REEXEC='1')
    for k, v in _MALLOC_ENV.items():
        env.setdefault(k, v)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


_configure_cpu_environment()
_reexec_with_malloc_settings()

import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402


def _import_paddle_quietly():
    """Import Paddle without its import-time notices about what we set on purpose: the thread
    count chosen above (a print to stderr) and the missing ccache (for C++ extensions)."""
    import contextlib
    import io
    warnings.filterwarnings('ignore', message='No ccache found')
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        import paddle  # noqa: F401
    for line in buf.getvalue().splitlines():
        if not line.startswith(('WARNING: OMP_NUM_THREADS set to', 'PLEASE USE OMP_NUM_THREADS')):
            print(line, file=sys.stderr)


_import_paddle_quietly()
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402


def _configure_paddle_cpu():
    """CPU-only Paddle: tensor views off (FLAGS_use_stride_kernel). With views on, a transpose or
    slice is strided and the next op copies it with a generic strided kernel ~15x slower than
    Paddle's transpose kernel (a [8, 197, 16, 128] transpose here: 31 ms vs 2 ms), which cost a
    MAE ViT-B training step ~1 s (benchmarks/README.md). Nothing here relies on a view aliasing
    its source; values are the same either way."""
    if not paddle.is_compiled_with_cuda():
        paddle.set_flags({'FLAGS_use_stride_kernel': False})


_configure_paddle_cpu()


class UserError(Exception):
    """A mistake the user can fix (path, file, config value): printed without a traceback."""


def run_main(main):
    """Run an entry point: a user's mistake prints one 'error: ...' line and exits 2."""
    from config import ConfigError
    try:
        main()
    except (UserError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """One process, or many under paddle.distributed.launch (NCCL on GPU, gloo on CPU).
    Returns (rank, world_size)."""
    if not paddle.is_compiled_with_cuda():
        paddle.set_device('cpu')
    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    return dist.get_rank(), world


def is_main_process():
    return dist.get_rank() == 0


def all_reduce_mean(value):
    """Mean of a Python float over all processes."""
    if dist.get_world_size() == 1:
        return float(value)
    t = paddle.to_tensor([float(value)], dtype='float64')
    dist.all_reduce(t)
    return float(t.numpy()[0]) / dist.get_world_size()


def all_reduce_sum(array):
    """Element-wise sum of a float64 numpy array over all processes."""
    array = np.asarray(array, dtype='float64')
    if dist.get_world_size() == 1:
        return array
    t = paddle.to_tensor(array)
    dist.all_reduce(t)
    return t.numpy()


# ---------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------
def seed_everything(*parts):
    """Seed Python, NumPy and Paddle from a tuple such as (SEED, epoch, iteration, rank).

    The engine re-seeds every iteration, so a run resumed from any checkpoint draws exactly the
    random numbers (drop path, mixup) an uninterrupted run would, with no RNG state to save.
    """
    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], 'little')
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
    return seed


# ---------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------
class Logger:
    """Prints on the main process, appends one JSON object per epoch to log.txt, and writes
    scalars to VisualDL (vdl/) when visualdl is installed."""

    def __init__(self, output_dir):
        self.main = is_main_process()
        self.output_dir = output_dir
        self.vdl = None
        if self.main and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            try:
                from visualdl import LogWriter
                self.vdl = LogWriter(logdir=os.path.join(output_dir, 'vdl'))
            except ImportError:
                pass

    def info(self, msg):
        if self.main:
            print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)

    def scalars(self, step, **values):
        if self.vdl is not None:
            for k, v in values.items():
                self.vdl.add_scalar(tag=k, step=step, value=float(v))

    def epoch(self, stats):
        """Append one JSON line to log.txt (main process)."""
        if self.main and self.output_dir:
            with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(stats) + '\n')

    def close(self):
        if self.vdl is not None:
            self.vdl.close()


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
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


def save_checkpoint(output_dir, model, optimizer, state, scaler=None, epoch_copy=None):
    """Write latest.pdparams (model) and latest.pdopt (optimizer + state + scaler).

    state: dict with at least 'epoch' (epochs finished) and 'iter' (iterations into the next
    epoch). Files are written under temporary names and renamed; the previous pair is kept as
    previous.* (hard links) so that a kill between the two renames leaves one good pair, which
    find_resume_checkpoint picks. epoch_copy=N also keeps epoch_{N}.pdparams.
    Only the main process writes.
    """
    if not is_main_process():
        return
    latest = os.path.join(output_dir, 'latest')
    params_tmp = _atomic_save(model.state_dict(), latest + '.pdparams.next')
    opt = {'optimizer': optimizer.state_dict(), 'state': dict(state),
           'model_fingerprint': _fingerprint(params_tmp)}
    if scaler is not None:
        opt['scaler'] = scaler.state_dict()
    opt_tmp = _atomic_save(opt, latest + '.pdopt.next')
    for ext in ('.pdparams', '.pdopt'):  # keep the current pair as previous.*
        if os.path.exists(latest + ext):
            link = os.path.join(output_dir, 'previous' + ext + '.tmp')
            if os.path.exists(link):
                os.remove(link)
            os.link(latest + ext, link)
            os.replace(link, os.path.join(output_dir, 'previous' + ext))
    os.replace(params_tmp, latest + '.pdparams')
    os.replace(opt_tmp, latest + '.pdopt')
    if epoch_copy is not None:
        dst = os.path.join(output_dir, f'epoch_{epoch_copy}.pdparams')
        tmp = dst + '.tmp'
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(latest + '.pdparams', tmp)
        os.replace(tmp, dst)


def load_file(path, what):
    """paddle.load(path); a missing or unreadable file is a UserError naming it as `what`."""
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    try:
        return paddle.load(path)
    except Exception as e:
        raise UserError(f'cannot read {what} {path}: {e}') from None


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
    return load_file(params, 'checkpoint file'), opt_state


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
    """Load a checkpoint pair into model / optimizer / scaler; returns the saved state dict."""
    model_state, opt_state = load_checkpoint_pair(prefix)
    model.set_state_dict(model_state)
    optimizer.set_state_dict(opt_state['optimizer'])
    if scaler is not None and 'scaler' in opt_state:
        scaler.load_state_dict(opt_state['scaler'])
    return opt_state['state']


# ---------------------------------------------------------------------------------------------
# pre-trained weights
# ---------------------------------------------------------------------------------------------
def load_pretrained(model, path, config, log=print, require_head=False):
    """Load MODEL.PRETRAINED (a Paddle .pdparams: ours or converted official) into model.

    Into a classifier: drops the decoder and anything the model does not have, interpolates
    pos_embed when the resolution differs, and re-initialises the head when the checkpoint has
    none that fits (std 2e-5 fine-tune, 0.01 linear probe, as the official scripts). Reports the
    keys that were missing or unused. Returns (missing, unused).
    """
    import transformer
    state = load_file(path, 'pretrained weights')
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        state = state['model']
    if not isinstance(state, dict) or 'pos_embed' not in state:
        raise UserError(f'{path} holds no ViT/MAE weights (no pos_embed); official .pth files '
                        f'must be converted first: port_weights/convert_official.py')
    own = model.state_dict()
    pe = state['pos_embed']
    if tuple(pe.shape) != tuple(own['pos_embed'].shape):
        new_grid = model.patch_embed.grid_size
        old_tokens = pe.shape[1] - 1
        log(f'pretrained: interpolating pos_embed from {int(round(old_tokens ** 0.5))}^2 to '
            f'{new_grid}^2 patches')
        state = dict(state)
        state['pos_embed'] = transformer.interpolate_pos_embed(
            np.asarray(pe.numpy() if hasattr(pe, 'numpy') else pe), new_grid)
    usable, unused, misfit = {}, [], []
    for k, v in state.items():
        if k in own and tuple(v.shape) == tuple(own[k].shape):
            usable[k] = v
        elif k in own:
            misfit.append(f'{k} {list(v.shape)} (model: {list(own[k].shape)})')
        else:
            unused.append(k)
    missing = [k for k in own if k not in usable]
    head_keys = [k for k in missing if k.startswith('head.') and not k.startswith('head.0.')]
    if require_head and head_keys:
        raise UserError(f'{path} has no classifier head that fits the model '
                        f'(MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}): '
                        f'{misfit or "no head.* weights"}')
    with warnings.catch_warnings():  # Paddle warns per key it skips; the report below says it
        warnings.simplefilter('ignore')
        model.set_state_dict(usable)
    if head_keys and hasattr(model, 'init_head'):
        std = 0.01 if config.TRAIN.MODE == 'linearprobe' else 2e-5
        model.init_head(std)
        log(f'pretrained: head initialised fresh (trunc-normal std {std})')
    log(f'pretrained: loaded {len(usable)} tensors from {path}')
    if missing:
        log(f'pretrained: missing (kept as initialised): {missing}')
    if misfit:
        log(f'pretrained: not loaded, shape differs: {misfit}')
    if unused:
        log(f'pretrained: unused: {_summarise(unused)}')
    return missing, unused + [m.split()[0] for m in misfit]


def _summarise(keys):
    """Collapse decoder_blocks.N.* style keys so the report stays readable."""
    groups = {}
    for k in keys:
        parts = k.split('.')
        g = f'{parts[0]}.*' if len(parts) > 2 and parts[1].isdigit() else k
        groups[g] = groups.get(g, 0) + 1
    return [f'{g} ({n})' if n > 1 else g for g, n in groups.items()]


# ---------------------------------------------------------------------------------------------
# entry-point set-up shared by the three main_multi_gpu_*.py scripts
# ---------------------------------------------------------------------------------------------
def parse_args(stage, argv=None):
    """PaddleViT-style flags (DESIGN.md 3.3); -opts KEY VALUE ... overrides any config key."""
    import argparse
    p = argparse.ArgumentParser(description=f'MAE {stage} (PaddlePaddle)')
    p.add_argument('-cfg', required=True, help='config YAML, e.g. configs/tiny_' + stage + '.yaml')
    p.add_argument('-data_path', help='folder with train_list.txt / val_list.txt')
    p.add_argument('-output', help='output folder (checkpoints, log.txt, config.yaml)')
    p.add_argument('-batch_size', type=int, help='batch size per process')
    p.add_argument('-pretrained', help='.pdparams to start from')
    p.add_argument('-resume', help="checkpoint prefix (folder/latest) or 'auto'")
    if stage != 'pretrain':
        p.add_argument('-eval', action='store_true', help='only evaluate -pretrained')
    p.add_argument('-amp', nargs='?', const='float16', choices=['float16', 'bfloat16'],
                   help='mixed precision on GPU (default float16)')
    p.add_argument('-opts', nargs='+', action='extend', default=[],
                   help='KEY VALUE pairs; may be given more than once, later ones win')
    return p.parse_args(argv)


def setup(stage, argv=None):
    """Flags -> checked config; output folder with the resolved config.yaml; distributed
    set-up; returns (config, args, logger)."""
    import config as cfgmod
    args = parse_args(stage, argv)
    config = cfgmod.get_config(args.cfg)
    cfgmod.update_config(config, args)
    if config.TRAIN.MODE != stage:
        raise UserError(f'{args.cfg}: TRAIN.MODE is {config.TRAIN.MODE!r} but this script is '
                        f'for {stage!r}; use main_multi_gpu_{config.TRAIN.MODE}.py')
    if not config.DATA.DATA_PATH:
        raise UserError('no data: give -data_path DIR (with train_list.txt / val_list.txt or '
                        'class sub-folders)')
    if not os.path.isdir(config.DATA.DATA_PATH):
        raise UserError(f'data folder not found: {config.DATA.DATA_PATH}')
    if config.TRAIN.AMP and not paddle.is_compiled_with_cuda():
        print(f'note: TRAIN.AMP {config.TRAIN.AMP!r} has no effect on CPU; training in float32',
              flush=True)
    config.freeze()
    init_distributed()
    seed_everything(config.SEED, 'init')  # the same on every process: identical initial weights
    eval_only = getattr(args, 'eval', False)
    logger = Logger(None if eval_only else config.OUTPUT)
    if is_main_process() and not eval_only:
        cfgmod.dump_config(config, os.path.join(config.OUTPUT, 'config.yaml'))
    return config, args, logger
