"""Shared by the entry points and tools: user errors, distributed set-up, seeding, logging,
and the entry points' flags -> config.

Importing this module only defines things; process set-up (threads, MKL path, malloc, Paddle
flags) is runtime.setup_process(), which entry points call first.
"""
import contextlib
import json
import os
import random
import sys
import time
import zlib

import numpy as np
import paddle
import paddle.distributed as dist


class UserError(Exception):
    """A mistake the user can fix (path, file, config value): printed without a traceback."""


class Stopped(Exception):
    """A run stopped on a signal after saving (engine.fit); exit code 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def run_main(main):
    """Run an entry point: a user's mistake prints one 'error: ...' line and exits 2; a run
    stopped by SIGINT / SIGTERM prints how to go on and exits 130 / 143, without a traceback."""
    from config import ConfigError
    try:
        main()
    except (UserError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        print(f'stopped: {e}', file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (set-up, -eval)
        print('stopped: interrupted (Ctrl-C); what was saved before stays (-resume auto goes on '
              'from the last checkpoint of a training run)', file=sys.stderr, flush=True)
        sys.exit(130)


def die_with_parent():
    """Linux: this process gets SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so a
    loader worker does not outlive a training process killed with -9. Elsewhere: nothing."""
    if not sys.platform.startswith('linux'):
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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


def barrier():
    """Wait for every process (a no-op for one)."""
    if dist.get_world_size() > 1:
        dist.barrier()


def is_main_process():
    return dist.get_rank() == 0


def all_reduce_mean(value):
    """Mean of a Python float over all processes."""
    if dist.get_world_size() == 1:
        return float(value)
    t = paddle.to_tensor([float(value)], dtype='float64')
    dist.all_reduce(t)
    return float(t.numpy()[0]) / dist.get_world_size()


def all_reduce_max(value):
    """Maximum of a Python number over all processes."""
    if dist.get_world_size() == 1:
        return value
    t = paddle.to_tensor([float(value)], dtype='float64')
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.numpy()[0])


def all_reduce_sum(array):
    """Element-wise sum of a float64 numpy array over all processes."""
    array = np.asarray(array, dtype='float64')
    if dist.get_world_size() == 1:
        return array
    t = paddle.to_tensor(array)
    dist.all_reduce(t)
    return t.numpy()


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------
def amp_on(config):
    """TRAIN.AMP takes effect: set, and on a GPU build (auto_cast does nothing on CPU)."""
    return bool(config.TRAIN.AMP and paddle.is_compiled_with_cuda())


def amp_context(config):
    """paddle.amp.auto_cast for TRAIN.AMP / AMP_LEVEL on GPU; a no-op in fp32 and on CPU."""
    if not amp_on(config):
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype=config.TRAIN.AMP, level=config.TRAIN.AMP_LEVEL)


# ---------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------
def seed_sequence(*keys):
    """NumPy SeedSequence mixing a tuple of keys (ints of any size, or strings), e.g.
    (SEED, epoch, sample id, 'mask'): every key changes every number drawn from it."""
    entropy = []
    for k in keys:
        if isinstance(k, str):
            entropy.append(zlib.crc32(k.encode('utf-8')))
        else:
            k = int(k)
            entropy += [k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF] if k >> 32 else [k & 0xFFFFFFFF]
    return np.random.SeedSequence(entropy)


def rng(*keys):
    """An independent NumPy Generator for the keys (see seed_sequence)."""
    return np.random.default_rng(seed_sequence(*keys))


def seed_everything(*keys, include_paddle=True):
    """Seed Python's `random`, NumPy's global RNG and (include_paddle) Paddle's from a tuple such
    as (SEED, epoch, iteration, rank). The one seeding helper of the project:

    - the engine re-seeds every iteration, so a run resumed from any checkpoint draws exactly the
      random numbers (drop path, mixup) an uninterrupted run would, with no RNG state to save;
    - the datasets re-seed Python / NumPy (not Paddle) per sample from (SEED, epoch, index):
      augmentations repeat whatever the worker or process that loads a sample.
    Negative ints are taken modulo 2**64.
    """
    state = seed_sequence(*keys).generate_state(4)
    np.random.seed(state)
    random.seed(int(state[0]) << 32 | int(state[1]))
    seed = int(state[2])
    if include_paddle:
        paddle.seed(seed)
    return seed


# ---------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------
class Logger:
    """Prints on the main process, appends one JSON object per epoch to log.txt, and writes
    scalars to VisualDL (vdl/) when visualdl is installed: per-iteration values under
    'iter/<name>' with the global iteration as step, per-epoch ones under 'epoch/<name>' with
    the epoch, so each tag's steps only grow. stream: where info() prints (-eval: stderr, its
    stdout is the result alone)."""

    def __init__(self, output_dir, stream=None):
        self.main = is_main_process()
        self.output_dir = output_dir
        self.stream = stream
        self.vdl = None

    def open(self, config):
        """Start writing the run folder (main process): the folder, config.yaml, VisualDL.
        Called once everything a user can get wrong has been checked and built."""
        if not (self.main and self.output_dir):
            return
        import config as cfgmod
        os.makedirs(self.output_dir, exist_ok=True)
        cfgmod.dump_config(config, os.path.join(self.output_dir, 'config.yaml'))
        try:
            from visualdl import LogWriter
            self.vdl = LogWriter(logdir=os.path.join(self.output_dir, 'vdl'))
        except ImportError:
            pass

    def info(self, msg):
        if self.main:
            print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=self.stream or sys.stdout,
                  flush=True)

    def scalars(self, kind, step, **values):
        """VisualDL scalars of one kind ('iter' or 'epoch') at step."""
        if self.vdl is not None:
            for k, v in values.items():
                self.vdl.add_scalar(tag=f'{kind}/{k}', step=step, value=float(v))

    def epoch(self, stats):
        """Append one JSON line to log.txt (main process)."""
        if self.main and self.output_dir:
            with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(stats) + '\n')

    def truncate(self, first_epoch):
        """After a resume: drop the log.txt lines of epochs >= first_epoch (trained again)."""
        path = os.path.join(self.output_dir or '', 'log.txt')
        if not self.main or not self.output_dir or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get('epoch', -1) < first_epoch]
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(lines)
        os.replace(tmp, path)

    def close(self):
        if self.vdl is not None:
            self.vdl.close()


# ---------------------------------------------------------------------------------------------
# entry-point set-up shared by the three main_multi_gpu_*.py scripts
# ---------------------------------------------------------------------------------------------
def parse_args(stage, argv=None, can_eval=True):
    """PaddleViT-style flags (DESIGN.md 3.3); -opts KEY VALUE ... overrides any config key.
    can_eval: the stage's task evaluates, so -eval is offered."""
    import argparse
    doc = getattr(sys.modules.get('__main__'), '__doc__', None)  # the entry point's own text
    p = argparse.ArgumentParser(description=doc or f'MAE {stage} (PaddlePaddle)',
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', help='config YAML, e.g. configs/tiny_' + stage + '.yaml (with -eval '
                   'of a checkpoint of this project: optional, the checkpoint carries its own)')
    p.add_argument('-data_path', help='folder with train_list.txt / val_list.txt')
    p.add_argument('-output', help='output folder (checkpoints, log.txt, config.yaml)')
    p.add_argument('-batch_size', type=int, help='batch size per process')
    p.add_argument('-pretrained', help='.pdparams to start from')
    p.add_argument('-resume', help="checkpoint prefix (folder/latest) or 'auto'")
    if can_eval:
        p.add_argument('-eval', action='store_true', help='only evaluate -pretrained')
    p.add_argument('-amp', nargs='?', const='float16', choices=['float16', 'bfloat16'],
                   help='mixed precision on GPU (default float16)')
    p.add_argument('-opts', nargs='+', action='extend', default=[],
                   help='KEY VALUE pairs; may be given more than once, later ones win')
    return p.parse_args(argv)


def setup(stage, argv=None, can_eval=True):
    """Flags -> checked config (paths, values, the run folder), distributed set-up, seeds;
    returns (config, args, logger). Nothing is written yet: logger.open(config) starts the run
    folder once the model and the data are built too."""
    import checkpoint
    import config as cfgmod
    args = parse_args(stage, argv, can_eval)
    eval_only = getattr(args, 'eval', False)
    if eval_only:  # the checkpoint's own config, or a -cfg that agrees with it
        config = checkpoint.config_for(args.cfg, args.pretrained,
                                       lambda c: cfgmod.update_config(c, args))
    elif not args.cfg:
        raise UserError('-cfg FILE is needed, e.g. -cfg configs/tiny_' + stage + '.yaml')
    else:
        config = cfgmod.get_config(args.cfg)
        cfgmod.update_config(config, args)
    cfgmod.check_values(config)
    import transformer
    transformer.model_shape(config)  # an unknown MODEL.NAME, a shape that contradicts it, ...
    if not config.OUTPUT:  # a folder per config, so that stages and sizes do not collide
        name = os.path.splitext(os.path.basename(args.cfg))[0] if args.cfg else stage
        config.OUTPUT = os.path.join('output', name)
    if config.TRAIN.MODE != stage:
        raise UserError(f'{args.cfg or args.pretrained}: TRAIN.MODE is {config.TRAIN.MODE!r} '
                        f'but this script is '
                        f'for {stage!r}; use main_multi_gpu_{config.TRAIN.MODE}.py')
    shards = config.DATA.TRAIN_SHARDS or config.DATA.VAL_SHARDS
    if not config.DATA.DATA_PATH and not shards:  # (shards: datasets.build_dataset checks)
        raise UserError('no data: give -data_path DIR (with train_list.txt / val_list.txt or '
                        'class sub-folders)')
    if config.DATA.DATA_PATH and not os.path.isdir(config.DATA.DATA_PATH):
        raise UserError(f'data folder not found: {config.DATA.DATA_PATH}')
    if config.MODEL.PRETRAINED:
        checkpoint.check_file(config.MODEL.PRETRAINED, 'pretrained weights')
    if config.MODEL.RESUME not in ('', 'auto'):
        checkpoint.check_file(checkpoint.resume_prefix(config.MODEL.RESUME, '') + '.pdparams',
                              'checkpoint file')
    if config.TRAIN.AMP and not paddle.is_compiled_with_cuda():
        print(f'note: TRAIN.AMP {config.TRAIN.AMP!r} has no effect on CPU; training in float32',
              file=sys.stderr, flush=True)
    config.freeze()
    init_distributed()
    changed = []
    if not eval_only:
        changed = checkpoint.check_run_folder(config)
        barrier()  # every process has looked at the folder before the main one writes in it
    seed_everything(config.SEED, 'init')  # the same on every process: identical initial weights
    logger = Logger(None, sys.stderr) if eval_only else Logger(config.OUTPUT)
    if changed:
        logger.info(f'resume: settings changed since the run was started: {"; ".join(changed)}')
    return config, args, logger
