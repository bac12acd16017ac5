"""Samplers and loaders: 2-process coverage, epoch-seeded order, reproducible worker seeding,
per-sample masks."""
import os
import types

import numpy as np
import paddle
import pytest

import helpers as H
import datasets
import sources
import tasks
import utils


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize('n', [1, 2, 5, 7, 64, 101])
@pytest.mark.parametrize('replicas', [1, 2, 3])
def test_eval_sampler_counts_every_sample_once(n, replicas):
    seen, lengths = [], []
    for rank in range(replicas):
        sampler = datasets.EvalBatchSampler(Sized(n), 4, num_replicas=replicas, rank=rank)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(0 < len(b) <= 4 for b in batches)
        seen += [i for b in batches for i in b]
        lengths.append(sum(map(len, batches)))
    assert sorted(seen) == list(range(n))
    assert max(lengths) - min(lengths) <= 1


def test_train_sampler_two_ranks_split_one_epoch_order():
    n, bs = 23, 4
    ranks = [datasets.TrainBatchSampler(Sized(n), bs, num_replicas=2, rank=r, seed=5)
             for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 12 // bs  # ceil(23/2)=12
    assert all(len(b) == bs for bb in batches for b in bb)  # drop_last
    # global batch k, dealt out r, r + 2, ... = one process's batch k of 8
    one = datasets.TrainBatchSampler(Sized(n), 2 * bs, num_replicas=1, rank=0, seed=5)
    one.set_epoch(3)
    single = list(one)  # 23 samples: 2 full batches of 8; the 2 ranks pad to 24, 3 x 2 x 4
    interleaved = [[i for pair in zip(a, b) for i in pair] for a, b in zip(*batches)]
    assert len(single) == 2 and interleaved[:2] == single
    flat = [i for bb in batches for b in bb for i in b]
    assert len(flat) == 24 and set(flat) == set(range(n))  # 23 samples + 1 wrapped around


@pytest.mark.parametrize('n,bs,replicas', [(23, 4, 2), (10, 3, 3), (7, 4, 2), (5, 8, 2)])
def test_train_sampler_without_drop_last_covers_all(n, bs, replicas):
    seen, lengths = [], []
    for r in range(replicas):
        s = datasets.TrainBatchSampler(Sized(n), bs, num_replicas=replicas, rank=r,
                                       drop_last=False)
        batches = list(s)
        assert len(batches) == len(s)
        seen += [i for b in batches for i in b]
        lengths.append(sum(map(len, batches)))
    assert set(seen) == set(range(n)) and len(seen) == -(-n // replicas) * replicas
    assert len(set(lengths)) == 1


@pytest.mark.parametrize('n,per_epoch', [(23, 8), (10, 24), (16, 16)])
def test_iteration_budget_epochs_cut_a_stream_of_passes(n, per_epoch):
    """TRAIN.ITERS_PER_EPOCH: epochs of per_epoch samples cut from the passes laid end to end
    (pass p the one-pass order of epoch p), 1 process or 2 seeing the same global batches."""
    bs = 4
    one = datasets.TrainBatchSampler(Sized(n), bs, seed=3, samples_per_epoch=per_epoch)
    two = [datasets.TrainBatchSampler(Sized(n), bs // 2, num_replicas=2, rank=r, seed=3,
                                      samples_per_epoch=per_epoch) for r in range(2)]
    stream, epochs = [], 5
    for e in range(epochs):
        one.set_epoch(e)
        batches = list(one)
        assert len(batches) == len(one) == per_epoch // bs
        stream += [i for b in batches for i in b]
        for s in two:
            s.set_epoch(e)
        halves = [list(s) for s in two]
        assert len(halves[0]) == len(two[0]) == per_epoch // bs
        assert [[i for pair in zip(a, b) for i in pair] for a, b in zip(*halves)] == batches
    passes = []
    for p in range(-(-len(stream) // n)):
        plain = datasets.TrainBatchSampler(Sized(n), 1, seed=3)
        plain.set_epoch(p)
        passes += [b[0] for b in plain]
    assert stream == passes[:len(stream)]  # every pass a permutation: each sample once a pass
    one.set_epoch(3, start_batch=1)  # resuming inside an epoch
    assert [i for b in one for i in b] == stream[3 * per_epoch + bs:4 * per_epoch]


def test_train_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        s = datasets.TrainBatchSampler(Sized(50), 5, num_replicas=2, rank=1, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 7) == order(0, 7)  # a resumed run at epoch 7 sees the same batches
    assert order(0, 7) != order(0, 8) and order(0, 7) != order(1, 7)
    s = datasets.TrainBatchSampler(Sized(50), 5, seed=0)
    s.set_epoch(2)
    first = list(s)
    assert s.epoch == 3 and list(s) != first  # a full pass moves on by itself
    s.set_epoch(2)
    assert list(s) == first


def test_train_loader_needs_a_full_batch(tmp_path):
    root, _ = _photo_list(tmp_path, 3)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__BATCH_SIZE=4)
    with pytest.raises(datasets.DataError, match='no full batch of DATA.BATCH_SIZE 4'):
        datasets.build_loader(cfg, sources.build_dataset(cfg, True), True, num_replicas=1,
                              rank=0)


def _photo_list(tmp_path, n, name='chelsea.png'):
    """n names (hard links) of one photograph listed with labels 0..n-1 (a list names each
    file once)."""
    path = tmp_path / 'same.png'
    H.photo(name, (80, 60)).save(path)
    for i in range(n):
        os.link(path, tmp_path / f'same_{i}.png')
    H.write_list(tmp_path / 'train_list.txt', [f'same_{i}.png {i}' for i in range(n)])
    H.write_list(tmp_path / 'val_list.txt', [f'same_{i}.png {i}' for i in range(n)])
    return str(tmp_path), str(path)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y, _ in loader])
    return np.stack(xs), np.stack(ys)


def _train_loader(root, workers, replicas=1, rank=0, bs=2):
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__BATCH_SIZE=bs,
                        DATA__NUM_WORKERS=workers, SEED=3)
    return datasets.build_loader(cfg, sources.build_dataset(cfg, True), True,
                                 num_replicas=replicas, rank=rank)


