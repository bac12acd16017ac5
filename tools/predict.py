"""Predict with an exported model (Paddle Inference) or a .pdparams of this project (a training
checkpoint or converted weights: they carry their config and class names), preprocessing as
in evaluation.

    python tools/predict.py --model exported/vit_base --image cat.jpg --image dog.png --topk 5
    python tools/predict.py --model mae_finetuned_vit_base.pdparams --image cat.jpg
    python tools/predict.py --model exported/seg --image room.jpg --out predictions/

A classifier prints one JSON line per image: {"image": path, "topk": [[class_index,
probability], ...]}, plus "classes": [name, ...] (the names of those classes, in the same order,
ImageNet's WordNet ids as words) when they are known (export_model.py writes them to
classes.txt; a .pdparams carries them).

A segmentor (--out DIR needed) slides its window over each whole image as evaluation does and
writes DIR/<name>.png, the predicted label map in the dataset's convention (with
DATA.REDUCE_ZERO_LABEL, class c as c + 1, 0 left for 'unlabelled', as ADE20K's annotations),
and DIR/<name>_overlay.png, the classes' colours over the image with a legend; it prints
{"image", "label_png", "overlay_png", "classes": {name: share of the pixels}} per image.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process()  # first: CPU threads and math-library paths before Paddle loads

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.inference as paddle_infer  # noqa: E402

import checkpoint  # noqa: E402
import classnames  # noqa: E402
import config as cfgmod  # noqa: E402
import datasets  # noqa: E402
import seg_data  # noqa: E402
import seg_inference  # noqa: E402
import seg_transforms  # noqa: E402
import tasks  # noqa: E402  (registers the model builders checkpoint.load_model uses)
import transforms  # noqa: E402
import utils  # noqa: E402
from export_model import model_files  # noqa: E402


class Predictor:
    """An exported classifier plus the eval transform of the config saved beside it."""

    def __init__(self, model_dir, use_gpu=False):
        program, params = model_files(model_dir)
        self.config = cfgmod.get_config(os.path.join(model_dir, 'config.yaml'))
        cfgmod.check_values(self.config)
        self.transform = transforms.build_transform(False, self.config)
        cfg = paddle_infer.Config(program, params)
        if use_gpu:
            cfg.enable_use_gpu(256, 0)
        else:
            cfg.disable_gpu()
            cfg.disable_mkldnn()  # oneDNN passes print to stdout, which holds our JSON lines
            cfg.set_cpu_math_library_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
        cfg.disable_glog_info()
        self.predictor = paddle_infer.create_predictor(cfg)
        names = os.path.join(model_dir, 'classes.txt')  # written by export_model.py, if known
        self.classes = None
        if os.path.isfile(names):
            with open(names) as f:
                self.classes = [line.rstrip('\n') for line in f if line.strip()]

    def logits(self, images):
        """images: float32 (N, 3, H, W) already preprocessed -> logits (N, classes)."""
        handle = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        out = self.predictor.get_output_handle(self.predictor.get_output_names()[0])
        return out.copy_to_cpu()

    @staticmethod
    def read(path):
        try:
            return datasets.load_rgb(path)
        except Exception as e:
            raise utils.UserError(f'cannot read image {path}: {e}') from None

    def preprocess(self, path):
        return self.transform(self.read(path))

    def topk(self, paths, k=5):
        logits = self.logits(np.stack([self.preprocess(p) for p in paths]))
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        k = min(k, prob.shape[1])
        order = np.argsort(-prob, axis=1)[:, :k]
        return [[[int(c), float(prob[i, c])] for c in order[i]] for i in range(len(paths))]


class SegmentationPredictor(Predictor):
    """An exported segmentor: one window of DATA.IMAGE_SIZE, slid over whole images."""

    def __init__(self, model_dir, use_gpu=False):
        super().__init__(model_dir, use_gpu)
        self._as_segmentor()

    def _as_segmentor(self):
        self.transform = seg_transforms.build_seg_transform(False, self.config)
        self.classes = self.classes or [f'class_{i}'
                                        for i in range(self.config.MODEL.NUM_CLASSES)]

    def label_map(self, path):
        """-> (the RGB image, predicted classes (H, W) at its size)."""
        image = self.read(path)
        return image, seg_inference.image_label_map(self.logits, image, self.config,
                                                    self.transform)

    def write(self, paths, out_dir):
        for path in paths:
            image, pred = self.label_map(path)
            stem = os.path.splitext(os.path.basename(path))[0]
            files = {'label_png': os.path.join(out_dir, stem + '.png'),
                     'overlay_png': os.path.join(out_dir, stem + '_overlay.png')}
            pictures = {'label_png': seg_data.label_png(pred, self.config),
                        'overlay_png': seg_data.overlay(image, pred, self.classes)}
            for key, target in files.items():
                tmp = target + '.tmp.png'
                pictures[key].save(tmp)
                os.replace(tmp, target)
            yield dict({'image': path}, **files,
                       classes=seg_data.class_shares(pred, self.classes))


class CheckpointPredictor(Predictor):
    """A classifier from a .pdparams of this project, run in Paddle (dynamic graph)."""

    def __init__(self, path, use_gpu=False):
        paddle.set_device('gpu' if use_gpu else 'cpu')
        self.model, self.config = checkpoint.load_model(path)
        if self.config.TRAIN.MODE == 'pretrain' or not self.config.MODEL.NUM_CLASSES:
            raise utils.UserError(f'{path} is a pre-trained encoder without a classifier head: '
                                  f'fine-tune it first (tools/visualize.py shows what an MAE '
                                  f'reconstructs)')
        self.transform = transforms.build_transform(False, self.config)
        self.classes = (checkpoint.saved_meta(path) or {}).get('classes')

    def logits(self, images):
        with paddle.no_grad():
            out = self.model(paddle.to_tensor(np.ascontiguousarray(images, dtype=np.float32)))
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


class CheckpointSegmentationPredictor(CheckpointPredictor, SegmentationPredictor):
    """A segmentor from a .pdparams of this project."""

    def __init__(self, path, use_gpu=False):
        CheckpointPredictor.__init__(self, path, use_gpu)
        self._as_segmentor()


def load_predictor(model, use_gpu=False):
    """The predictor for an exported model folder or a .pdparams file: a segmentor's or a
    classifier's."""
    if os.path.isfile(model):
        meta = checkpoint.saved_meta(model)
        if meta is None:
            raise utils.UserError(f'{model} carries no config of this project: give the folder '
                                  f'export_model.py wrote, or weights converted by '
                                  f'port_weights/convert_official.py')
        mode = cfgmod.from_text(meta['config'], f'the config saved in {model}').TRAIN.MODE
        cls = CheckpointSegmentationPredictor if mode == 'segmentation' else CheckpointPredictor
        return cls(model, use_gpu=use_gpu)
    model_files(model)  # (a folder without a model: one clear error first)
    saved = cfgmod.get_config(os.path.join(model, 'config.yaml'))
    cls = SegmentationPredictor if saved.TRAIN.MODE == 'segmentation' else Predictor
    return cls(model, use_gpu=use_gpu)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True,
                   help='folder written by tools/export_model.py, or a .pdparams of this project')
    p.add_argument('--image', action='append', required=True, help='image file (repeatable)')
    p.add_argument('--topk', type=int, default=5, help='classifier: classes printed')
    p.add_argument('--out', help='segmentor: folder for the label PNGs and overlays')
    p.add_argument('--gpu', action='store_true')
    args = p.parse_args()
    predictor = load_predictor(args.model, use_gpu=args.gpu)
    if isinstance(predictor, SegmentationPredictor):
        if not args.out:
            raise utils.UserError(f'{args.model} is a segmentor: give --out DIR for its label '
                                  f'PNGs and overlays')
        os.makedirs(args.out, exist_ok=True)
        for line in predictor.write(args.image, args.out):
            print(json.dumps(line), flush=True)
        return
    for path, top in zip(args.image, predictor.topk(args.image, args.topk)):
        line = {'image': path, 'topk': top}
        if predictor.classes:  # the names of the classes in topk, in its order
            line['classes'] = classnames.display([predictor.classes[c] for c, _ in top])
        print(json.dumps(line), flush=True)


if __name__ == '__main__':
    utils.run_main(main)
