"""The one training loop all tasks share: fit() loops epochs (resume, train, validate, log,
checkpoint), train_one_epoch() steps through one epoch, evaluate_only() is -eval (cli.py
assembles a stage from its task and calls them). Nothing here branches on TRAIN.MODE: the task
computes the losses, evaluates and names the metric that picks the best checkpoint.
"""
import contextlib
import json
import math
import os
import signal
import time

import paddle
import paddle.distributed as dist

import checkpoint
import optim
import utils


class NonFiniteLoss(utils.UserError):
    """Training diverged; the message says where and which checkpoint is the last good one."""


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) during fit(): remembered, not
    acted on at once, so the loop can finish the optimizer step (or the validation batch) it is
    in, save and stop. requested() agrees over all processes (an all-reduce), so they stop at
    the same step; `signum` is this process's own note (read without a collective)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame):
        if self.signum:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self):
        """-> the signal number (the largest over processes), 0 when none arrived."""
        if dist.get_world_size() == 1:
            return self.signum
        return int(utils.all_reduce_max(self.signum))


def prepare_amp(config, model, optimizer):
    """AMP O2 on GPU: weights cast to TRAIN.AMP in place (norm layers stay float32), AdamW
    keeps float32 master weights, checkpoints are saved in float32. Call after resuming, so the
    master weights come from the checkpoint. O1 and fp32: unchanged."""
    if utils.amp_on(config) and config.TRAIN.AMP_LEVEL == 'O2':
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level='O2',
                                               dtype=config.TRAIN.AMP, master_weight=True,
                                               save_dtype='float32')
    return model, optimizer


def train_one_epoch(task, model, loader, optimizer, epoch, config, logger, peak_lr, scaler=None,
                    start_iter=0, save_fn=None, stop=None):
    """One epoch of the task's training loss.

    - lr follows optim.lr_at on the fractional epoch, set at each optimizer step;
    - gradients accumulate over TRAIN.ACCUM_ITER iterations (no all-reduce until the last);
    - every iteration re-seeds Python / NumPy / Paddle from (SEED, epoch, iteration, rank), so a
      run resumed at iteration start_iter continues exactly as an uninterrupted one;
    - save_fn(epoch, next_iter) is called every SAVE_FREQ_ITERS iterations (after a step);
    - stop (StopRequests): after an optimizer step that follows SIGINT / SIGTERM, save_fn saves
      and utils.Stopped is raised.
    Returns {'train_loss': mean loss, 'train_<part>': mean of each other named loss of the
    task, 'lr': last lr} (+ 'skipped_images' when DATA.ON_BAD_IMAGE skip replaced some).
    """
    model.train()
    num_iters = len(loader)
    rank = dist.get_rank()
    metrics = utils.MetricLogger()
    lr = optimizer.get_lr()
    for it, batch in enumerate(loader, start=start_iter):
        if it % config.TRAIN.ACCUM_ITER == 0:
            lr = optim.lr_at(epoch + it / num_iters, config, peak_lr)
            optimizer.set_lr(lr)
        utils.seed_everything(config.SEED, epoch, it, rank)
        with utils.amp_context(config):
            losses = task.loss(model, batch, epoch)
        values = {name: float(v) for name, v in losses.items()}
        if not math.isfinite(values['loss']):
            raise _diverged(config, values['loss'], epoch, it)
        step_now = _backward(losses['loss'], model, optimizer, scaler, config, it, num_iters)
        metrics.update(**values)
        if (it + 1) % config.REPORT_FREQ == 0 or it + 1 == num_iters:
            _report(metrics, logger, lr, epoch, it, num_iters, batch[0].shape[0], config)
        if save_fn is not None and config.SAVE_FREQ_ITERS > 0 and step_now and \
                (it + 1) % config.SAVE_FREQ_ITERS == 0 and it + 1 < num_iters:
            save_fn(epoch, it + 1)
        if stop is not None and step_now and it + 1 < num_iters and stop.requested():
            save_fn(epoch, it + 1)
            raise _stopped(stop, config, f'epoch {epoch} iteration {it + 1}')
    stats = {_train_name(k): v for k, v in metrics.epoch().items()}
    stats['lr'] = lr
    skipped = int(utils.all_reduce_sum([loader.dataset.num_skipped])[0])
    if skipped:  # DATA.ON_BAD_IMAGE skip
        stats['skipped_images'] = skipped
        logger.info(f'epoch {epoch}: {skipped} unreadable image(s) skipped so far '
                    f'(DATA.ON_BAD_IMAGE skip)')
    return stats


def _train_name(loss_name):
    """'loss' -> 'train_loss', 'loss_decode' -> 'train_loss_decode' (log.txt, VisualDL)."""
    return 'train_' + loss_name