@pytest.mark.parametrize('workers', [0, 2])
def test_train_loader_augmentations_are_reproducible_and_differ(tmp_path, workers):
    root, _ = _photo_list(tmp_path, 8)
    loader = _train_loader(root, workers)
    x1, y1 = _epoch(loader, 1)
    x1b, y1b = _epoch(loader, 1)
    x2, y2 = _epoch(loader, 2)
    assert x1.shape == (4, 2, 3, 32, 32) and y1.dtype == np.int64
    assert np.array_equal(x1, x1b) and np.array_equal(y1, y1b)  # same epoch: same data
    assert sorted(y1.ravel().tolist()) == list(range(8))
    assert not np.array_equal(x1, x2) and not np.array_equal(y1, y2)
    # Every sample is the same photograph: different outputs mean different random draws,
    # also between the batches of worker 0 (batches 0, 2) and worker 1 (batches 1, 3).
    assert len({row.tobytes() for row in x1.reshape(8, -1)}) == 8


def test_augmentations_do_not_depend_on_workers_processes_or_resuming(tmp_path):
    """Sample i of epoch e gets the same augmentation with 0 or 2 workers, on 1 or 2
    processes, and in an epoch resumed at batch 2."""
    root, _ = _photo_list(tmp_path, 8)
    x0, y0 = _epoch(_train_loader(root, 0), 4)
    x2, y2 = _epoch(_train_loader(root, 2), 4)
    assert np.array_equal(x0, x2) and np.array_equal(y0, y2)
    by_label = {int(y): x for x, y in zip(x0.reshape(8, 3, 32, 32), y0.ravel())}
    for rank in range(2):
        xr, yr = _epoch(_train_loader(root, 2, replicas=2, rank=rank), 4)
        for x, y in zip(xr.reshape(-1, 3, 32, 32), yr.ravel()):
            assert np.array_equal(x, by_label[int(y)])
    loader = _train_loader(root, 2)
    loader.set_epoch(4, 2)
    tail = [(x.numpy(), y.numpy()) for x, y, _ in loader]
    assert len(loader) == 4 and len(tail) == 2
    assert all(np.array_equal(x, x0[2 + k]) and np.array_equal(y, y0[2 + k])
               for k, (x, y) in enumerate(tail))


