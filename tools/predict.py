"""Classify images with an exported model (Paddle Inference), preprocessing as in evaluation.

    python tools/predict.py --model exported/vit_base --image cat.jpg --image dog.png --topk 5

Prints one JSON line per image: {"image": path, "topk": [[class_index, probability], ...]},
plus "classes": [name, ...] (the names of those classes, in the same order) when the model was
trained on class folders (export_model.py writes their names to classes.txt).
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
import paddle.inference as paddle_infer  # noqa: E402

import augment  # noqa: E402
import config as cfgmod  # noqa: E402
import datasets  # noqa: E402
import utils  # noqa: E402
from export_model import model_files  # noqa: E402


class Predictor:
    """An exported classifier plus the eval transform of the config saved beside it."""

    def __init__(self, model_dir, use_gpu=False):
        program, params = model_files(model_dir)
        self.config = cfgmod.get_config(os.path.join(model_dir, 'config.yaml'))
        self.transform = augment.build_transform(False, self.config)
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

    def preprocess(self, path):
        try:
            image = datasets.load_rgb(path)
        except Exception as e:
            raise utils.UserError(f'cannot read image {path}: {e}') from None
        return self.transform(image)

    def topk(self, paths, k=5):
        logits = self.logits(np.stack([self.preprocess(p) for p in paths]))
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        k = min(k, prob.shape[1])
        order = np.argsort(-prob, axis=1)[:, :k]
        return [[[int(c), float(prob[i, c])] for c in order[i]] for i in range(len(paths))]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='folder written by tools/export_model.py')
    p.add_argument('--image', action='append', required=True, help='image file (repeatable)')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--gpu', action='store_true')
    args = p.parse_args()
    predictor = Predictor(args.model, use_gpu=args.gpu)
    for path, top in zip(args.image, predictor.topk(args.image, args.topk)):
        line = {'image': path, 'topk': top}
        if predictor.classes:  # the names of the classes in topk, in its order
            line['classes'] = [predictor.classes[c] for c, _ in top]
        print(json.dumps(line), flush=True)


if __name__ == '__main__':
    utils.run_main(main)
