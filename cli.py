"""The entry points' command line: flags -> checked config -> the stage assembled from its
task -> engine.fit (or, with -eval, engine.evaluate_only). A main_multi_gpu_<mode>.py makes the
process set-up first (runtime.setup_process(), before anything imports Paddle), then calls
cli.main('<mode>').
"""
import argparse
import os
import sys

import paddle
import paddle.distributed as dist

import checkpoint
import classnames
import config as cfgmod
import datasets
import engine
import optim
import tasks
import transformer
import utils
from utils import UserError


def main(mode, argv=None):
    """A main_multi_gpu_<mode>.py: run(mode); a user's mistake prints one 'error: ...' line and
    exits 2 (utils.run_main)."""
    utils.run_main(lambda: run(mode, argv))


def run(mode, argv=None):
    """An entry point: flags -> config -> the task's model, data and optimizer -> fit (or,
    with -eval, evaluate_only). main_multi_gpu_<mode>.py is this call."""
    evaluates = tasks.TASKS[mode].best_metric is not None
    config, args, logger = setup(mode, argv, can_eval=evaluates)
    eval_only = evaluates and args.eval
    task = tasks.get_task(config)
    # the data first: a wrong path or list is named before a large model is built
    val_loader = None
    if task.evaluates:
        val_loader = datasets.build_loader(config, task.build_dataset(False), is_train=False)
    if not eval_only:
        train_loader = datasets.build_loader(config, task.build_dataset(True), is_train=True)
    model = task.build_model()
    if config.MODEL.PRETRAINED:
        task.load_pretrained(model, config.MODEL.PRETRAINED, logger.info, eval_only=eval_only)
    check_class_identity(config, task, val_loader, None if eval_only else train_loader,
                         logger.info)
    if eval_only:
        engine.evaluate_only(task, model, val_loader, config, logger)
        return
    optimizer = optim.build_optimizer(model, config, dist.get_world_size())
    scaler = engine.build_scaler(config)
    prefix = checkpoint.resume_prefix(config.MODEL.RESUME, config.OUTPUT, logger.info)
    resumed = None
    if prefix:  # (a checkpoint that does not fit stops here, before anything is written)
        resumed = checkpoint.resume(prefix, model, optimizer, scaler)
        same_classes(checkpoint.saved_meta(prefix + '.pdparams'), train_loader.dataset,
                     f'{prefix}.pdparams (the run resumed)', 'the training data', logger.info)
        logger.info(f'resumed from {prefix}: epoch {resumed["epoch"]}, iteration '
                    f'{resumed["iter"]}')
        if engine.finished(config, resumed, prefix, logger):
            return
    logger.open(config)  # everything checked and built: the run folder starts here
    engine.fit(config, task, model, optimizer, train_loader, logger, val_loader=val_loader,
               scaler=scaler, resumed=resumed, resumed_from=prefix)


def check_class_identity(config, task, val_loader, train_loader, log):
    """Labels must mean the same classes in the weights and in the data (classnames.py):
    -eval and fine-tuning from a classifier whose head is kept compare the names
    MODEL.PRETRAINED carries with the data's; training compares its val set with its train
    set. (Resuming compares the run's checkpoint with the training data, in run().)"""
    datas = [(loader.dataset, what) for loader, what in
             ((val_loader, 'the evaluation data'), (train_loader, 'the training data'))
             if loader is not None]
    weights = config.MODEL.PRETRAINED
    if weights and task.best_metric is not None and config.MODEL.NUM_CLASSES:
        meta = checkpoint.saved_meta(weights)
        carried = (meta or {}).get('classes')
        if train_loader is None or (carried and len(carried) == config.MODEL.NUM_CLASSES):
            for dataset, what in datas:  # (-eval, or a head of the same size kept)
                same_classes(meta, dataset, weights, what, log, config.MODEL.NUM_CLASSES)
    if train_loader is not None and val_loader is not None:
        same_classes({'classes': train_loader.dataset.classes}, val_loader.dataset,
                     'the training data', 'the evaluation data', log)


def same_classes(meta, dataset, expected_is, found_is, log, num_classes=None):
    """UserError when dataset's class names mean other labels than meta['classes'] (a
    checkpoint's META entry); a source whose labels follow its names (class folders) is
    relabelled to them instead. One side naming no classes: go on, saying so -- unless the
    data name fewer or more classes than the model's num_classes, which only names can map."""
    expected, found = (meta or {}).get('classes'), dataset.classes
    if not expected and found and num_classes and len(found) != num_classes:
        raise UserError(f'{found_is} has {len(found)} classes ({", ".join(found[:3])}, ...), '
                        f'the model {num_classes}, and {expected_is} names none: which of its '
                        f'classes the data hold cannot be told')
    if not expected or not found:
        if expected or found:
            log(f'note: {found_is if expected else expected_is} names no classes: its labels '
                f'are taken to mean the classes of {expected_is if expected else found_is}')
        return
    problem = classnames.mismatch(expected, found, expected_is, found_is)
    if problem is None:
        return
    if dataset.follow_classes(classnames.canonical(expected)):
        log(f'the labels of {found_is} follow the {len(expected)} classes of {expected_is}')
        return
    raise UserError(f'{found_is} and {expected_is} do not mean the same classes: {problem}')