def test_eval_loaders_of_two_ranks_count_each_image_once(tmp_path):
    root, _ = _photo_list(tmp_path, 11)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__BATCH_SIZE_EVAL=4,
                        DATA__NUM_WORKERS=2, MODEL__NUM_CLASSES=11)
    labels, images = [], []
    for rank in range(2):
        loader = datasets.build_loader(cfg, sources.build_dataset(cfg, False), False,
                                       num_replicas=2, rank=rank)
        for x, y, _ in loader:
            labels += y.numpy().tolist()
            images.append(x.numpy())
    assert sorted(labels) == list(range(11))
    all_images = np.concatenate(images)
    assert all_images.shape == (11, 3, 32, 32)
    assert np.abs(all_images - all_images[0]).max() == 0  # eval transform is deterministic


def test_seed_everything_mixes_all_four_numbers():
    import random
    draws = set()
    for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
        utils.seed_everything(*key, include_paddle=False)
        draws.add((random.random(), float(np.random.rand())))
    assert len(draws) == 5
    utils.seed_everything(0, 1, 0, 0, include_paddle=False)
    again = (random.random(), float(np.random.rand()))
    assert again in draws


class _RecordNoise(paddle.nn.Layer):
    """Stands in for the MAE model in tasks.Pretrain.loss: records the masking noise each
    sample (known by its label, which _photo_list makes equal to its index) is given."""

    def __init__(self, num_patches):
        super().__init__()
        self.patch_embed = types.SimpleNamespace(num_patches=num_patches)
        self.labels, self.seen = None, {}

    def forward(self, images, mask_ratio, noise):
        for label, row in zip(self.labels, noise.numpy()):
            self.seen[int(label)] = row
        return (paddle.zeros([1]),)


def _masks(root, workers, replicas=1, rank=0, epoch=4, start_batch=0, seed=3):
    cfg = H.tiny_config('pretrain', DATA__DATA_PATH=root, DATA__BATCH_SIZE=2,
                        DATA__NUM_WORKERS=workers, SEED=seed)
    task = tasks.get_task(cfg)
    loader = datasets.build_loader(cfg, sources.build_dataset(cfg, True), True,
                                   num_replicas=replicas, rank=rank)
    loader.set_epoch(epoch, start_batch)
    model = _RecordNoise(64)
    for batch in loader:
        model.labels = batch[1].numpy().ravel()
        task.loss(model, batch, epoch)
    return model.seen


def test_masks_of_a_sample_do_not_depend_on_processes_workers_or_resuming(tmp_path):
    """The masking noise of sample i in epoch e is the same on 1 or 2 processes, with 0 or 2
    workers, and in an epoch resumed at batch 2; it differs between samples and epochs."""
    root, _ = _photo_list(tmp_path, 8)
    one = _masks(root, 0)
    assert sorted(one) == list(range(8))
    assert all(row.shape == (64,) and row.dtype == np.float32 for row in one.values())
    assert len({row.tobytes() for row in one.values()}) == 8
    two = {}
    for rank in range(2):
        two.update(_masks(root, 2, replicas=2, rank=rank))
    assert sorted(two) == list(range(8))
    assert all(np.array_equal(two[k], one[k]) for k in one)
    resumed = _masks(root, 2, start_batch=2)
    assert len(resumed) == 4 and all(np.array_equal(resumed[k], one[k]) for k in resumed)
    for other in (_masks(root, 0, epoch=5), _masks(root, 0, seed=4)):
        assert all(not np.array_equal(other[k], one[k]) for k in one)
