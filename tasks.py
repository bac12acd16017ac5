"""Tasks: what each TRAIN.MODE trains and measures, in one place.

get_task(config) looks TRAIN.MODE up once and gives an object that
  - builds the model (with its head, and with what the task freezes frozen): build_model();
  - builds its transform and its training / evaluation data (the source the config points at,
    sources.py): build_transform(is_train), build_dataset(is_train);
  - loads MODEL.PRETRAINED into it: load_pretrained();
  - computes the losses of a training batch, by name: loss(model, batch, epoch) -> {'loss': ...};
  - evaluates: evaluate(model, loader) -> dict of metrics (with 'n', the images counted);
  - names the metric that picks the best checkpoint: best_metric (None: no evaluation);
  - says what its data pipeline needs: needs_labels, single_draw_crop, data_kind.
The engine, the entry points and the tools ask the task; none of them branches on TRAIN.MODE.
Adding a task is a class here (registered in TASKS and in config.CHOICES['TRAIN.MODE']), a
config and a thin main_multi_gpu_<mode>.py.

Batches are (images float32 [B, 3, H, W], labels int64 [B], sample ids int64 [B]): see
datasets.py. Masks in pre-training are a property of the sample (DINOv2's habit): the noise
of a sample is drawn from (SEED, epoch, sample id), whatever the data source, the batch it
lands in, the number of processes or a resume.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

import checkpoint
import mixup
import seg_data
import seg_inference
import seg_transforms
import segmentation
import sources
import transformer
import transforms
import utils
from config import ConfigError


def unwrap(model):
    """The network inside paddle.DataParallel (or the model itself)."""
    return model._layers if isinstance(model, paddle.DataParallel) else model


def masking_noise(seed, epoch, sample_ids, num_patches):
    """MAE's uniform masking noise (N, L) float32 for a batch: row i from (seed, epoch,
    sample_ids[i]) only, so a sample gets the same mask in any batch, on any process."""
    rows = [utils.rng(seed, epoch, int(i), 'mask').random(num_patches, dtype=np.float32)
            for i in np.asarray(sample_ids).reshape(-1)]
    return np.stack(rows)


class Task:
    """The interface; subclasses set the class attributes and implement loss / evaluate."""
    mode = None
    model_prefix = None       # MODEL.NAME must start with it ('mae_' or 'vit_')
    best_metric = None        # evaluate()'s key that picks the best checkpoint (higher is better)
    needs_labels = True       # the training set must be labelled
    single_draw_crop = False  # training crop: one draw, no retries (official linear probe)
    head_init_std = 2e-5      # trunc-normal std of a classifier head initialised fresh
    reinit = ('head.',)       # parameter-name prefixes initialised afresh, not pre-trained
    data_kind = 'classification'  # the samples its data sources give (sources.py)

    def __init__(self, config):
        self.config = config

    @property
    def evaluates(self):
        return self.best_metric is not None

    def check_model_name(self):
        """MODEL.NAME must be a model of this task's kind (model_prefix), else ConfigError."""
        name, mode = self.config.MODEL.NAME, self.config.TRAIN.MODE
        if not name.startswith(self.model_prefix):
            raise ConfigError(f'MODEL.NAME {name!r} does not fit TRAIN.MODE {mode!r}: '
                              f'pre-training uses an mae_* model, fine-tuning and linear probing '
                              f'a vit_* model')

    def build_model(self):
        """The network of the config (transformer.build_from_config) as this task trains it."""
        self.check_model_name()
        return transformer.build_from_config(self.config)

    def build_transform(self, is_train):
        """The image transform of its samples (transforms.py; the crop the task trains with)."""
        return transforms.build_transform(is_train, self.config,
                                          single_draw_crop=self.single_draw_crop)

    def build_dataset(self, is_train):
        """The training or evaluation dataset of the config's data source (sources.py: tar
        shards, list files, class folders, ...), with the task's transform; labels required
        except for a training set of a task that needs none."""
        return sources.build_dataset(self.config, is_train, self.build_transform(is_train),
                                     need_labels=not is_train or self.needs_labels,
                                     kind=self.data_kind)

    def load_pretrained(self, model, path, log=print, eval_only=False):
        """MODEL.PRETRAINED into the model: everything but `reinit` must fit; under -eval
        (eval_only) everything must."""
        return checkpoint.load_pretrained(model, path, log, reinit=self.reinit,
                                          eval_only=eval_only, head_init_std=self.head_init_std)

    def loss(self, model, batch, epoch):
        """The training losses of one batch, by name (model may be wrapped in
        paddle.DataParallel): 'loss' is what is optimised; other entries (its parts) are
        logged beside it. Scalar tensors."""
        raise NotImplementedError

    def evaluate(self, model, loader):
        """-> dict of metrics over the whole loader, summed over all processes, with 'n'."""
        raise NotImplementedError

    def describe(self, metrics):
        """One line for the log from evaluate()'s dict."""
        return ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())

    def synthetic_batch(self, batch):
        """A training batch of random data in this task's layout (tools/benchmark.py)."""
        size = self.config.DATA.IMAGE_SIZE
        return (paddle.randn([batch, 3, size, size]),
                paddle.randint(0, self.config.MODEL.NUM_CLASSES, [batch]), paddle.arange(batch))


