"""The one training loop (train_one_epoch) and evaluation (evaluate) all three stages share."""
import contextlib
import math
import time

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

import optim
import utils


class NonFiniteLoss(utils.UserError):
    """Training diverged; the message says where and which checkpoint is the last good one."""


def masking_noise(config, epoch, iteration, global_batch, num_patches, rank, local_batch):
    """Uniform masking noise for this process's share of the global batch.

    Drawn for the whole global batch from (SEED, epoch, iteration) and sliced by rank the way
    datasets.TrainBatchSampler deals a global batch out (process r gets positions r, r + R, ...):
    the mask a sample gets does not depend on the number of processes, and a resumed run draws
    the same ones.
    """
    rng = np.random.default_rng([config.SEED, epoch, iteration, 7])
    noise = rng.random((global_batch, num_patches), dtype=np.float32)
    world = global_batch // local_batch
    return paddle.to_tensor(noise[rank::world][:local_batch])


def _amp_on(config):
    return bool(config.TRAIN.AMP and paddle.is_compiled_with_cuda())


def amp_context(config):
    """paddle.amp.auto_cast for TRAIN.AMP / AMP_LEVEL on GPU; a no-op in fp32 and on CPU."""
    if not _amp_on(config):
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype=config.TRAIN.AMP, level=config.TRAIN.AMP_LEVEL)


def prepare_amp(config, model, optimizer):
    """AMP O2 on GPU: weights cast to TRAIN.AMP in place (norm layers stay float32), AdamW
    keeps float32 master weights, checkpoints are saved in float32. Call after resuming, so the
    master weights come from the checkpoint. O1 and fp32: unchanged."""
    if _amp_on(config) and config.TRAIN.AMP_LEVEL == 'O2':
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level='O2',
                                               dtype=config.TRAIN.AMP, master_weight=True,
                                               save_dtype='float32')
    return model, optimizer


def train_one_epoch(model, loader, optimizer, epoch, config, logger, peak_lr, scaler=None,
                    mixup_fn=None, criterion=None, start_iter=0, save_fn=None):
    """One epoch of pre-training (MAE loss) or classification (fine-tune / linear probe).

    - lr follows optim.lr_at on the fractional epoch, set at each optimizer step;
    - gradients accumulate over TRAIN.ACCUM_ITER iterations (no all-reduce until the last);
    - every iteration re-seeds Python / NumPy / Paddle from (SEED, epoch, iteration, rank), so a
      run resumed at iteration start_iter continues exactly as an uninterrupted one;
    - save_fn(epoch, next_iter) is called every SAVE_FREQ_ITERS iterations (after a step).
    Returns {'train_loss': mean loss, 'lr': last lr}.
    """
    model.train()
    t = config.TRAIN
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = t.ACCUM_ITER
    num_iters = len(loader)
    distributed = isinstance(model, paddle.DataParallel)
    net = model._layers if distributed else model
    is_mae = t.MODE == 'pretrain'
    loss_sum, loss_count = 0.0, 0
    window_loss, window_n, window_start = 0.0, 0, time.time()
    lr = optimizer.get_lr()
    for it, batch in enumerate(loader, start=start_iter):
        if it % accum == 0:
            lr = optim.lr_at(epoch + it / num_iters, config, peak_lr)
            optimizer.set_lr(lr)
        utils.seed_everything(config.SEED, epoch, it, rank)
        images = batch[0]
        with amp_context(config):
            if is_mae:
                noise = masking_noise(config, epoch, it, images.shape[0] * world,
                                      net.patch_embed.num_patches, rank, images.shape[0])
                loss = model(images, mask_ratio=config.MODEL.MASK_RATIO, noise=noise)[0]
            else:
                targets = batch[1]
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                loss = criterion(model(images), targets)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f'loss is {loss_value} at epoch {epoch} iteration {it}: stopping. The last good '
                f'checkpoint is {config.OUTPUT}/latest.pdparams (resume with -resume auto after '
                f'lowering TRAIN.BASE_LR or setting TRAIN.GRAD_CLIP)')
        step_now = (it + 1) % accum == 0 or it + 1 == num_iters
        scaled = loss / accum
        if scaler is not None:
            scaled = scaler.scale(scaled)
        sync_ctx = model.no_sync() if distributed and not step_now else contextlib.nullcontext()
        with sync_ctx:
            scaled.backward()
        if step_now:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.clear_grad()
        loss_sum += loss_value
        loss_count += 1
        window_loss += loss_value
        window_n += 1
        if (it + 1) % config.REPORT_FREQ == 0 or it + 1 == num_iters:
            elapsed = time.time() - window_start
            avg = utils.all_reduce_mean(window_loss / window_n)
            ips = window_n * images.shape[0] * world / max(elapsed, 1e-9)
            per_iter = elapsed / window_n
            eta = per_iter * ((num_iters - it - 1) + (t.NUM_EPOCHS - epoch - 1) * num_iters)
            logger.info(f'epoch {epoch} [{it + 1}/{num_iters}] loss {avg:.4f} lr {lr:.3e} '
                        f'{ips:.1f} img/s eta {_hms(eta)}')
            logger.scalars(epoch * num_iters + it + 1, train_loss=avg, lr=lr)
            window_loss, window_n, window_start = 0.0, 0, time.time()
        if save_fn is not None and config.SAVE_FREQ_ITERS > 0 and step_now and \
                (it + 1) % config.SAVE_FREQ_ITERS == 0 and it + 1 < num_iters:
            save_fn(epoch, it + 1)
    stats = {'train_loss': utils.all_reduce_mean(loss_sum / max(loss_count, 1)), 'lr': lr}
    skipped = int(utils.all_reduce_sum([getattr(loader.dataset, 'num_skipped', 0)])[0])
    if skipped:  # DATA.ON_BAD_IMAGE skip
        stats['skipped_images'] = skipped
        logger.info(f'epoch {epoch}: {stats["skipped_images"]} unreadable image(s) skipped so '
                    f'far (DATA.ON_BAD_IMAGE skip)')
    return stats


