"""Export a fine-tuned classifier or a segmentor to a Paddle Inference model (paddle.jit.save).

    python tools/export_model.py -cfg configs/vit_base_patch16_224_finetune.yaml \
        -pretrained mae_finetuned_vit_base.pdparams -output exported/vit_base
    python tools/export_model.py -pretrained output/segmentation/best.pdparams -output exported/seg

DIR gets inference.{pdmodel|json} + inference.pdiparams (the program format depends on the
Paddle version), config.yaml, from which tools/predict.py rebuilds the eval preprocessing, and
classes.txt when the class names are known. A segmentor is exported for one window of
DATA.IMAGE_SIZE (its logits at the window's size); predict.py slides it over whole images.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process()  # first: CPU threads and math-library paths before Paddle loads

import paddle  # noqa: E402

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import tasks  # noqa: E402
import utils  # noqa: E402

PREFIX = 'inference'


def export(config, weights, output_dir, log=print):
    """Build the model config describes, load weights (all of them must fit), save it."""
    task = tasks.get_task(config)
    if not task.evaluates:
        raise utils.UserError('export needs a classifier or segmentation config (a '
                              '*_finetune.yaml, *_linearprobe.yaml or *_upernet_*.yaml), not a '
                              'pre-training one')
    model = task.build_model()
    task.load_pretrained(model, weights, log, eval_only=True)
    model.eval()
    size = config.DATA.IMAGE_SIZE
    os.makedirs(output_dir, exist_ok=True)
    spec = [paddle.static.InputSpec([None, 3, size, size], 'float32', 'images')]
    paddle.jit.save(model, os.path.join(output_dir, PREFIX), input_spec=spec)
    cfgmod.dump_config(config, os.path.join(output_dir, 'config.yaml'))
    classes = (checkpoint.saved_meta(weights) or {}).get('classes')
    if classes:  # the class names of the training data, for predict.py
        with open(os.path.join(output_dir, 'classes.txt'), 'w') as f:
            f.write('\n'.join(classes) + '\n')
    return model


def model_files(model_dir):
    """-> (program file, params file) of an exported model folder."""
    programs = [f for ext in ('json', 'pdmodel')
                for f in glob.glob(os.path.join(model_dir, f'{PREFIX}.{ext}'))]
    params = os.path.join(model_dir, f'{PREFIX}.pdiparams')
    if not programs or not os.path.isfile(params):
        raise utils.UserError(f'{model_dir} holds no exported model ({PREFIX}.pdmodel or .json '
                              f'+ {PREFIX}.pdiparams): run tools/export_model.py first')
    return programs[0], params


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', help='config of the model (optional for a checkpoint of this project: '
                   'it carries its own)')
    p.add_argument('-pretrained', required=True,
                   help='fine-tuned classifier or segmentor .pdparams')
    p.add_argument('-output', required=True, help='folder for the exported model')
    p.add_argument('-opts', nargs='+', action='extend', default=[])
    args = p.parse_args()
    config = checkpoint.config_for(args.cfg, args.pretrained,
                                   lambda c: cfgmod.merge_opts(c, args.opts))
    paddle.set_device('cpu')
    export(config, args.pretrained, args.output)
    program, params = model_files(args.output)
    print(f'exported: {program} + {params}')


if __name__ == '__main__':
    utils.run_main(main)
