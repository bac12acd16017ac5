"""Training over several machines, tried on one: two launchers with --nnodes 2 (one process
each, the master on 127.0.0.1) run the same training as one launcher with two processes; and
run_scripts/launch.sh hands NNODES / MASTER / NODE_RANK to the launcher as the README says."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import TINY_ARCH, log_lines, max_diff, params, run

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402

OPTS = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'DATA.NUM_WORKERS', '0',
                    'MODEL.NORM_PIX_LOSS', 'True', 'REPORT_FREQ', '100']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def entry_point(out, data):
    return [os.path.join(ROOT, 'main_multi_gpu_pretrain.py'),
            '-cfg', os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'), '-data_path', data,
            '-output', out, '-batch_size', '8', '-opts'] + OPTS


@pytest.mark.slow
def test_two_nodes_equal_one_node_of_two_processes(tmp_path):
    data = str(tmp_path / 'data')
    make_demo_dataset.make(data, train_per_class=4, val_per_class=1, size=40, log=lambda m: None)
    one, two = str(tmp_path / 'one_node'), str(tmp_path / 'two_nodes')
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-output', one,
        '-batch_size', '8', opts=OPTS, nproc=2)
    master = f'127.0.0.1:{free_port()}'
    nodes = [subprocess.Popen(
        [sys.executable, '-m', 'paddle.distributed.launch', '--nnodes', '2', '--master', master,
         '--rank', str(rank), '--nproc_per_node', '1',
         '--log_dir', os.path.join(str(tmp_path), f'logs_node{rank}')] + entry_point(two, data),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f'node {rank}:\n{out[-3000:]}'
    with open(os.path.join(str(tmp_path), 'logs_node0', 'workerlog.0')) as f:
        assert 'pretrain: 2 process(es) x batch 8' in f.read()  # one world, not two runs
    d = max_diff(params(os.path.join(one, 'latest.pdparams')),
                 params(os.path.join(two, 'latest.pdparams')))
    print(f'1 node x 2 vs 2 nodes x 1 process: max abs param diff {d:.2e}')
    assert d < 1e-5
    l1, l2 = log_lines(one), log_lines(two)
    assert [x['epoch'] for x in l1] == [x['epoch'] for x in l2] == [0, 1]
    for a, b in zip(l1, l2):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)


def launch_script(tmp_path, **given):
    """run_scripts/run_pretrain_vit_b.sh with PYTHON a stub that prints the launcher's command
    line (and says 'CPU build of Paddle') -> the finished process."""
    stub = tmp_path / 'python'
    stub.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo 0; else echo "$@"; fi\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), DATA_PATH=str(tmp_path), OUTPUT=str(tmp_path / 'o'),
               GPUS='', NPROC='1', BATCH_SIZE='64')
    for name in ('NNODES', 'MASTER', 'NODE_RANK'):
        env.pop(name, None)
    env.update({k: v for k, v in given.items() if v is not None})
    return subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', 'run_pretrain_vit_b.sh')],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_run_scripts_take_the_multi_node_variables(tmp_path):
    """NNODES / MASTER / NODE_RANK (README, 'ImageNet on GPUs') reach the launcher, and the
    effective batch counts every machine; a missing MASTER or a rank out of range is one line,
    exit 2, before anything starts."""
    r = launch_script(tmp_path, NNODES='2', MASTER='127.0.0.1:6170', NODE_RANK='1')
    assert r.returncode == 0, r.stderr
    launched = r.stdout.strip().splitlines()[-1]
    assert '--nnodes 2 --master 127.0.0.1:6170 --rank 1 ' in launched
    assert launched.startswith('-m paddle.distributed.launch --nproc_per_node 1 ')
    assert '2 process(es) x batch 64 x accum 32 = effective batch 4096' in r.stdout
    r = launch_script(tmp_path, NNODES='2', MASTER='127.0.0.1:6170', NODE_RANK=None)
    assert r.returncode == 0 and '--master 127.0.0.1:6170 --log_dir' in r.stdout  # no --rank
    r = launch_script(tmp_path, NNODES=None, MASTER=None, NODE_RANK=None)
    assert r.returncode == 0 and '--nnodes' not in r.stdout
    for env, says in ((dict(NNODES='2', MASTER=None), 'set MASTER=ip:port'),
                      (dict(NNODES='2', MASTER='h:1', NODE_RANK='2'), 'NODE_RANK=2: 0 to 1'),
                      (dict(NNODES='two'), 'NNODES=two')):
        r = launch_script(tmp_path, **env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('launch: ')
        assert says in lines[0], r.stderr