@paddle.no_grad()
def evaluate(model, loader, config):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole eval set (under the
    config's AMP autocast).

    Sums are all-reduced, so with an eval sampler that gives each image to exactly one process,
    n counts every image once whatever the number of processes.
    """
    net = model._layers if isinstance(model, paddle.DataParallel) else model
    net.eval()
    sums = np.zeros(4)  # correct@1, correct@5, loss sum, count
    for batch in loader:
        images, labels = batch[0], batch[1]
        labels = labels.reshape([-1]).astype('int64')
        keep = labels.numpy() >= 0  # -1: an unreadable image replaced (ON_BAD_IMAGE skip)
        if not keep.any():
            continue
        with amp_context(config):
            logits = net(images)
        logits = logits.astype('float32')
        if not keep.all():
            idx = paddle.to_tensor(np.nonzero(keep)[0])
            logits, labels = paddle.gather(logits, idx), paddle.gather(labels, idx)
        loss = F.cross_entropy(logits, labels, reduction='sum')
        k = min(5, logits.shape[1])
        topk = paddle.topk(logits, k=k, axis=1)[1].numpy()
        lab = labels.numpy()[:, None]
        sums += [float((topk[:, :1] == lab).sum()), float((topk == lab).any(1).sum()),
                 float(loss), len(lab)]
    sums = utils.all_reduce_sum(sums)
    n = int(round(sums[3]))
    return {'val_acc1': 100.0 * sums[0] / max(n, 1), 'val_acc5': 100.0 * sums[1] / max(n, 1),
            'val_loss': sums[2] / max(n, 1), 'n': n}


def _hms(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def fit(config, model, optimizer, train_loader, logger, val_loader=None, mixup_fn=None,
        criterion=None, scaler=None):
    """The epoch loop all three stages share: resume, train, validate, log, checkpoint.

    log.txt gets one JSON object per epoch; latest.* is written after every epoch (and every
    SAVE_FREQ_ITERS iterations), epoch_{N}.pdparams every SAVE_FREQ epochs and at the end.
    """
    world = dist.get_world_size()
    peak = optim.peak_lr(config, world)
    start_epoch, start_iter, best = 0, 0, None
    prefix = config.MODEL.RESUME
    if prefix == 'auto':
        prefix = utils.find_resume_checkpoint(config.OUTPUT)
        if prefix is None:
            logger.info(f'resume auto: no checkpoint in {config.OUTPUT}, starting from scratch')
    elif prefix:
        prefix = prefix[:-9] if prefix.endswith('.pdparams') else prefix
        prefix = prefix[:-6] if prefix.endswith('.pdopt') else prefix
    if prefix:
        state = utils.resume(prefix, model, optimizer, scaler)
        start_epoch, start_iter, best = state['epoch'], state['iter'], state.get('best_acc1')
        logger.info(f'resumed from {prefix}: epoch {start_epoch}, iteration {start_iter}')
        _truncate_log(config.OUTPUT, start_epoch)
    model, optimizer = prepare_amp(config, model, optimizer)
    net = model
    if world > 1:
        model = paddle.DataParallel(model)
    logger.info(f'{config.TRAIN.MODE}: {world} process(es) x batch {config.DATA.BATCH_SIZE} x '
                f'accum {config.TRAIN.ACCUM_ITER} = effective batch '
                f'{optim.effective_batch(config, world)}, peak lr {peak:.3e}, '
                f'{len(train_loader)} iterations/epoch')

    def save(epoch, next_iter, epoch_copy=None):
        utils.save_checkpoint(config.OUTPUT, net, optimizer,
                              {'epoch': epoch, 'iter': next_iter, 'best_acc1': best},
                              scaler, epoch_copy)

    for epoch in range(start_epoch, config.TRAIN.NUM_EPOCHS):
        start = time.time()
        train_loader.batch_sampler.set_epoch(epoch, start_iter)
        stats = train_one_epoch(model, train_loader, optimizer, epoch, config, logger, peak,
                                scaler=scaler, mixup_fn=mixup_fn, criterion=criterion,
                                start_iter=start_iter, save_fn=save)
        start_iter = 0
        record = {'epoch': epoch, **stats}
        last = epoch + 1 == config.TRAIN.NUM_EPOCHS
        if val_loader is not None and ((epoch + 1) % config.VALIDATE_FREQ == 0 or last):
            val = evaluate(model, val_loader, config)
            best = max(best or 0.0, val['val_acc1'])
            record.update({k: val[k] for k in ('val_acc1', 'val_acc5', 'val_loss')})
            logger.info(f'epoch {epoch} val: acc1 {val["val_acc1"]:.2f} acc5 '
                        f'{val["val_acc5"]:.2f} loss {val["val_loss"]:.4f} on {val["n"]} images '
                        f'(best acc1 {best:.2f})')
        record['epoch_time_s'] = round(time.time() - start, 1)
        logger.epoch(record)
        logger.scalars(epoch, **{k: v for k, v in record.items() if k != 'epoch'})
        keep = epoch + 1 if ((epoch + 1) % config.SAVE_FREQ == 0 or last) else None
        save(epoch + 1, 0, keep)
    logger.close()
    return best


def _truncate_log(output_dir, first_epoch):
    """Drop log.txt lines of epochs that will be trained again after a resume."""
    import json
    import os
    path = os.path.join(output_dir, 'log.txt')
    if not utils.is_main_process() or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get('epoch', -1) < first_epoch]
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(lines)
    os.replace(tmp, path)


def build_scaler(config):
    """GradScaler for float16 AMP on GPU; None otherwise (fp32, bfloat16, CPU)."""
    if config.TRAIN.AMP == 'float16' and paddle.is_compiled_with_cuda():
        return paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16)
    return None


def evaluate_only(model, val_loader, config):
    """-eval: evaluate MODEL.PRETRAINED and print the result as one JSON line (main process)."""
    import json
    if not config.MODEL.PRETRAINED:
        raise utils.UserError('-eval needs the weights to evaluate: -pretrained FILE.pdparams')
    result = evaluate(model, val_loader, config)
    if utils.is_main_process():
        print(json.dumps(result), flush=True)
    return result
