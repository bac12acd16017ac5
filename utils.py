"""Shared by every layer: user errors and run_main, distributed helpers, AMP, seeding, logging.

Importing this module only defines things; process set-up (threads, MKL path, malloc, Paddle
flags) is runtime.setup_process(), which entry points call first.
"""
import contextlib
import ctypes
import errno
import json
import os
import random
import signal
import sys
import time
import zlib

import numpy as np
import paddle
import paddle.distributed as dist

import config as cfgmod
from config import ConfigError


class UserError(Exception):
    """A mistake the user can fix (path, file, config value): printed without a traceback."""


class Stopped(Exception):
    """A run stopped on a signal after saving (engine.fit); exit code 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class Terminated(BaseException):
    """SIGTERM outside the training loop (set-up, -eval), raised where the process is (a
    BaseException, like KeyboardInterrupt, so no `except Exception` takes it for an error)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# OSError numbers of a write that found no room: disk full, quota, file size limit
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def no_space(exc):
    """Whether exc is an OSError of a write that found no room (NO_SPACE)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def _terminate(signum, frame):
    raise Terminated(signum)


def run_main(main):
    """Run an entry point: a user's mistake prints one 'error: ...' line and exits 2, so does a
    write that finds the disk full; a run stopped by SIGINT / SIGTERM prints how to go on and
    exits 130 / 143, without a traceback. SIGTERM outside the training loop (whose handler
    saves first) stops the process at once, instead of Paddle's handler and its stack dump."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except (UserError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        print(f'stopped: {e}', file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except Terminated as e:
        print(f'stopped: {e} (terminated); what was saved before stays (-resume auto goes on '
              f'from the last checkpoint of a training run)', file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (set-up, -eval)
        print('stopped: interrupted (Ctrl-C); what was saved before stays (-resume auto goes on '
              'from the last checkpoint of a training run)', file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if not no_space(e):
            raise
        where = f' {e.filename}' if e.filename else ''
        print(f'error: cannot write{where}: {e.strerror} (disk full, quota or file size limit); '
              f'free some space, then go on with the same command and -resume auto',
              file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if previous is not None:  # (None: a handler not installed from Python)
            signal.signal(signal.SIGTERM, previous)


def die_with_parent():
    """Linux: this process gets SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so a
    loader worker does not outlive a training process killed with -9. Elsewhere: nothing."""
    if not sys.platform.startswith('linux'):
        return
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
class MetricLogger:
    """Named values averaged over a report window and over the epoch (the official
    util/misc.py MetricLogger's job, kept small): update() per iteration, window() at each
    report (then a new window starts), epoch() at the end; both means are over all processes.
    """

    def __init__(self):
        self.window_sums, self.epoch_sums = {}, {}
        self.window_count = self.epoch_count = 0
        self.window_start = time.time()

    def update(self, **values):
        for k, v in values.items():
            self.window_sums[k] = self.window_sums.get(k, 0.0) + float(v)
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + float(v)
        self.window_count += 1
        self.epoch_count += 1

    def window(self):
        """-> ({name: mean over the window and all processes}, iterations, seconds); resets."""
        means = {k: all_reduce_mean(v / max(self.window_count, 1))
                 for k, v in self.window_sums.items()}
        count, seconds = self.window_count, time.time() - self.window_start
        self.window_sums, self.window_count, self.window_start = {}, 0, time.time()
        return means, count, seconds

    def epoch(self):
        """{name: mean over the epoch and all processes}."""
        return {k: all_reduce_mean(v / max(self.epoch_count, 1))
                for k, v in self.epoch_sums.items()}


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
        """An epoch's record: one JSON line appended to log.txt (main process), its numbers
        to VisualDL under 'epoch/' (a per-class table, segmentation's, stays in log.txt)."""
        if self.main and self.output_dir:
            with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
        self.scalars('epoch', stats['epoch'], **{k: v for k, v in stats.items()
                                                 if k != 'epoch' and isinstance(v, (int, float))})

    def truncate(self, first_epoch):
        """After a resume: drop the log.txt lines of epochs >= first_epoch (trained again)."""
        path = os.path.join(self.output_dir or '', 'log.txt')
        if not self.main or not self.output_dir or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get('epoch', -1) < first_epoch]
        tmp = path + '.tmp'
        try:
            with open(tmp, 'w') as f:
                f.writelines(lines)
            os.replace(tmp, path)
        except BaseException:  # (a full disk: nothing half-written is left)
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def close(self):
        if self.vdl is not None:
            self.vdl.close()