class Pretrain(Task):
    """MAE pre-training: masked patches reconstructed; no labels, no evaluation."""
    mode = 'pretrain'
    model_prefix = 'mae_'
    needs_labels = False
    reinit = ('decoder_', 'mask_token')  # an encoder-only checkpoint: a fresh decoder

    def loss(self, model, batch, epoch):
        images, ids = batch[0], batch[2]
        noise = masking_noise(self.config.SEED, epoch, ids.numpy(),
                              unwrap(model).patch_embed.num_patches)
        loss = model(images, mask_ratio=self.config.MODEL.MASK_RATIO,
                     noise=paddle.to_tensor(noise))[0]
        return {'loss': loss}


class Finetune(Task):
    """Fine-tuning: the whole ViT classifier trains (mixup / cutmix / smoothing as configured);
    evaluation is top-1 / top-5 accuracy and cross-entropy."""
    mode = 'finetune'
    model_prefix = 'vit_'
    best_metric = 'val_acc1'
    reinit = ('head.', 'fc_norm.')  # as the official main_finetune's expected missing keys

    def __init__(self, config):
        super().__init__(config)
        self.mixup_fn = self._mixup()
        self.criterion = mixup.build_criterion(config)

    def _mixup(self):
        return mixup.build_mixup(self.config)

    def loss(self, model, batch, epoch):
        images, targets = batch[0], batch[1]
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return {'loss': self.criterion(model(images), targets)}

    @paddle.no_grad()
    def evaluate(self, model, loader):
        """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole eval set (under the
        config's AMP autocast).

        Sums are all-reduced, so with an eval sampler that gives each image to exactly one
        process, n counts every image once whatever the number of processes.
        """
        net = unwrap(model)
        net.eval()
        sums = np.zeros(4)  # correct@1, correct@5, loss sum, count
        for batch in loader:
            images, labels = batch[0], batch[1]
            labels = labels.reshape([-1]).astype('int64')
            keep = labels.numpy() >= 0  # -1: an unreadable image replaced (ON_BAD_IMAGE skip)
            if not keep.any():
                continue
            with utils.amp_context(self.config):
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

    def describe(self, metrics):
        return (f'acc1 {metrics["val_acc1"]:.2f} acc5 {metrics["val_acc5"]:.2f} loss '
                f'{metrics["val_loss"]:.4f} on {metrics["n"]} images')


class LinearProbe(Finetune):
    """Official linear probe: BatchNorm (no affine) + Linear head on the frozen encoder's cls
    token, the single-draw crop, no mixup; head std 0.01."""
    mode = 'linearprobe'
    single_draw_crop = True
    head_init_std = 0.01
    reinit = ('head.',)

    def _mixup(self):
        return None

    def build_model(self):
        model = transformer.add_linear_probe_head(super().build_model())
        for p in model.parameters():
            p.stop_gradient = True
        for layer in model.head.sublayers(include_self=True):
            if isinstance(layer, paddle.nn.Linear):  # (BatchNorm statistics are not trained)
                for p in layer.parameters(include_sublayers=False):
                    p.stop_gradient = False
        return model


