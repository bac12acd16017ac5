"""Importing the project only defines things; process set-up is runtime.setup_process(), called
by entry points and tools first (and a restart for the malloc settings only for a script file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test runs Python in a subprocess

MODULES = ['checkpoint', 'classnames', 'cli', 'config', 'cpu_kernels', 'datasets', 'engine',
           'matfile', 'mixup', 'optim', 'paddlefile', 'parquet_data', 'randaugment', 'runtime',
           'safepickle', 'seg_data', 'seg_inference', 'seg_transforms', 'segmentation', 'shards',
           'sources', 'tasks', 'torchfile', 'transformer', 'transforms', 'utils']
TOOLS = ['benchmark', 'benchmark_reference', 'export_model', 'inspect_recipe',
         'make_demo_dataset', 'make_shards', 'memory_estimate', 'predict', 'prepare_imagenet',
         'visualize']
ENV_KEYS = ['OMP_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'MALLOC_MMAP_THRESHOLD_',
            'MALLOC_TRIM_THRESHOLD_', 'MAE_NO_REEXEC']

# Paddle itself first (it sets OMP_NUM_THREADS when imported), then every module of ours: the
# environment and Paddle's flags must be as Paddle left them.
PROBE = f'''
import json, os, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tools')!r}]
import paddle
def state():
    return [{{k: os.environ.get(k) for k in {ENV_KEYS!r}}},
            paddle.get_flags(['FLAGS_use_stride_kernel'])]
before = state()
for name in {MODULES + TOOLS!r}:
    __import__(name)
print(json.dumps({{'ran': True, 'changed': before != state()}}))
'''


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ENV_KEYS}


def _check_probe(r):
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {'ran': True, 'changed': False}


def test_importing_everything_from_stdin_runs_the_callers_code(tmp_path):
    """`python - < script.py`: once, importing utils re-executed the process and lost stdin."""
    r = subprocess.run([sys.executable, '-'], input=PROBE, capture_output=True, text=True,
                       cwd=str(tmp_path), env=clean_env(), timeout=300)
    _check_probe(r)


def test_importing_everything_from_dash_c_only_defines_things(tmp_path):
    r = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True,
                       cwd=str(tmp_path), env=clean_env(), timeout=300)
    _check_probe(r)


SCRIPT = f'''
import json, os, sys
sys.path.insert(0, {ROOT!r})
import runtime
print('started', flush=True)
runtime.setup_process()
import paddle
from PIL import Image
Image.open(sys.argv[1]).load()  # (Paddle 2.6 imported before NumPy broke PNG decoding)
print(json.dumps({{k: os.environ.get(k) for k in {ENV_KEYS!r}}}))
print(json.dumps(paddle.get_flags(['FLAGS_use_stride_kernel'])))
'''


def _png(tmp_path):
    from PIL import Image
    path = str(tmp_path / 'image.png')
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
    return path


def test_setup_process_restarts_a_script_once_with_malloc_settings(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    png = _png(tmp_path)
    r = subprocess.run([sys.executable, str(script), png], capture_output=True, text=True,
                       env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines.count('started') == 2  # the first start, then the restarted one
    env = json.loads(lines[-2])
    assert env['MALLOC_MMAP_THRESHOLD_'] == env['MALLOC_TRIM_THRESHOLD_'] == '4294967296'
    assert env['MAE_NO_REEXEC'] == '1' and env['MKL_DEBUG_CPU_TYPE'] == '5'
    assert int(env['OMP_NUM_THREADS']) >= 1
    assert json.loads(lines[-1]) == {'FLAGS_use_stride_kernel': False}
    # with the variables exported (as run_scripts/*.sh do) there is no restart
    exported = dict(clean_env(), MALLOC_MMAP_THRESHOLD_='4294967296',
                    MALLOC_TRIM_THRESHOLD_='4294967296')
    r = subprocess.run([sys.executable, str(script), png], capture_output=True, text=True,
                       env=exported, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines.count('started') == 1 and json.loads(lines[-2])['MAE_NO_REEXEC'] is None


def test_setup_process_never_restarts_stdin(tmp_path):
    r = subprocess.run([sys.executable, '-', _png(tmp_path)], input=SCRIPT, capture_output=True,
                       text=True, cwd=str(tmp_path), env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines.count('started') == 1
    env = json.loads(lines[-2])
    assert env['MALLOC_MMAP_THRESHOLD_'] is None and env['MKL_DEBUG_CPU_TYPE'] == '5'
