"""paddlefile: paddle.save's files read as paddle.load reads them, and no code from them runs.

The reference is paddle.load itself, on files written by paddle.save of the Paddle under test
(CI runs 2.6.2 under NumPy 1.x and the newest release under NumPy 2.x). Malicious files are
pickles whose __reduce__ calls os.system or builtins.eval to create a marker file.
"""
import ast
import glob
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest

from helpers import ROOT, TINY_ARCH, tiny_config

import checkpoint  # noqa: E402
import optim  # noqa: E402
import paddlefile  # noqa: E402
import tasks  # noqa: E402
from utils import UserError  # noqa: E402


def assert_same(a, b, where='file'):
    """Equal structure, types, tensor names, dtypes and bits."""
    assert type(a) is type(b), f'{where}: {type(a)} vs {type(b)}'
    if isinstance(a, dict):
        assert list(a) == list(b), f'{where}: keys differ'
        for k in a:
            assert_same(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f'{where}: lengths differ'
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    elif isinstance(a, paddle.Tensor):  # (a tensor made from an unnamed array gets a fresh name)
        fresh = a.name.startswith('generated_tensor') and b.name.startswith('generated_tensor')
        assert fresh or a.name == b.name, f'{where}: {a.name} vs {b.name}'
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.numpy().tobytes() == b.numpy().tobytes(), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


def check_as_paddle_load(path):
    for return_numpy in (False, True):
        assert_same(paddle.load(path, return_numpy=return_numpy),
                    paddlefile.load(path, return_numpy=return_numpy))


def tiny_model_and_optimizer():
    """The tiny fine-tuning config, its model and its optimizer."""
    config = tiny_config('finetune', **dict(zip(TINY_ARCH[0::2], TINY_ARCH[1::2])))
    model = tasks.get_task(config).build_model()
    return config, model, optim.build_optimizer(model, config, 1)


@pytest.fixture(scope='module')
def trained_pair(tmp_path_factory):
    """latest.pdparams / latest.pdopt as training writes them (AdamW after one step, AMP
    scaler, training state), and the same objects saved again with pickle protocol 2."""
    out = str(tmp_path_factory.mktemp('run'))
    config, model, optimizer = tiny_model_and_optimizer()
    model(paddle.randn([2, 3, 32, 32])).mean().backward()
    optimizer.step()
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024)
    state = {'epoch': 1, 'iter': 0, 'data_plan': {'seed': 0, 'order': [3, 1, 2]},
             'best': 0.5, 'rng': np.random.RandomState(0).get_state()}
    checkpoint.save_checkpoint(out, model, optimizer, state, scaler,
                               meta=checkpoint.run_meta(config, ['a', 'b']))
    prefix = os.path.join(out, 'latest')
    for ext in ('.pdparams', '.pdopt'):
        paddle.save(paddle.load(prefix + ext), prefix + '_p2' + ext, protocol=2)
    return prefix


@pytest.mark.parametrize('name', ['latest.pdparams', 'latest.pdopt', 'latest_p2.pdparams',
                                  'latest_p2.pdopt'])
def test_project_checkpoints_load_as_paddle_load(trained_pair, name):
    check_as_paddle_load(os.path.join(os.path.dirname(trained_pair), name))


def test_resume_from_restricted_load_restores_everything(trained_pair):
    """checkpoint.resume puts the pair back: the model's weights, and the optimizer state it
    hands Paddle's set_state_dict equal to what paddle.load reads (the exact kill-and-resume
    tests of test_train.py check the training that follows)."""
    _, model, optimizer = tiny_model_and_optimizer()
    handed = []
    restore = optimizer.set_state_dict
    optimizer.set_state_dict = lambda sd: (handed.append(sd), restore(sd))[1]
    state = checkpoint.resume(trained_pair, model, optimizer)
    saved = paddle.load(trained_pair + '.pdparams')
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), saved[k].numpy()), k
    assert state['epoch'] == 1 and state['data_plan']['order'] == [3, 1, 2]
    assert len(handed) == 1
    assert_same(paddle.load(trained_pair + '.pdopt')['optimizer'], handed[0], 'optimizer')


def test_bare_tensor_list_and_plain_arrays(tmp_path):
    """Objects other than state dicts: a lone tensor, a list of tensors, nested plain data."""
    objs = {'tensor': paddle.arange(6, dtype='float32').reshape([2, 3]),
            'list': [paddle.ones([2]), {'x': paddle.zeros([1], dtype='int64')}, 'text', 3],
            'arrays': {'a': np.arange(4, dtype=np.float16), 'b': (np.int32(7), 2.5, None),
                       's': {1, 2}, 'c': 1 + 2j}}
    for name, obj in objs.items():
        for protocol in (2, 4):
            path = str(tmp_path / f'{name}_{protocol}.pd')
            paddle.save(obj, path, protocol=protocol)
            check_as_paddle_load(path)