def parse_args(stage, argv=None, can_eval=True):
    """PaddleViT-style flags (DESIGN.md 3.3); -opts KEY VALUE ... overrides any config key.
    can_eval: the stage's task evaluates, so -eval is offered."""
    doc = getattr(sys.modules.get('__main__'), '__doc__', None)  # the entry point's own text
    p = argparse.ArgumentParser(description=doc or f'MAE {stage} (PaddlePaddle)',
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', help='config YAML, e.g. configs/tiny_' + stage + '.yaml (with -eval '
                   'of a checkpoint of this project: optional, the checkpoint carries its own)')
    p.add_argument('-data_path', help='folder with train_list.txt / val_list.txt')
    p.add_argument('-output', help='output folder (checkpoints, log.txt, config.yaml)')
    p.add_argument('-batch_size', type=int, help='batch size per process')
    p.add_argument('-pretrained', help='.pdparams to start from')
    p.add_argument('-resume', help="checkpoint prefix (folder/latest) or 'auto'")
    if can_eval:
        p.add_argument('-eval', action='store_true', help='only evaluate -pretrained')
    p.add_argument('-amp', nargs='?', const='float16', choices=['float16', 'bfloat16'],
                   help='mixed precision on GPU (default float16)')
    p.add_argument('-opts', nargs='+', action='extend', default=[],
                   help='KEY VALUE pairs; may be given more than once, later ones win')
    return p.parse_args(argv)


def setup(stage, argv=None, can_eval=True):
    """Flags -> checked config (paths, values, the run folder), distributed set-up, seeds;
    returns (config, args, logger). Nothing is written yet: logger.open(config) starts the run
    folder once the model and the data are built too."""
    args = parse_args(stage, argv, can_eval)
    eval_only = getattr(args, 'eval', False)
    if eval_only:  # the checkpoint's own config, or a -cfg that agrees with it
        config = checkpoint.config_for(args.cfg, args.pretrained,
                                       lambda c: cfgmod.update_config(c, args))
        if config.MODEL.NUM_CLASSES == 0:  # what a converted pre-trained encoder's config says
            raise UserError(f'{args.pretrained} is an encoder without a classifier head (MAE '
                            f'pre-trained weights): fine-tune it first, -cfg '
                            f'configs/vit_*_finetune.yaml -pretrained {args.pretrained}')
    elif not args.cfg:
        raise UserError('-cfg FILE is needed, e.g. -cfg configs/tiny_' + stage + '.yaml')
    else:
        config = cfgmod.get_config(args.cfg)
        cfgmod.update_config(config, args)
    cfgmod.check_values(config)
    transformer.model_shape(config)  # an unknown MODEL.NAME, a shape that contradicts it, ...
    if not config.OUTPUT:  # a folder per config, so that stages and sizes do not collide
        name = os.path.splitext(os.path.basename(args.cfg))[0] if args.cfg else stage
        config.OUTPUT = os.path.join('output', name)
    if config.TRAIN.MODE != stage:
        raise UserError(f'{args.cfg or args.pretrained}: TRAIN.MODE is {config.TRAIN.MODE!r} '
                        f'but this script is '
                        f'for {stage!r}; use main_multi_gpu_{config.TRAIN.MODE}.py')
    if config.MODEL.PRETRAINED:
        checkpoint.check_file(config.MODEL.PRETRAINED, 'pretrained weights')
    if config.MODEL.RESUME not in ('', 'auto'):
        checkpoint.check_file(checkpoint.resume_prefix(config.MODEL.RESUME, '') + '.pdparams',
                              'checkpoint file')
    if config.TRAIN.AMP and not paddle.is_compiled_with_cuda():
        print(f'note: TRAIN.AMP {config.TRAIN.AMP!r} has no effect on CPU; training in float32',
              file=sys.stderr, flush=True)
    config.freeze()
    utils.init_distributed()
    changed = []
    if not eval_only:
        changed = checkpoint.check_run_folder(config)
        utils.barrier()  # every process has looked at the folder before the main one writes in it
    utils.seed_everything(config.SEED, 'init')  # the same on every process: the same weights
    logger = utils.Logger(None, sys.stderr) if eval_only else utils.Logger(config.OUTPUT)
    if changed:
        logger.info(f'resume: settings changed since the run was started: {"; ".join(changed)}')
    return config, args, logger