def _backward(loss, model, optimizer, scaler, config, it, num_iters):
    """Backward of loss / ACCUM_ITER; an optimizer step at the last iteration of each
    accumulation (gradients synchronised then only). Returns whether it stepped."""
    step_now = (it + 1) % config.TRAIN.ACCUM_ITER == 0 or it + 1 == num_iters
    scaled = loss / config.TRAIN.ACCUM_ITER
    if scaler is not None:
        scaled = scaler.scale(scaled)
    in_sync = step_now or not isinstance(model, paddle.DataParallel)
    with contextlib.nullcontext() if in_sync else model.no_sync():
        scaled.backward()
    if step_now:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.clear_grad()
    return step_now


def _report(metrics, logger, lr, epoch, it, num_iters, batch_size, config):
    """One progress line (losses of the window, lr, speed, eta) and the VisualDL scalars."""
    means, count, seconds = metrics.window()
    ips = count * batch_size * dist.get_world_size() / max(seconds, 1e-9)
    eta = seconds / count * ((num_iters - it - 1) + (config.TRAIN.NUM_EPOCHS - epoch - 1) *
                             num_iters)
    losses = ' '.join(f'{k} {v:.4f}' for k, v in means.items())
    logger.info(f'epoch {epoch} [{it + 1}/{num_iters}] {losses} lr {lr:.3e} '
                f'{ips:.1f} img/s eta {_hms(eta)}')
    logger.scalars('iter', epoch * num_iters + it + 1, lr=lr,
                   **{_train_name(k): v for k, v in means.items()})


def _diverged(config, value, epoch, it):
    latest = os.path.join(config.OUTPUT, 'latest.pdparams')
    good = (f'The last good checkpoint is {latest} (resume with -resume auto after lowering '
            f'TRAIN.BASE_LR or setting TRAIN.GRAD_CLIP)' if os.path.exists(latest) else
            'No checkpoint was saved yet: start again with a lower TRAIN.BASE_LR or with '
            'TRAIN.GRAD_CLIP set')
    return NonFiniteLoss(f'loss is {value} at epoch {epoch} iteration {it}: stopping. {good}')