def test_split_tensors_are_joined_as_paddle_does(tmp_path):
    """paddle.save cuts tensors over 1 GiB into 'key@@.i' slices for protocols 2-3; a file in
    that layout with small slices is joined back as paddle.load joins it."""
    full = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flat = full.reshape(-1)
    obj = {'w@@.0': flat[:10], 'w@@.1': flat[10:20], 'w@@.2': flat[20:], 'b': np.ones(3, 'f4'),
           'UnpackBigParamInfor@@': {'w': {'OriginShape': (2, 3, 4),
                                           'slices': ['w@@.0', 'w@@.1', 'w@@.2']}},
           'StructuredToParameterName@@': {'w': 'linear_0.w_0', 'b': 'linear_0.b_0'}}
    path = str(tmp_path / 'split.pdparams')
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)
    check_as_paddle_load(path)
    got = paddlefile.load(path)
    assert list(got) == ['b', 'w'] and got['w'].name == 'linear_0.w_0'
    assert np.array_equal(got['w'].numpy(), full)


@pytest.mark.slow
def test_large_tensor_saved_with_protocol_2(tmp_path):
    """A real > 1 GiB tensor saved by paddle.save with protocol 2 (split into slices)."""
    path = str(tmp_path / 'big.pdparams')
    big = paddle.to_tensor(np.arange(1 << 30 | 7, dtype=np.uint8))
    paddle.save({'big': big, 'small': paddle.ones([3])}, path, protocol=2)
    del big
    ref = paddle.load(path, return_numpy=True)
    got = paddlefile.load(path, return_numpy=True)
    assert list(got) == list(ref) and got['big'].shape == (1 << 30 | 7,)
    assert np.array_equal(got['big'], ref['big']) and np.array_equal(got['small'], ref['small'])


def test_numpy_1_and_2_names_both_read(tmp_path):
    """A file written under NumPy 1.x names numpy.core.multiarray, one under 2.x
    numpy._core.multiarray: each reads under the other NumPy, as with paddle.load."""
    state = {'w': paddle.randn([3, 4]), 'n': paddle.arange(3)}
    src = str(tmp_path / 'now.pdparams')
    paddle.save(state, src, protocol=2)
    with open(src, 'rb') as f:
        data = f.read()
    names = [b'numpy._core.multiarray\n', b'numpy.core.multiarray\n']
    here = next(n for n in names if n in data)
    other = names[1 - names.index(here)]
    path = str(tmp_path / 'other_numpy.pdparams')
    with open(path, 'wb') as f:
        f.write(data.replace(here, other))
    got = paddlefile.load(path)
    for k, v in state.items():
        assert np.array_equal(got[k].numpy(), v.numpy()) and got[k].dtype == v.dtype


# ---------------------------------------------------------------------------------------------
# malicious and broken files
# ---------------------------------------------------------------------------------------------
class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f'open({self.marker!r}, "w").close()',)


PAYLOADS = {'os.system': (SystemCall, 'refusing to load posix.system'),
            'eval': (EvalCall, 'refusing to load builtins.eval')}


def write_malicious(path, payload, marker, protocol=4, extra=None):
    """A state dict with real weights and one entry that runs code when unpickled."""
    obj = {'pos_embed': np.zeros((1, 5, 8), np.float32), 'payload': payload(marker)}
    obj.update(extra or {})
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('payload', sorted(PAYLOADS))
def test_malicious_file_is_refused_before_it_runs(tmp_path, payload, protocol):
    cls, message = PAYLOADS[payload]
    marker = str(tmp_path / 'ran')
    path = write_malicious(str(tmp_path / 'evil.pdparams'), cls, marker, protocol)
    with pytest.raises(paddlefile.FormatError) as e:
        paddlefile.load(path)
    assert not os.path.exists(marker)
    assert str(e.value).startswith(f'{path}: {message}: ') and '\n' not in str(e.value)
    with pytest.raises(UserError, match=message):
        checkpoint.load_file(path, 'weights')
    assert not os.path.exists(marker)


def test_hub_refuses_a_malicious_file(tmp_path):
    marker = str(tmp_path / 'ran')
    path = write_malicious(str(tmp_path / 'evil.pdparams'), SystemCall, marker)
    with pytest.raises(UserError, match='refusing to load posix.system'):
        paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, img_size=32,
                        patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    assert not os.path.exists(marker)


@pytest.mark.parametrize('content,message', [
    (b'', 'the file is empty'),
    (b'PK\x03\x04 not a pickle', 'not a file written by paddle.save'),
    (pickle.dumps({'w': np.ones(100)}, protocol=4)[:-40], 'cannot be read'),
])
def test_broken_files_are_one_line_errors(tmp_path, content, message):
    path = str(tmp_path / 'broken.pdparams')
    with open(path, 'wb') as f:
        f.write(content)
    with pytest.raises(UserError, match=message) as e:
        checkpoint.load_file(path, 'weights')
    assert path in str(e.value) and '\n' not in str(e.value)


