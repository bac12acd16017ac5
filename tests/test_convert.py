"""port_weights/convert_official.py: official-format .pth -> .pdparams, without PyTorch.

torch is used here only to WRITE input files in the official format (torch.save), built from
tiny Paddle models; the converter itself never imports it.
"""
import hashlib
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

torch = pytest.importorskip('torch')
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    import paddle

from helpers import make_case, paddle_numpy_sd, tiny_mae, tiny_vit, to_torch_sd  # noqa: E402
import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import paddlefile  # noqa: E402
from port_weights import convert_official as C  # noqa: E402


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
# the tiny models' head counts (a .pth without a config does not say them)
TINY_HEADS = ('--num-heads', '4', '--decoder-num-heads', '4')


def run_cli(src, dst, env=None):
    return subprocess.run(
        [sys.executable, 'port_weights/convert_official.py', '--src', str(src), '--dst', str(dst),
         *TINY_HEADS], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def assert_converted(dst, expected, model):
    loaded, meta = checkpoint.split_meta(paddlefile.load(str(dst)))
    assert sorted(loaded) == sorted(expected)
    assert checkpoint.META_KEY not in loaded and 'TRAIN:' in meta['config']
    for k, v in loaded.items():
        v = v.numpy() if hasattr(v, 'numpy') else np.asarray(v)
        assert v.dtype == np.float32, k
        assert np.array_equal(v, expected[k]), k
    result = model.set_state_dict(loaded)
    if result is not None:  # (missing keys, unexpected keys)
        assert list(result[0]) == [] and list(result[1]) == []
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), expected[k]), k


def assert_user_error(proc, src, dst, phrase):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(src) in proc.stderr
    assert phrase in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not os.path.exists(dst) and not os.path.exists(str(dst) + '.tmp')


# ----------------------------------------------------------------------------------------------
# round trips through the command line
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('name', ['pretrain-encoder', 'pretrain-full', 'finetuned-global-pool',
                                  'finetuned-cls-token', 'linear-probe'])
def test_round_trip_cli(tmp_path, name):
    obj, expected, model, kind = make_case(name)
    src, dst = tmp_path / f'{name}.pth', tmp_path / f'{name}.pdparams'
    torch.save(obj, src)
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert f'kind: {kind} ' in proc.stdout
    assert f'saved: {dst}' in proc.stdout
    assert not os.path.exists(str(dst) + '.tmp')
    assert_converted(dst, expected, model)
    if name == 'pretrain-full':
        assert 'ignored checkpoint entries (not model weights): args, epoch, optimizer, scaler' \
            in proc.stdout
    if name == 'linear-probe':
        assert 'linear probe' in proc.stdout and '1 dropped: head.0.num_batches_tracked' \
            in proc.stdout