def _hms(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def fit(config, task, model, optimizer, train_loader, logger, val_loader=None, scaler=None,
        resumed=None, resumed_from=None):
    """The epoch loop all tasks share: train, validate, log, checkpoint; from the training
    state `resumed` (checkpoint.resume's, already loaded into model / optimizer / scaler; read
    from the checkpoint prefix `resumed_from`) or from the start.

    log.txt gets one JSON object per epoch (with the task's metrics when it validates);
    latest.* is written after every epoch (and every SAVE_FREQ_ITERS iterations),
    epoch_{N}.pdparams after epoch N (N as in log.txt) every SAVE_FREQ epochs and at the end,
    best.pdparams whenever the task's best_metric reaches a new best. SIGINT / SIGTERM during a
    validation stops it: the checkpoint then holds the trained epoch with its validation to
    do ('pending_validation': the epoch's record), which a resume does first. Ends with a
    summary. Returns the best value of the task's best_metric (None when it does not
    evaluate).
    """
    world = dist.get_world_size()
    peak = optim.peak_lr(config, world)
    start_epoch, start_iter = (resumed['epoch'], resumed['iter']) if resumed else (0, 0)
    pending = (resumed or {}).get('pending_validation')
    best = Best(task.best_metric, resumed)
    checkpoint.remove_temporary(config.OUTPUT)  # what a save cut short (disk full, kill) left
    if resumed:
        logger.truncate(start_epoch - 1 if pending else start_epoch)
    model, optimizer = prepare_amp(config, model, optimizer)
    net = model
    if world > 1:
        model = paddle.DataParallel(model)
    logger.info(f'{task.mode}: {world} process(es) x batch {config.DATA.BATCH_SIZE} x '
                f'accum {config.TRAIN.ACCUM_ITER} = effective batch '
                f'{optim.effective_batch(config, world)}, peak lr {peak:.3e}, '
                f'{len(train_loader)} iterations/epoch')
    logger.info('data: ' + ', '.join(
        f'{what} {len(loader.dataset)} images ({_origin(loader.dataset)})'
        for what, loader in (('train', train_loader), ('val', val_loader)) if loader is not None))
    meta = checkpoint.run_meta(config, train_loader.dataset.classes)
    plan = _data_plan(train_loader.dataset, resumed, start_epoch, start_iter, logger)

    def save(epoch, next_iter, copies=(), pending=None):
        state = {'epoch': epoch, 'iter': next_iter, 'data_plan': plan, **best.state()}
        if pending is not None:
            state['pending_validation'] = pending
        checkpoint.save_checkpoint(config.OUTPUT, net, optimizer, state, scaler, copies, meta)

    def end_epoch(epoch, record, started):
        """Validate (when due), log, checkpoint: the end of a trained epoch. A stop requested
        during the validation saves the epoch with its validation pending and raises."""
        last = epoch + 1 == config.TRAIN.NUM_EPOCHS
        copies = []
        if val_loader is not None and ((epoch + 1) % config.VALIDATE_FREQ == 0 or last):
            logger.info(f'epoch {epoch} val: validating {len(val_loader.dataset)} images')
            metrics = task.evaluate(model, _Progress(val_loader, logger, f'epoch {epoch} val',
                                                     stop=stop, final=False))
            if stop.requested():  # (the metrics of a validation cut short are dropped)
                save(epoch + 1, 0, pending=dict(record, epoch_time_s=time.time() - started))
                raise _stopped(stop, config, f'the validation after epoch {epoch} (cut short: it '
                                             f'runs again on resume)')
            if best.update(metrics, epoch):
                copies.append('best')
            record.update({k: v for k, v in metrics.items() if k != 'n'})
            logger.info(f'epoch {epoch} val: {task.describe(metrics)} '
                        f'(best {task.best_metric} {best.value:.2f})')
        record['epoch_time_s'] = round(time.time() - started, 1)
        logger.epoch(record)
        if (epoch + 1) % config.SAVE_FREQ == 0 or last:
            copies.append(f'epoch_{epoch}')
        save(epoch + 1, 0, copies)
        if not last and stop.requested():
            raise _stopped(stop, config, f'the end of epoch {epoch}')

    with StopRequests() as stop:
        if pending:  # trained before a stop cut its validation short: validate it now
            record = dict(pending)
            end_epoch(start_epoch - 1, record, time.time() - record.pop('epoch_time_s', 0))
        for epoch in range(start_epoch, config.TRAIN.NUM_EPOCHS):
            start = time.time()
            train_loader.set_epoch(epoch, start_iter)
            record = {'epoch': epoch, **train_one_epoch(
                task, model, train_loader, optimizer, epoch, config, logger, peak,
                scaler=scaler, start_iter=start_iter, save_fn=save, stop=stop)}
            start_iter = 0
            end_epoch(epoch, record, start)
    _summary(config, task, best, logger, resumed_from)
    logger.close()
    return best.value


def _origin(dataset):
    """Where a data source reads from, for the log: its list file, shards or folder."""
    shards = getattr(dataset, 'shards', None)
    if shards:
        return f'{len(shards)} shard(s): {shards[0]}' + (' ...' if len(shards) > 1 else '')
    return getattr(dataset, 'list_file', None) or getattr(dataset, 'root', None) or \
        type(dataset).__name__


def finished(config, resumed, prefix, logger):
    """A resume of a run that has nothing left to train (every epoch of TRAIN.NUM_EPOCHS done,
    no validation pending): says so, naming the run's checkpoints, and returns True (nothing
    is written); else False."""
    if not resumed or resumed['epoch'] < config.TRAIN.NUM_EPOCHS or resumed['iter'] or \
            resumed.get('pending_validation'):
        return False
    folder = os.path.dirname(prefix) or '.'
    files = [f for f in ('latest.pdparams (+ .pdopt)', 'best.pdparams') if os.path.isfile(
        os.path.join(folder, f.split()[0]))] + _epoch_copies(folder)
    value = resumed.get('best', resumed.get('best_acc1'))
    best = (f'; best {resumed.get("best_metric") or "val_acc1"} {value:.2f} after epoch '
            f'{resumed.get("best_epoch")}' if value is not None else '')
    same = os.path.abspath(folder) == os.path.abspath(config.OUTPUT)
    logger.info(f'nothing to train: {prefix} ends a finished run ({resumed["epoch"]} of '
                f'TRAIN.NUM_EPOCHS {config.TRAIN.NUM_EPOCHS} epochs){best}; its checkpoints in '
                f'{folder}: {", ".join(files)}; nothing was written'
                f'{"" if same else " to " + config.OUTPUT} (to train longer, raise '
                f'TRAIN.NUM_EPOCHS)')
    return True


class Best:
    """The best value of the task's metric so far (higher is better) and its epoch; carried
    through checkpoints, so a resumed run keeps it."""

    def __init__(self, metric, resumed=None):
        self.metric = metric
        resumed = resumed or {}
        self.value = resumed.get('best', resumed.get('best_acc1'))
        self.epoch = resumed.get('best_epoch')

    def update(self, metrics, epoch):
        """-> whether metrics hold a new best."""
        value = metrics[self.metric]
        if self.value is None or value > self.value:
            self.value, self.epoch = value, epoch
            return True
        return False

    def state(self):
        return {'best': self.value, 'best_epoch': self.epoch, 'best_metric': self.metric}


def _data_plan(dataset, resumed, start_epoch, start_iter, logger):
    """A streamed source's plan of an epoch (DataSource.plan), saved with checkpoints: a
    mid-epoch resume under another plan cannot continue that epoch exactly, which is said."""
    plan = dataset.plan()
    plan = list(plan) if plan else None
    if resumed and start_iter and plan and resumed.get('data_plan') not in (None, plan):
        logger.info(f'warning: epoch {start_epoch} began with (processes, loader workers, '
                    f'batch) = {tuple(resumed["data_plan"])} over streamed shards and goes on '
                    f'with {tuple(plan)}: the rest of it is planned anew, so some of its samples'
                    f' may be seen twice or not at all (later epochs are not affected)')
    return plan


def _epoch_copies(folder):
    """The epoch_{N}.pdparams of a run folder, in epoch order."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((f for f in names if f.startswith('epoch_') and f.endswith('.pdparams')),
                  key=lambda f: int(f[6:].split('.')[0]))


def _summary(config, task, best, logger, resumed_from=None):
    """The end of a run: where its checkpoints are, and the best metric with its epoch (its
    weights in the run resumed from when no new best came after the resume)."""
    out = config.OUTPUT
    copies = _epoch_copies(out)
    lines = [f'done: {config.TRAIN.NUM_EPOCHS} epochs; last checkpoint {out}/latest.pdparams'
             f' (+ .pdopt)']
    if best.value is not None:
        where = [os.path.join(d, 'best.pdparams') for d in
                 [out] + ([os.path.dirname(resumed_from) or '.'] if resumed_from else [])]
        where = [w for w in where if os.path.isfile(w)][:1]
        lines.append(f'best {task.best_metric} {best.value:.2f} after epoch {best.epoch}'
                     + (f': {where[0]}' if where else ''))
    if copies:
        lines.append(f'kept: {", ".join(copies)}; log: {out}/log.txt')
    logger.info('; '.join(lines))


def _stopped(stop, config, where):
    name = signal.Signals(stop.signum).name
    return utils.Stopped(f'{name} at {where}: saved {config.OUTPUT}/latest.pdparams; go on with '
                         f'the same command and -resume auto', stop.signum)


def build_scaler(config):
    """GradScaler for float16 AMP on GPU; None otherwise (fp32, bfloat16, CPU)."""
    if config.TRAIN.AMP == 'float16' and paddle.is_compiled_with_cuda():
        return paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16)
    return None


PROGRESS_SECONDS = 5.0  # evaluation: a progress line at most this often


class _Progress:
    """Iterates a loader, logging 'what [batch/batches] images, img/s, eta' after the first
    batch, then every PROGRESS_SECONDS (and after the last batch when final). stop
    (StopRequests): once a signal was noted in this process, the iteration ends after the
    batch in hand (no collective here: processes may hold different numbers of batches)."""

    def __init__(self, loader, logger, what, stop=None, final=True):
        self.loader, self.logger, self.what = loader, logger, what
        self.stop, self.final = stop, final

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        n = len(self.loader)
        start = last = time.time()
        images = 0
        batches = iter(self.loader)
        try:
            for i, batch in enumerate(batches, 1):
                images += len(batch[0])
                yield batch
                now = time.time()
                if i == 1 or now - last >= PROGRESS_SECONDS or (self.final and i == n):
                    last = now
                    rate = images / max(now - start, 1e-9)
                    eta = (now - start) / i * (n - i)
                    self.logger.info(f'{self.what} [{i}/{n}] {images} images, {rate:.1f} img/s,'
                                     f' eta {_hms(eta)}')
                if self.stop is not None and self.stop.signum:
                    return
        finally:
            close = getattr(batches, 'close', None)
            if close is not None:  # (a loader's workers stop now, not when collected)
                close()


def evaluate_only(task, model, val_loader, config, logger):
    """-eval: evaluate MODEL.PRETRAINED and print the result as one JSON line on stdout (main
    process), which holds nothing else: progress and logs go to stderr."""
    if not config.MODEL.PRETRAINED:
        raise utils.UserError('-eval needs the weights to evaluate: -pretrained FILE.pdparams')
    logger.info(f'eval: {len(val_loader.dataset)} images ({_origin(val_loader.dataset)})')
    result = task.evaluate(model, _Progress(val_loader, logger, 'eval'))
    if utils.is_main_process():
        print(json.dumps(result), flush=True)
    return result