def test_paddle_load_is_called_nowhere_else():
    """Every pickle the project reads goes through paddlefile: no call of paddle.load (nor
    `from paddle import load`) in any Python file but this test's reference comparisons."""
    here = os.path.abspath(__file__)
    found = []
    files = [f for pattern in ('*.py', 'tools/*.py', 'port_weights/*.py', 'tests/*.py')
             for f in glob.glob(os.path.join(ROOT, pattern))]
    assert len(files) > 40
    for path in files:
        if os.path.abspath(path) == here:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == 'load'
                    and isinstance(node.value, ast.Name) and node.value.id == 'paddle'):
                found.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}')
            if (isinstance(node, ast.ImportFrom) and node.module in ('paddle', 'paddle.framework')
                    and any(a.name == 'load' for a in node.names)):
                found.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}')
    assert not found, 'paddle.load used at ' + ', '.join(found)


# ---------------------------------------------------------------------------------------------
# every entry point, as a user runs it
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import make_demo_dataset
    out = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(out, train_per_class=2, val_per_class=1, size=32, log=lambda m: None)
    return out


def entry_commands(demo, evil, out):
    """entry -> (argv, path it must not write)"""
    ft = [os.path.join(ROOT, 'main_multi_gpu_finetune.py')]
    cfg = ['-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', demo,
           '-output', os.path.join(out, 'run'), '-opts', *TINY_ARCH, 'DATA.BATCH_SIZE', '2']
    image = os.path.join(demo, 'val', 'circle', '00000.png')
    return {
        '-eval': (ft + ['-eval', '-pretrained', evil, '-data_path', demo], None),
        '-pretrained': (ft + ['-pretrained', evil] + cfg, os.path.join(out, 'run', 'log.txt')),
        'visualize': ([os.path.join(ROOT, 'tools', 'visualize.py'), '-pretrained', evil,
                       '--image', image, '--out', os.path.join(out, 'v.png')],
                      os.path.join(out, 'v.png')),
        'export_model': ([os.path.join(ROOT, 'tools', 'export_model.py'), '-pretrained', evil,
                          '-output', os.path.join(out, 'exported')], os.path.join(out, 'exported')),
        'export_official': ([os.path.join(ROOT, 'port_weights', 'export_official.py'), '--src',
                             evil, '--dst', os.path.join(out, 'x.pth')], os.path.join(out, 'x.pth')),
    }


def run_refused(argv, marker, message, must_not_exist):
    r = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.startswith('error:')]
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr
    assert not os.path.exists(marker)
    assert must_not_exist is None or not os.path.exists(must_not_exist)


@pytest.mark.slow
@pytest.mark.parametrize('payload', sorted(PAYLOADS))
@pytest.mark.parametrize('entry', ['-eval', '-pretrained', 'visualize', 'export_model',
                                   'export_official'])
def test_entry_points_refuse_malicious_weights(demo, tmp_path, entry, payload):
    cls, message = PAYLOADS[payload]
    marker = str(tmp_path / 'ran')
    evil = write_malicious(str(tmp_path / 'evil.pdparams'), cls, marker)
    argv, written = entry_commands(demo, evil, str(tmp_path))[entry]
    run_refused(argv, marker, message, written)


@pytest.mark.slow
@pytest.mark.parametrize('payload', sorted(PAYLOADS))
@pytest.mark.parametrize('which', ['.pdopt', '.pdparams'])
def test_resume_refuses_malicious_files(demo, trained_pair, tmp_path, which, payload):
    """-resume PREFIX with either file of the pair malicious (the .pdopt naming the malicious
    .pdparams' fingerprint, so that it is the .pdparams that gets read)."""
    cls, message = PAYLOADS[payload]
    marker = str(tmp_path / 'ran')
    prefix = str(tmp_path / 'evil')
    if which == '.pdopt':
        os.link(trained_pair + '.pdparams', prefix + '.pdparams')
        write_malicious(prefix + '.pdopt', cls, marker, extra={'state': {'epoch': 1}})
    else:
        write_malicious(prefix + '.pdparams', cls, marker)
        paddle.save({'optimizer': {}, 'state': {'epoch': 1, 'iter': 0},
                     'model_fingerprint': checkpoint._fingerprint(prefix + '.pdparams')},
                    prefix + '.pdopt')
    argv = [os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-cfg',
            os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', demo,
            '-output', str(tmp_path / 'run'), '-resume', prefix, '-opts', *TINY_ARCH,
            'DATA.BATCH_SIZE', '2']
    run_refused(argv, marker, message, str(tmp_path / 'run' / 'log.txt'))