@pytest.mark.slow
def test_cli_works_without_torch(tmp_path):
    blocker = tmp_path / 'no_torch'
    blocker.mkdir()
    (blocker / 'torch.py').write_text('raise ImportError("torch is blocked in this test")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocker)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    check = subprocess.run([sys.executable, '-c', 'import torch'], env=env, capture_output=True)
    assert check.returncode != 0  # the blocker works

    obj, expected, model, kind = make_case('linear-probe')
    src, dst = tmp_path / 'lp.pth', tmp_path / 'lp.pdparams'
    torch.save(obj, src)
    proc = run_cli(src, dst, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f'kind: {kind} ' in proc.stdout
    assert_converted(dst, expected, model)


@pytest.mark.slow
def test_official_name_with_other_md5_warns(tmp_path):
    obj, expected, model, _ = make_case('pretrain-encoder')
    src, dst = tmp_path / 'mae_pretrain_vit_base.pth', tmp_path / 'out.pdparams'
    torch.save(obj, src)
    proc = run_cli(src, dst)
    assert proc.returncode == 0
    assert 'WARNING: mae_pretrain_vit_base.pth' in proc.stderr and '8cad7c' in proc.stderr
    assert_converted(dst, expected, model)


# ----------------------------------------------------------------------------------------------
# inputs a user can get wrong: exit 1, one message naming the file, nothing written
# ----------------------------------------------------------------------------------------------
def _valid_finetuned(path, edit=None):
    paddle.seed(0)
    sd = to_torch_sd(paddle_numpy_sd(tiny_vit(global_pool=True)))
    if edit:
        edit(sd)
    torch.save({'model': sd}, path)


def _write_bad(kind, src, tmp_path):
    if kind == 'missing':
        return 'no such file'
    if kind == 'empty':
        src.write_bytes(b'')
        return 'empty'
    if kind == 'truncated':
        _valid_finetuned(src)
        data = src.read_bytes()
        src.write_bytes(data[:len(data) // 2])
        return 'truncated download'
    if kind == 'random-bytes':
        src.write_bytes(b'\x13' + np.random.default_rng(0).bytes(4095))
        return 'neither a PyTorch checkpoint (a zip written by torch.save) nor a .safetensors'
    if kind == 'zip-not-checkpoint':
        with zipfile.ZipFile(src, 'w') as z:
            z.writestr('notes/readme.txt', 'hello')
        return 'not a PyTorch checkpoint'
    if kind == 'legacy-format':
        torch.save({'model': {'x': torch.ones(2)}}, src, _use_new_zipfile_serialization=False)
        return 'legacy'
    if kind == 'not-a-state-dict':
        torch.save({'weights': 'somewhere else'}, src)
        return "holds neither {'model' or 'state_dict': state_dict} nor a state_dict"
    if kind == 'unknown-key':
        _valid_finetuned(src, lambda sd: sd.__setitem__('extra.weight', torch.ones(3, 3)))
        return 'extra.weight'
    if kind == 'missing-key':
        _valid_finetuned(src, lambda sd: sd.pop('blocks.1.mlp.fc2.bias'))
        return 'missing keys blocks.1.mlp.fc2.bias'
    if kind == 'wrong-shape':
        _valid_finetuned(src, lambda sd: sd.__setitem__('blocks.0.norm1.bias', torch.ones(65)))
        return 'blocks.0.norm1.bias [65]'
    if kind == 'distilled':
        _valid_finetuned(src, lambda sd: sd.__setitem__('dist_token', torch.zeros(1, 1, 64)))
        return 'dist_token: a distillation token (a DeiT-distilled ViT)'
    if kind == 'registers':
        _valid_finetuned(src, lambda sd: sd.__setitem__('reg_token', torch.zeros(1, 4, 64)))
        return 'reg_token: register tokens (a ViT with registers)'
    if kind == 'disallowed-global':
        # data.pkl = os.system('touch <marker>'), written opcode by opcode (never executed)
        cmd = f'touch {tmp_path / "pwned"}'.encode()
        pkl = (b'\x80\x02cos\nsystem\n' + b'X' + len(cmd).to_bytes(4, 'little') + cmd +
               b'\x85R.')
        with zipfile.ZipFile(src, 'w') as z:
            z.writestr('archive/data.pkl', pkl)
            z.writestr('archive/version', '3\n')
        return 'refusing to load os.system'
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['missing', 'empty', 'truncated', 'random-bytes',
                                  'zip-not-checkpoint', 'legacy-format', 'not-a-state-dict',
                                  'unknown-key', 'missing-key', 'wrong-shape', 'distilled',
                                  'registers', 'disallowed-global'])
def test_bad_input(tmp_path, kind):
    src, dst = tmp_path / 'in.pth', tmp_path / 'out.pdparams'
    phrase = _write_bad(kind, src, tmp_path)
    proc = run_cli(src, dst)
    assert_user_error(proc, src, dst, phrase)
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.slow
def test_missing_dst_folder(tmp_path):
    src, dst = tmp_path / 'in.pth', tmp_path / 'no_such_dir' / 'out.pdparams'
    _valid_finetuned(src)
    proc = run_cli(src, dst)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert str(dst) in proc.stderr and 'does not exist' in proc.stderr
    assert not dst.parent.exists()


def test_disallowed_global_in_process(tmp_path):
    src = tmp_path / 'evil.pth'
    _write_bad('disallowed-global', src, tmp_path)
    with pytest.raises(C.ConversionError, match=r'os\.system'):
        C.load_torch_checkpoint(str(src))
    assert not (tmp_path / 'pwned').exists()


# ----------------------------------------------------------------------------------------------
# md5 table
# ----------------------------------------------------------------------------------------------
def test_identify_official():
    table = {'model_a.pth': 'abc123', 'model_b.pth': '00ff00'}
    status, msg = C.identify_official('/x/model_a.pth', 'abc123' + 'e' * 26, table)
    assert status == 'official' and 'model_a.pth' in msg
    status, msg = C.identify_official('/x/renamed.pth', '00ff00' + 'e' * 26, table)
    assert status == 'official' and 'model_b.pth' in msg and 'renamed.pth' in msg
    status, msg = C.identify_official('/x/model_a.pth', '00ff01' + 'e' * 26, table)
    assert status == 'mismatch' and 'WARNING' in msg and 'abc123' in msg
    status, msg = C.identify_official('/x/mine.pth', '00ff01' + 'e' * 26, table)
    assert status == 'unofficial' and 'not an official' in msg
    assert C.OFFICIAL_MD5['mae_finetuned_vit_huge.pth'] == '2541f2'


def test_file_md5_chunked(tmp_path):
    data = np.random.default_rng(1).bytes(10_000)
    (tmp_path / 'f').write_bytes(data)
    assert C.file_md5(str(tmp_path / 'f'), chunk_size=333) == hashlib.md5(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# the reader itself
# ----------------------------------------------------------------------------------------------
def test_reader_views_offsets_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {'transposed': base.t(), 'slice': base[1:3, 2:5], 'shared': base,
           'scalar': torch.tensor(3.5), 'empty': torch.zeros(0, 3),
           'long': torch.arange(5), 'bool': torch.tensor([True, False]),
           'double': torch.randn(3, dtype=torch.float64), 'nested': [torch.ones(2), 7]}
    torch.save(obj, tmp_path / 'v.pth')
    got = C.load_torch_checkpoint(str(tmp_path / 'v.pth'))
    for k in ('transposed', 'slice', 'shared', 'scalar', 'empty', 'long', 'bool', 'double'):
        ref = obj[k].numpy()
        assert got[k].dtype == ref.dtype and got[k].shape == ref.shape, k
        assert np.array_equal(got[k], ref), k
    assert np.array_equal(got['nested'][0], np.ones(2, 'float32')) and got['nested'][1] == 7


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_sources_become_float32(tmp_path, dtype):
    paddle.seed(0)
    sd = {k: v.to(getattr(torch, dtype)) for k, v in to_torch_sd(
        paddle_numpy_sd(tiny_mae())).items()}
    src, dst = tmp_path / 'half.pth', tmp_path / 'half.pdparams'
    torch.save({'model': sd}, src)
    kind, info = C.convert_file(str(src), str(dst), log=lambda *a: None)
    assert kind == 'pretrain-full' and info['num_tensors'] == len(sd)
    loaded = paddlefile.load(str(dst))
    for k, t in sd.items():
        ref = t.float().numpy()
        ref = ref.T if (k.endswith('.weight') and ref.ndim == 2) else ref
        v = loaded[k].numpy()
        assert v.dtype == np.float32 and np.array_equal(v, ref), k
    assert np.abs(loaded['blocks.0.attn.qkv.weight'].numpy()).max() > 0  # not all zeros


def test_convert_state_dict_arch_info():
    paddle.seed(0)
    sd = {k: v.numpy() for k, v in to_torch_sd(paddle_numpy_sd(tiny_mae())).items()}
    kind, out, info = C.convert_state_dict(sd)
    assert kind == 'pretrain-full' and info['model'] == 'MaskedAutoencoderViT'
    arch = info['arch']
    assert (arch['img_size'], arch['patch_size'], arch['embed_dim'], arch['depth'],
            arch['decoder_embed_dim'], arch['decoder_depth'], arch['mlp_ratio']) == \
        (32, 8, 64, 2, 32, 1, 4.0)
    assert out['blocks.0.mlp.fc1.weight'].shape == (64, 256)  # [in, out]
    assert C._guess_heads(768, C.OFFICIAL_NUM_HEADS) == 12
    assert C._guess_heads(1280, C.OFFICIAL_NUM_HEADS) == 16
    assert 96 % C._guess_heads(96, C.OFFICIAL_NUM_HEADS) == 0


def test_named_sizes_keep_their_heads_other_shapes_are_unknown():
    """Heads are in no weight: a named size's whole shape gives its count, the width alone
    does not (ViT-B's width at depth 2 is unknown), and what the source or a flag says counts."""
    base = dict(patch_size=16, embed_dim=768, depth=12, mlp_ratio=4.0, num_heads=12)
    huge = dict(patch_size=14, embed_dim=1280, depth=32, mlp_ratio=4.0, num_heads=16)
    assert C.named_heads(base) == 12 and C.named_heads(huge) == 16
    assert C.unknown_heads(base, {}) == []
    assert C.named_heads(dict(base, depth=2)) is None
    assert C.unknown_heads(dict(base, depth=2), {}) == ['num_heads']
    assert C.unknown_heads(dict(base, depth=2), {'num_heads': 6}) == []
    mae = dict(base, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    assert C.unknown_heads(mae, {}) == []
    assert C.unknown_heads(dict(mae, decoder_depth=1), {}) == ['decoder_num_heads']


def test_num_heads_flags_build_the_trained_model(tmp_path, capsys):
    """--num-heads / --decoder-num-heads: the converted file carries them in its config; a
    count that is no count is one line, exit 1."""
    paddle.seed(0)
    obj, expected, model, _ = make_case('pretrain-full')
    src, dst = tmp_path / 'mae.pth', tmp_path / 'mae.pdparams'
    torch.save(obj, src)
    assert C.main(['--src', str(src), '--dst', str(dst), *TINY_HEADS]) == 0
    config = cfgmod.from_text(checkpoint.saved_meta(str(dst))['config'], 'test')
    assert (config.MODEL.ENCODER.NUM_HEADS, config.MODEL.DECODER.NUM_HEADS) == (4, 4)
    assert 'heads: num_heads 4, decoder_num_heads 4 (from --num-heads' in capsys.readouterr().out
    assert C.main(['--src', str(src), '--dst', str(tmp_path / 'b.pdparams'),
                   '--num-heads', '0']) == 1
    assert capsys.readouterr().err.startswith('error: --num-heads 0: not a head count')


@pytest.mark.slow
def test_a_pdparams_as_src_is_named_as_a_paddle_file(tmp_path):
    src, dst = tmp_path / 'mine.pdparams', tmp_path / 'out.pdparams'
    paddle.save(paddle_numpy_sd(tiny_vit(global_pool=True)), str(src))
    assert_user_error(run_cli(src, dst), src, dst, 'this is a Paddle file already')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['finetuned-global-pool', 'linear-probe', 'pretrain-full'])
def test_printed_usage_builds_a_model_the_weights_fit(tmp_path, name):
    """The 'use it with:' line: its -cfg and -opts build exactly the converted model (checked
    by loading the weights as -eval does: nothing may be missing or differ)."""
    import shlex
    import config as cfgmod
    import tasks
    obj, expected, model, kind = make_case(name)
    src, dst = tmp_path / f'{name}.pth', tmp_path / f'{name}.pdparams'
    torch.save(obj, src)
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith('use it with: ')][-1]
    args = shlex.split(line[len('use it with: '):])
    assert args[args.index('-pretrained') + 1] == str(dst)
    assert 'MODEL.NAME' in args  # the tiny test models are no named size
    config = cfgmod.get_config(str(REPO / args[args.index('-cfg') + 1]))
    cfgmod.merge_opts(config, args[args.index('-opts') + 1:] if '-opts' in args else [])
    task = tasks.get_task(config)
    missing, unused = task.load_pretrained(task.build_model(), str(dst), log=lambda m: None,
                                           eval_only=True)
    assert missing == [] and unused == []


def test_usage_of_official_weights_is_the_shipped_config():
    arch = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                mlp_ratio=4.0, num_classes=1000, global_pool=True, linear_probe=False)
    config, opts = C.converted_config('finetuned', arch, {})
    assert C.usage(opts, 'w.pdparams') == \
        '-cfg configs/vit_base_patch16_224_finetune.yaml -pretrained w.pdparams'
    assert config.MODEL.NAME == 'vit_base_patch16' and config.MODEL.NUM_CLASSES == 1000
    arch.update(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0,
                global_pool=False)
    config, opts = C.converted_config('pretrain-encoder', arch, {})
    assert C.usage(opts, 'h.pdparams') == \
        '-cfg configs/vit_huge_patch14_224_finetune.yaml -pretrained h.pdparams'
    assert config.MODEL.NUM_CLASSES == 0 and not config.MODEL.GLOBAL_POOL  # the file: no head


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by torchfile, against the safetensors package
# ----------------------------------------------------------------------------------------------
def test_safetensors_read_and_write_match_the_library(tmp_path):
    import safetensors.torch as st
    import torchfile
    ref = {'w': torch.randn(3, 4), 'bf': torch.randn(5).to(torch.bfloat16),
           'i': torch.arange(6).reshape(2, 3), 'm': torch.tensor([True, False]),
           'h': torch.randn(2, 2).half(), 'empty': torch.zeros(0, 3), 's': torch.tensor(2.5)}
    src = str(tmp_path / 'ref.safetensors')
    st.save_file(ref, src, metadata={'format': 'pt'})
    got, meta = torchfile.load_safetensors(src)
    assert meta == {'format': 'pt'} and set(got) == set(ref)
    for k, v in ref.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        assert np.array_equal(got[k], want), k
    dst = str(tmp_path / 'ours.safetensors')
    torchfile.save_safetensors(got, dst, {'format': 'pt'})
    back = st.load_file(dst)
    assert all(np.array_equal(back[k].numpy(), got[k]) for k in got)
    with open(src, 'rb') as f:
        data = f.read()
    for name, content, message in [('cut.safetensors', data[:-7], 'truncated'),
                                   ('head.safetensors', data[:20], 'truncated'),
                                   ('json.safetensors', data[:8] + b'{x' + data[10:], 'JSON')]:
        path = str(tmp_path / name)
        with open(path, 'wb') as f:
            f.write(content)
        with pytest.raises(torchfile.FormatError, match=message) as e:
            torchfile.load_safetensors(path)
        assert str(e.value).startswith(path) and '\n' not in str(e.value)
