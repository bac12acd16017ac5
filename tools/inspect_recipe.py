"""Print the recipe a run would use, without running it: one JSON object with the effective
peak lr, the effective batch, every trained parameter's lr scale and weight decay, and the lr
schedule.

    python tools/inspect_recipe.py -cfg configs/vit_base_patch16_224_finetune.yaml --nranks 8
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process()  # first: CPU threads and math-library paths before Paddle loads

import config as cfgmod  # noqa: E402
import optim  # noqa: E402
import tasks  # noqa: E402
import utils  # noqa: E402


def recipe(config, nranks, points_per_epoch=1):
    model = tasks.build_model(config)  # as the task trains it (the probe: frozen)
    lr = optim.peak_lr(config, nranks)
    steps = int(round(config.TRAIN.NUM_EPOCHS * points_per_epoch))
    schedule = [[i / points_per_epoch, optim.lr_at(i / points_per_epoch, config, lr)]
                for i in range(steps + 1)]
    return {
        'lr': lr,
        'eff_batch': optim.effective_batch(config, nranks),
        'optimizer': config.TRAIN.OPTIMIZER.NAME,
        'params': [{'name': n, 'lr_scale': s, 'weight_decay': wd}
                   for n, (s, wd) in optim.param_rules(model, config).items()],
        'lr_schedule': schedule,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', required=True)
    p.add_argument('-opts', nargs='+', action='extend', default=[])
    p.add_argument('--nranks', type=int, default=1, help='number of training processes')
    p.add_argument('--points-per-epoch', type=float, default=1,
                   help='lr schedule samples per epoch (the run itself sets it every step)')
    args = p.parse_args()
    config = cfgmod.get_config(args.cfg)
    cfgmod.merge_opts(config, args.opts)
    print(json.dumps(recipe(config, args.nranks, args.points_per_epoch)))


if __name__ == '__main__':
    utils.run_main(main)
