"""Process set-up for the entry points and tools: one explicit call, made first --
`runtime.setup_process()`, before anything that imports Paddle.

Importing this module (or any other module of the project) only defines things; nothing here
runs until setup_process() is called. It does four things, in this order, because each must
happen before the next:

1. CPU threads and MKL's code path, in os.environ, before Paddle's math libraries load;
2. (scripts only) a restart with glibc's malloc thresholds raised, when they are not already in
   the environment: glibc reads them only at start-up. run_scripts/*.sh and quickstart.sh
   export them, so the restart is a fallback for direct `python main_*.py` calls;
3. Paddle imported without its notices about what step 1 set on purpose;
4. Paddle's tensor views off on CPU-only builds.
"""
import os
import sys

MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '4294967296', 'MALLOC_TRIM_THRESHOLD_': '4294967296'}
_done = False


def setup_process(restart=True):
    """Set up this process for training or inference on CPU or GPU (idempotent).

    restart: allow step 2 (the process is re-executed with the same argv). Only a script run
    as `python FILE ...` restarts; `python -c`, `python -`, notebooks and test runners never do.
    """
    global _done
    if _done:
        return
    _configure_cpu_environment()
    if restart:
        _restart_with_malloc_settings()
    _import_paddle_quietly()
    _configure_paddle_cpu()
    _done = True


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


def _restart_with_malloc_settings():
    """glibc hands every large tensor a fresh mmap and page-faults it in; with the thresholds
    raised it reuses freed heap memory instead (element-wise ops 2-6x faster on CPU, DESIGN.md
    section 6). Restarts only a script given by its file (argv[0] an existing .py file)."""
    script = sys.argv[0] if sys.argv else ''
    if not (sys.platform.startswith('linux') and script.endswith('.py')
            and os.path.isfile(script)):
        return
    if os.environ.get('MAE_NO_REEXEC') or all(k in os.environ for k in MALLOC_ENV):
        return
    env = dict(os.environ, MAE_NO_REEXEC='1')
    for k, v in MALLOC_ENV.items():
        env.setdefault(k, v)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _import_paddle_quietly():
    """Import Paddle without its import-time notices about what we set on purpose: the thread
    count chosen above (a print to stderr) and the missing ccache (for C++ extensions)."""
    import contextlib
    import io
    import warnings

    # NumPy before Paddle: with Paddle 2.6, importing Paddle first leaves PIL unable to decode
    # PNGs in this process ("OSError: codec configuration error"; seen with Pillow 13).
    import numpy  # noqa: F401
    warnings.filterwarnings('ignore', message='No ccache found')
    # BatchNorm layers (the segmentor's, the linear probe's) warn at every training forward
    # that they track running statistics, which is what they are meant to do
    warnings.filterwarnings('ignore', message='When training, we now always track global mean')
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        import paddle  # noqa: F401
    for line in buf.getvalue().splitlines():
        if not line.startswith(('WARNING: OMP_NUM_THREADS set to', 'PLEASE USE OMP_NUM_THREADS')):
            print(line, file=sys.stderr)


def _configure_paddle_cpu():
    """CPU-only Paddle: tensor views off (FLAGS_use_stride_kernel). With views on, a transpose or
    slice is strided and the next op copies it with a generic strided kernel ~15x slower than
    Paddle's transpose kernel (a [8, 197, 16, 128] transpose here: 31 ms vs 2 ms), which cost a
    MAE ViT-B training step ~1 s (benchmarks/README.md). Nothing here relies on a view aliasing
    its source; values are the same either way."""
    import paddle
    if not paddle.is_compiled_with_cuda():
        paddle.set_flags({'FLAGS_use_stride_kernel': False})
