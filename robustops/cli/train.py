"""`robustops train`: adversarial training of a model on a dataset, with checkpoints, resume and
torchrun. The methods and their flags come from the training registry."""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from typing import Any, Dict

import torch

from .. import data as rodata
from .. import models, train
from .common import (CLIError, add_common, agree, check_data_spec, check_writable, distributed, exclusive, load_data,
                     parse_fraction, require_min, split_holdout)

HELP = "adversarial training (" + ", ".join(train.METHODS) + ")"


def add_method_flags(g, defaults: Dict[str, Any] = None) -> None:
    """One flag per hyperparameter of the registered methods (default: the method's own)."""
    defaults = defaults or {}
    owners: Dict[str, list] = {}
    for name in train.METHODS:
        for h in train.registry.get(name).hyper:
            owners.setdefault(h.name, []).append(name)
    for hname, h in train.registry.hyperparameters().items():
        kw: Dict[str, Any] = {"type": int if h.kind == "int" else parse_fraction} if h.kind != "choice" \
            else {"choices": list(h.choices)}
        default = defaults.get(hname)
        shown = h.default if default is None else default
        g.add_argument(*h.cli_flags, dest=hname, default=default,
                       help=f"{h.help} ({', '.join(owners[hname])}; default {shown})", **kw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits",
                   help='"digits" (embedded), a .npz file, "cifar10:DIR" or "imagefolder:DIR" (default digits)')
    g.add_argument("--model", default=None,
                   help="small_cnn, preact_resnet18, resnet20, resnet110 (default: small_cnn for 8x8 data, "
                        "preact_resnet18 otherwise)")
    g.add_argument("--val-size", type=int, default=None,
                   help="training samples held out for validation / early stopping (default 10%% up to 1000; 0: none)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split over torchrun processes)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="pgd",
                   help="; ".join(f"{k}: {v}" for k, v in train.describe_methods().items()) + " (default pgd)")
    g.add_argument("--epochs", type=int, default=10,
                   help="epochs; for free, forward/backward passes counted as epochs (data passes = ceil(epochs/m))")
    g.add_argument("--eps", type=parse_fraction, default=None, help="perturbation budget (default 8/255; digits 0.2)")
    g.add_argument("--alpha", type=parse_fraction, default=None,
                   help="step size (default: the method's; pgd/trades 2.5*eps/steps, fgsm 1.25*eps, free eps)")
    g.add_argument("--steps", type=int, default=7, help="PGD / TRADES inner steps (default 7)")
    g.add_argument("--norm", default="linf", help="linf or l2")
    g.add_argument("--no-random-start", action="store_true", help="PGD training without a random start")
    add_method_flags(g)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", help="sgd or adam")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default sgd 0.1, adam 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--schedule", default="cyclic", help=f"{', '.join(train.SCHEDULES)} (default cyclic)")
    g.add_argument("--milestones", type=float, nargs="*", default=None,
                   help="multistep milestones in epochs (default 50%% and 75%% of --epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep factor")
    g.add_argument("--amp", default="none", help="none, bf16 or fp16 autocast")
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("validation, checkpoints")
    g.add_argument("--val-eps", type=parse_fraction, default=None, help="validation PGD eps (default eps; 0: none)")
    g.add_argument("--val-steps", type=int, default=10, help="validation PGD steps (default 10)")
    g.add_argument("--patience", type=int, default=None, help="early stopping after this many epochs without "
                                                              "improvement of the robust validation accuracy")
    g.add_argument("--keep-all", action="store_true", help="keep a checkpoint file per epoch")
    g.add_argument("--out", default="runs/train", help="run directory: last.pt, best.pt, log.csv (default runs/train)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    g.add_argument("--force", action="store_true",
                   help="start afresh in an --out that holds a previous run, removing its checkpoints and logs "
                        "(without --resume or --force such a directory is refused)")
    g.add_argument("--test-steps", type=int, default=20, help="PGD steps of the final test evaluation (0: skip)")
    add_common(p)


def method_hparams(args) -> Dict[str, Any]:
    """The methods' hyperparameters given on the command line."""
    return {k: getattr(args, k) for k in train.registry.hyperparameters() if getattr(args, k, None) is not None}


def default_model(info: Dict[str, Any]) -> str:
    C, H, W = info["input_shape"]
    return "small_cnn" if H <= 16 else "preact_resnet18"