class Segmentation(Task):
    """Semantic segmentation (DESIGN.md 3.4): UperNet + auxiliary FCN head on the encoder
    (segmentation.py); loss = cross-entropy of the decode head + AUX_WEIGHT x that of the
    auxiliary head; evaluation by sliding window, with mIoU / mAcc / aAcc over the whole set.

    Batches: training (images [B, 3, S, S], label maps int64 [B, S, S], ids); evaluation
    (list of images of their own sizes, list of label maps at the original size, ids), see
    seg_data.py.
    """
    mode = 'segmentation'
    model_prefix = 'vit_'
    best_metric = 'mIoU'
    # fresh: the neck and the heads; the relative position tables when the checkpoint has none
    # (MAE pre-training and classifiers: zero, as BEiT / the MAE paper's transfer start them)
    reinit = ('neck.', 'decode_head.', 'auxiliary_head.', '*.relative_position_bias_table')

    data_kind = 'segmentation'

    def build_model(self):
        self.check_model_name()
        model = segmentation.build_segmentor(self.config)
        if paddle.distributed.get_world_size() > 1 and paddle.is_compiled_with_cuda():
            # batch 2 per GPU: BatchNorm statistics over all GPUs, as the recipe's SyncBN
            model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def build_transform(self, is_train):
        """Image and label map together (seg_transforms.py, the ADE20K recipe)."""
        return seg_transforms.build_seg_transform(is_train, self.config)

    def build_dataset(self, is_train):
        if self.config.DATA.TRAIN_SHARDS or self.config.DATA.VAL_SHARDS:
            raise ConfigError('DATA.TRAIN_SHARDS / VAL_SHARDS (tar shards) hold classification '
                              'samples; segmentation reads ADE20K folders or PaddleSeg lists')
        return super().build_dataset(is_train)

    def load_pretrained(self, model, path, log=print, eval_only=False):
        """An encoder (MAE pre-training, fine-tuned, converted official) into `backbone.`, its
        pos_embed interpolated to the crop's grid; or a whole segmentor's checkpoint."""
        return checkpoint.load_pretrained(model, path, log, reinit=self.reinit,
                                          eval_only=eval_only, prefix='backbone.')

    def pixel_loss(self, logits, labels):
        """Cross-entropy of logits upsampled (bilinear) to the label map, summed over the
        labelled pixels and divided by all pixels: mmsegmentation's CrossEntropyLoss default
        (avg_non_ignore False), which the recipe trained with."""
        logits = F.interpolate(logits.astype('float32'), size=labels.shape[-2:],
                               mode='bilinear', align_corners=False)
        loss = F.cross_entropy(logits, labels.unsqueeze(1), reduction='none', axis=1,
                               ignore_index=self.config.DATA.IGNORE_INDEX)
        return loss.mean()

    def loss(self, model, batch, epoch):
        images, labels = batch[0], batch[1].astype('int64')
        logits, aux_logits = model(images)
        decode = self.pixel_loss(logits, labels)
        weight = self.config.MODEL.SEGMENTATION.AUX_WEIGHT
        if not weight:
            return {'loss': decode, 'loss_decode': decode}
        aux = weight * self.pixel_loss(aux_logits, labels)  # (weighted, as mmsegmentation logs it)
        return {'loss': decode + aux, 'loss_decode': decode, 'loss_aux': aux}

    @paddle.no_grad()
    def evaluate(self, model, loader):
        """mIoU / mAcc / aAcc (%) over the whole evaluation set, mmsegmentation's IoUMetric:
        each image's logits by sliding windows of DATA.IMAGE_SIZE (MODEL.SEGMENTATION.
        SLIDE_STRIDE), resized (bilinear) to the image's original size, argmax; intersections,
        unions and areas summed over all images and processes, then divided. Classes absent
        from both prediction and labels are left out of mIoU (NaN in mmseg), classes absent from
        the labels out of mAcc. Returns also 'IoU': {class name: IoU % or None}."""
        net = unwrap(model)
        net.eval()
        c = self.config
        num_classes = c.MODEL.NUM_CLASSES
        predict = seg_inference.model_predictor(net, c)
        areas, n = np.zeros((4, num_classes)), 0
        for images, labels, ids in loader:
            for img, label, i in zip(images, labels, np.asarray(ids).reshape(-1)):
                if int(i) < 0:  # an unreadable image replaced (ON_BAD_IMAGE skip)
                    continue
                label = np.asarray(label)
                pred = seg_inference.predict_label_map(predict, np.asarray(img, np.float32),
                                                      label.shape, c)
                areas += segmentation_areas(pred, label, num_classes, c.DATA.IGNORE_INDEX)
                n += 1
        total = utils.all_reduce_sum(np.concatenate([areas.ravel(), [n]]))
        areas, n = total[:-1].reshape(4, num_classes), int(round(total[-1]))
        scores, iou, _ = segmentation_scores(areas)
        names = seg_data.class_names(c)
        scores['n'] = n
        scores['IoU'] = {name: (None if np.isnan(v) else round(100.0 * float(v), 2))
                         for name, v in zip(names, iou)}
        return scores

    def synthetic_batch(self, batch):
        size = self.config.DATA.IMAGE_SIZE
        return (paddle.randn([batch, 3, size, size]),
                paddle.randint(0, self.config.MODEL.NUM_CLASSES, [batch, size, size]),
                paddle.arange(batch))

    def describe(self, metrics):
        head = (f'mIoU {metrics["mIoU"]:.2f} mAcc {metrics["mAcc"]:.2f} aAcc '
                f'{metrics["aAcc"]:.2f} on {metrics["n"]} images')
        per_class = metrics.get('IoU') or {}
        if not per_class:
            return head
        width = max(len(k) for k in per_class)
        rows = [f'  {name:<{width}}  ' + ('   -  ' if v is None else f'{v:6.2f}')
                for name, v in per_class.items()]
        return '\n'.join([head, f'  {"class":<{width}}  IoU %'] + rows)


def segmentation_areas(pred, label, num_classes, ignore_index):
    """mmsegmentation's intersect_and_union for one image -> float64 (4, num_classes): areas
    (pixels) of intersection, union, prediction and label per class, over the pixels whose label
    is not ignore_index (labels are checked to be < num_classes when read)."""
    keep = label != ignore_index
    p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    inter = np.bincount(p[p == t], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_t = np.bincount(t, minlength=num_classes)[:num_classes]
    return np.stack([inter, area_p + area_t - inter, area_p, area_t]).astype(np.float64)


def segmentation_scores(areas):
    """Summed areas (segmentation_areas) -> ({'mIoU', 'mAcc', 'aAcc'} in %, IoU, Acc per
    class with NaN where undefined), as mmsegmentation's IoUMetric.compute_metrics (its nanmean,
    without its rounding to 2 decimals)."""
    inter, union, _, area_t = areas
    with np.errstate(divide='ignore', invalid='ignore'):
        iou, acc = inter / union, inter / area_t
        aacc = inter.sum() / area_t.sum()
    mean = (lambda v: float(np.nanmean(v)) * 100.0 if np.isfinite(v).any() else float('nan'))
    return {'mIoU': mean(iou), 'mAcc': mean(acc), 'aAcc': float(aacc) * 100.0}, iou, acc


TASKS = {cls.mode: cls for cls in (Pretrain, Finetune, LinearProbe, Segmentation)}


def get_task(config):
    """The task of config.TRAIN.MODE."""
    mode = config.TRAIN.MODE
    if mode not in TASKS:
        raise ConfigError(f'TRAIN.MODE is {mode!r}; choose one of {sorted(TASKS)}')
    return TASKS[mode](config)


def build_model(config):
    """The model a config describes, as its task trains it (with its head, what it freezes
    frozen): the linear probe's BN + Linear head on a frozen encoder, the segmentor, ..."""
    return get_task(config).build_model()


for _mode in TASKS:  # transformer.build_model answers for every task (handed down, not imported)
    transformer.register_builder(_mode, build_model)


def load_trained(config, weights):
    """The task's model with all of `weights` loaded (as -eval loads them), in eval mode."""
    task = get_task(config)
    model = task.build_model()
    task.load_pretrained(model, weights, log=lambda m: None, eval_only=True)
    model.eval()
    return model