def build_model(name: str, info: Dict[str, Any]):
    """models.get_model for the data; with the data's mean / std the model normalises inside
    (``Sequential(Normalize, net)``), so it takes [0, 1] pixels and its checkpoint rebuilds it."""
    C, H, W = info["input_shape"]
    kw: Dict[str, Any] = {"num_classes": int(info["num_classes"]), "in_channels": int(C)}
    if name.lower().replace("-", "_") in ("small_cnn", "smallcnn"):
        kw["input_size"] = int(H)
    if info.get("mean") is not None and info.get("std") is not None:
        kw["mean"], kw["std"] = [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    return models.get_model(name, **kw), kw


def _loaders(args, train_ds, rank: int, world: int, device: torch.device):
    from torch.utils.data import DataLoader, DistributedSampler

    n = len(train_ds)
    val_size = args.val_size if args.val_size is not None else min(1000, n // 10)
    if not 0 <= val_size < n:
        raise CLIError(f"--val-size must be in [0, {n}), got {val_size}")
    val_ds = None
    if val_size > 0:
        train_ds, val_ds = split_holdout(train_ds, val_size, args.seed)
    bs = args.batch_size // world
    pin = device.type == "cuda"
    if world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=args.workers,
                                  pin_memory=pin, drop_last=True)
    else:
        train_loader = DataLoader(train_ds, batch_size=bs, shuffle=True, num_workers=args.workers, pin_memory=pin)
    val_loader = None
    if val_ds is not None:
        val_part = rodata.shard(val_ds, rank, world) if world > 1 else val_ds
        val_loader = DataLoader(val_part, batch_size=max(bs, 64), shuffle=False, num_workers=args.workers)
    return train_loader, val_loader, len(train_ds), val_size


def _test(args, model, hp, dev, train_time) -> None:
    from torch.utils.data import DataLoader

    test_ds, _ = load_data(args.data, "test")
    test_loader = DataLoader(test_ds, batch_size=256, shuffle=False)
    tr = train.Trainer(model, train.FitConfig.make(args.method, **{**hp, "val_steps": args.test_steps}),
                       device=dev, ddp=False)
    m = tr.evaluate(test_loader)
    print(f"test: clean acc {m['clean_acc']:.4f}, PGD-{args.test_steps} acc {m['robust_acc']:.4f} "
          f"(eps {hp['eps']:.4g}, {args.norm})" + (f", noisy acc {m['noise_acc']:.4f}" if "noise_acc" in m else ""))
    with open(os.path.join(args.out, "test.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "clean_acc", "robust_acc", "eps", "steps", "train_time"])
        w.writerow([args.method, m["clean_acc"], m["robust_acc"], hp["eps"], args.test_steps, train_time])


def run(args) -> int:
    check_data_spec(args.data)
    if args.method not in train.METHODS:
        raise CLIError(f"--method must be one of {', '.join(train.METHODS)}; got {args.method!r}")
    require_min(batch_size=(args.batch_size, 1))
    check_writable(os.path.join(args.out, "last.pt"), "--out")
    train_ds, info = load_data(args.data, "train")
    if args.test_steps > 0:
        load_data(args.data, "test")  # the final evaluation's data, checked now rather than after training
    eps = args.eps if args.eps is not None else (0.2 if info["name"] == "digits" else 8 / 255)
    hp = dict(epochs=args.epochs, eps=eps, alpha=args.alpha, steps=args.steps, norm=args.norm,
              random_start=not args.no_random_start, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
              milestones=args.milestones, gamma=args.gamma, amp=args.amp, channels_last=args.channels_last,
              seed=args.seed, val_eps=args.val_eps, val_steps=args.val_steps, patience=args.patience,
              keep_all=args.keep_all, **method_hparams(args))
    try:
        train.FitConfig.make(args.method, **hp).resolved()
    except ValueError as e:
        raise CLIError(f"{e} (see --help)") from None
    try:
        with distributed(args.device) as d, contextlib.ExitStack() as stack:
            error = None
            if d.rank == 0:
                try:
                    stack.enter_context(exclusive(os.path.join(args.out, ".lock"), f"--out {args.out}"))
                    _prepare_run_dir(args)
                except CLIError as e:
                    error = str(e)
            agree(d, error)
            _train(args, info, train_ds, hp, d)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ninterrupted: every finished epoch is in {args.out}/last.pt; continue with the same "
                  f"command and --resume", file=sys.stderr)
        return 130
    return 0


RUN_FILES = ("last.pt", "best.pt", "log.csv", "test.csv")


def _prepare_run_dir(args) -> None:
    """Rank 0, holding the directory's lock: a fresh run refuses a directory that holds a previous
    run unless --force (then its files go, so no stale best.pt or log sits beside the new run's)."""
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    old += sorted(f for f in os.listdir(args.out) if f.startswith("epoch_") and f.endswith(".pt")) \
        if os.path.isdir(args.out) else []
    if args.resume and args.force:
        raise CLIError("--resume continues the run in --out and --force replaces it: give one of them")
    if args.resume or not old:
        return
    if not args.force:
        raise CLIError(f"--out {args.out} holds a previous run ({', '.join(old)}); --resume continues it, --force "
                       f"starts afresh (removing it)")
    for f in old:
        os.remove(os.path.join(args.out, f))


def _train(args, info, train_ds, hp, d) -> None:
    if args.batch_size % d.world:
        raise CLIError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({d.world})")
    torch.manual_seed(args.seed)
    name = args.model or default_model(info)
    try:
        model, model_kwargs = build_model(name, info)
    except (KeyError, ValueError) as e:
        raise CLIError(f"--model: {e}") from None
    train_loader, val_loader, n_train, val_size = _loaders(args, train_ds, d.rank, d.world, d.device)
    if d.rank == 0:
        print(f"robustops train: {args.method} on {info['name']} ({n_train} train, {val_size} validation), "
              f"model {name}, {d.world} process(es) on {d.device}", flush=True)
    model.to(d.device)
    try:
        res = train.fit(model, train_loader, args.method, val_loader=val_loader, out_dir=args.out,
                        resume=True if args.resume else None, progress=args.progress, device=d.device,
                        model_name=name, model_kwargs=model_kwargs, extra={"data": args.data}, **hp)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if args.test_steps > 0 and d.rank == 0:
        _test(args, model, hp, d.device, res.train_time)
    if d.rank == 0:
        print(f"checkpoints and log in {args.out}/ (best epoch {res.best_epoch})")
