"""`robustops train`: adversarial training of a model on a dataset, with checkpoints, resume and
torchrun. The methods and their flags come from the training registry."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, Dict

from .common import (
    CLIError,
    Renamed,
    add_common,
    agree,
    check_data_spec,
    check_writable,
    distributed,
    exclusive,
    fraction,
    load_data,
    model_dims,
    warn_empty_classes,
    require_min,
    setup_run,
    split_holdout,
    write_summary,
)

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

HELP = "adversarial training with a method of the training registry (natural, pgd, free, fgsm, trades, gaussian, ...)"

#: The defaults that depend on --data: on the embedded digits the demo's settings (robustops demo, the
#: README's table: 30 epochs, lr 0.05, batch size 64, 144 validation images), on other data the
#: settings below; None means the rule in each flag's help. Explicit flags always win.
DATASET_DEFAULTS = {"digits": {"epochs": 30, "lr": 0.05, "batch_size": 64, "val_size": 144},
                    "moving_digits": {"epochs": 10, "lr": 0.05, "batch_size": 64, "val_size": 144},
                    "other": {"epochs": 10, "lr": None, "batch_size": 128, "val_size": None}}


def dataset_defaults(args) -> None:
    """Fills the flags left unset (None) with --data's defaults (DATASET_DEFAULTS); --lr's digits
    default is for sgd (adam keeps its own, 1e-3)."""
    own = DATASET_DEFAULTS[args.data if args.data in DATASET_DEFAULTS else "other"]
    for k, v in own.items():
        if getattr(args, k) is None and not (k == "lr" and args.optimizer != "sgd"):
            setattr(args, k, v)


def add_method_flags(g, defaults: Dict[str, Any] = None) -> None:
    """One flag per hyperparameter of the registered methods (None: the method's own default)."""
    from .. import train

    defaults = defaults or {}
    owners: Dict[str, list] = {}
    method_defaults: Dict[str, Dict[str, Any]] = {}
    for name in train.METHODS:
        for h in train.registry.get(name).hyper:
            owners.setdefault(h.name, []).append(name)
            method_defaults.setdefault(h.name, {})[name] = h.default
    for hname, h in train.registry.hyperparameters().items():
        kw: Dict[str, Any] = {"choices": list(h.choices)} if h.kind == "choice" else \
            {"type": str, "metavar": "FILE"} if h.kind == "path" else \
            {"type": str, "metavar": "SPEC"} if h.kind == "str" else \
            {"type": int if h.kind == "int" else fraction(hname)}
        default = defaults.get(hname)
        per = method_defaults[hname]
        own = f"{h.default}" if len(set(map(str, per.values()))) == 1 else \
            ", ".join(f"{m} {v}" for m, v in per.items())
        note = "" if default is not None else f"; None: the method's default, {own}"
        g.add_argument(*h.cli_flags, dest=hname, default=default, help=f"{h.help} ({', '.join(owners[hname])}{note})",
                       **kw)


def _add_optimisation(p: argparse.ArgumentParser) -> None:
    """The optimiser, learning-rate schedule and precision flags (every method)."""
    from .. import train

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=list(train.OPTIMIZERS))
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (None: 0.05 on digits with sgd; otherwise sgd 0.1, adam 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--schedule", default="cyclic", choices=list(train.SCHEDULES))
    g.add_argument("--milestones", type=float, nargs="*", default=None,
                   help="multistep milestones in epochs (None: 50%% and 75%% of --epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep factor")
    g.add_argument("--grad-clip", type=float, default=None, metavar="MAX_NORM",
                   help="clip the gradient's L2 norm (all parameters) to MAX_NORM before each optimizer step "
                        "(every method; Shi et al. 2021 use 10)")
    g.add_argument("--amp", default="none", choices=list(train.AMP_MODES), help="autocast")
    g.add_argument("--channels-last", action="store_true")


def _add_coreset(p: argparse.ArgumentParser) -> None:
    """Adversarial coreset selection (robustops.train.coreset; Dolatabadi et al. 2022)."""
    g = p.add_argument_group("adversarial coreset selection (robustops.train.coreset; pgd, fgsm, trades)")
    g.add_argument("--coreset", default=None, choices=["craig", "gradmatch", "random"],
                   help="train on weighted subsets chosen from last-layer gradients of the adversarial loss: CRAIG "
                        "(facility location), GradMatch (non-negative OMP) or uniform random (default: off)")
    g.add_argument("--coreset-frac", type=float, default=None, help="fraction of each class in the coreset (None: 0.5)")
    g.add_argument("--coreset-every", type=int, default=None, help="coreset epochs between selections (None: 5)")
    g.add_argument("--coreset-warmup", type=float, default=None, metavar="KAPPA",
                   help="warm start: round(floor(KAPPA * epochs) * frac) full-data epochs, then "
                        "epochs - floor(KAPPA * epochs) coreset epochs (0: none; None: 0.6, the official code's)")


def _add_ood(g) -> None:
    """--ood-data and its settings (robustops.train.ood; Lee et al. 2021)."""
    g.add_argument("--ood-data", default=None, metavar="SPEC",
                   help="out-of-distribution images mixed into every training batch and trained toward the uniform "
                        "label, attacked too (Lee et al. 2021; pgd, trades): \"digits-ood\" or \"digits-ood:N\" (N "
                        "letters, textures, gratings and blobs generated from --seed at the data's shape) or any --data "
                        "spec (its images; labels ignored)")
    g.add_argument("--ood-ratio", type=fraction("ood-ratio"), default=None,
                   help="with --ood-data: the fraction of OOD images in each batch, in (0, 1) (None: 0.5, the paper's)")
    g.add_argument("--ood-weight", type=float, default=None, metavar="LAMBDA",
                   help="with --ood-data: the weight of the OOD images' uniform-label loss (None: 1)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import train

    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits",
                   help='"digits" (embedded), "moving_digits" (embedded videos [8, 1, 16, 16]; model video_cnn), '
                        'a .npz file, "cifar10:DIR" or "imagefolder:DIR"')
    g.add_argument("--model", default=None,
                   help="small_cnn, preact_resnet18, resnet20, resnet110, ... (None: small_cnn for inputs up to "
                        "16x16, preact_resnet18 otherwise)")
    g.add_argument("--val-size", type=int, default=None,
                   help="training samples held out for validation / early stopping (None: 144 on digits, as in the "
                        "demo, and on moving_digits; otherwise 10%% up to 1000; 0: none)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch size, split over torchrun processes (None: 64 on digits and moving_digits, 128 "
                        "otherwise)")
    g.add_argument("--extra-data", default=None, metavar="GEN.npz",
                   help="generated (proxy) images and labels (x, y) mixed into every training batch (robustops "
                        "generate writes one)")
    g.add_argument("--extra-ratio", type=fraction("extra-ratio"), default=0.5,
                   help="with --extra-data: the fraction of generated samples in each batch, in [0, 1)")
    _add_ood(g)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="pgd", choices=list(train.METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in train.describe_methods().items()))
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs (None: 30 on digits, 10 on moving_digits and otherwise); for free, forward/backward passes counted as "
                        "epochs (data passes = ceil(epochs/m))")
    g.add_argument("--eps", type=fraction("eps"), default=None,
                   help="perturbation budget (None: 8/255, or 0.2 on the digits)")
    g.add_argument("--step-size", dest="alpha", type=fraction("step size"), default=None,
                   help="step size (None: the method's; pgd/trades 2.5*eps/steps, fgsm 1.25*eps, free eps)")
    g.add_argument("--alpha", action=Renamed, new="--step-size", why="is the step size here")
    g.add_argument("--steps", type=int, default=7, help="PGD / TRADES inner steps")
    g.add_argument("--norm", default="linf", choices=list(train.NORMS))
    g.add_argument("--no-random-start", action="store_true", help="PGD training without a random start")
    learned = [m for m in train.METHODS if getattr(train.registry.get(m), "uses_perturbation_model", False)]
    g.add_argument("--perturbation-model", default=None, metavar="CKPT",
                   help=f"checkpoint of a learned perturbation set (robustops.perturbation; {', '.join(learned)}): "
                        f"--eps is then the latent L2 radius, by default the checkpoint's eps; for ada, its "
                        f"corruption network (perturbation train --kind autoencoder, or a CVAE)")
    add_method_flags(g)
    add_schedule_flags(p)
    g = p.add_argument_group("training options (see robustops.train.awp, robustops.train.ema; off by default)")
    g.add_argument("--awp", type=float, default=None, metavar="GAMMA",
                   help="adversarial weight perturbation of relative size GAMMA per layer (pgd, trades; "
                        "Wu et al. 2020 use 5e-3)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate, select and keep an exponential moving average of the weights with this decay "
                        "and the warm-up min(DECAY, (1+t)/(10+t)) (every method; e.g. 0.999)")
    g.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                   help="mixup with lam ~ Beta(ALPHA, ALPHA) per batch (natural); for pgd interpolated adversarial "
                        "training: mixed clean and mixed adversarial losses averaged (Lamb et al. 2019)")
    g.add_argument("--cutmix", type=float, default=None, metavar="ALPHA",
                   help="CutMix with lam ~ Beta(ALPHA, ALPHA) per batch: a box of the image from a partner, the "
                        "mixed label attacked and trained on (pgd, trades, fgsm, free, fgsm_sdi, dale, dale_pd, "
                        "augrmix, natural; Rebuffi et al. 2021 use ALPHA 1 with --ema; not with --mixup)")
    _add_robust_mixup(g)
    _add_coreset(p)
    _add_optimisation(p)
    g = p.add_argument_group("validation, checkpoints")
    g.add_argument("--val-eps", type=fraction("eps"), default=None, help="validation PGD eps (None: eps; 0: none)")
    g.add_argument("--val-steps", type=int, default=10, help="validation PGD steps")
    g.add_argument("--patience", type=int, default=None, help="early stopping after this many epochs without "
                                                              "improvement of the selected validation metric")
    g.add_argument("--select", default=None, choices=list(train.METRICS),
                   help="validation metric that picks the best epoch (None: the method's own); for certified "
                        "methods also acr (mean IBP radius capped at eps) and acceps (sqrt(clean acc x acr / eps), "
                        "the ACERT authors' rule)")
    g.add_argument("--keep-all", action="store_true", help="keep a checkpoint file per epoch")
    g.add_argument("-o", "--out", default="runs/train",
                   help="run directory: last.pt, best.pt, log.csv, summary.json (and tb/ with --tensorboard)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    g.add_argument("--force", action="store_true",
                   help="start afresh in an --out that holds a previous run, removing its checkpoints and logs "
                        "(without --resume or --force such a directory is refused)")
    g.add_argument("--test-steps", type=int, default=20, help="PGD steps of the final test evaluation (0: skip)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log every epoch's metrics for TensorBoard in --out/tb (needs the tensorboard package)")
    add_common(p)


def _add_robust_mixup(g) -> None:
    g.add_argument("--robust-mixup", type=float, default=None, metavar="ALPHA",
                   help="robust mixup with lam ~ Beta(ALPHA, ALPHA) per batch: each sample mixed with a partner "
                        "the more adverse way, the mixed label attacked and trained on (natural, pgd, trades, "
                        "ijsat, where it is on at 0.1 by default; Lau et al. 2023; not with --mixup / --cutmix)")


def method_hparams(args) -> Dict[str, Any]:
    """The methods' hyperparameters given on the command line."""
    from .. import train

    return {k: getattr(args, k) for k in train.registry.hyperparameters() if getattr(args, k, None) is not None}


def default_model(info: Dict[str, Any]) -> str:
    if len(info["input_shape"]) == 4:  # videos [T, C, H, W]
        return "video_cnn"
    C, H, W = info["input_shape"]
    return "small_cnn" if H <= 16 else "preact_resnet18"


def build_model(name: str, info: Dict[str, Any]):
    """models.get_model for the data; with the data's mean / std the model normalises inside
    (``Sequential(Normalize, net)``), so it takes [0, 1] pixels and its checkpoint rebuilds it."""
    from .. import models

    dims = model_dims(info)
    kw: Dict[str, Any] = {"num_classes": int(info["num_classes"]), "in_channels": dims["in_channels"]}
    key = name.lower().replace("-", "_")
    key = key[len(models.DENOISED_PREFIX):] if key.startswith(models.DENOISED_PREFIX) else key
    if key in ("small_cnn", "smallcnn", "cnn7", "cnn_7", "video_cnn"):  # their linear layers need it
        kw["input_size"] = dims["input_size"]
    if "frames" in dims and key == "video_cnn":
        kw["frames"] = dims["frames"]
    if info.get("mean") is not None and info.get("std") is not None:
        kw["mean"], kw["std"] = [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    return models.get_model(name, **kw), kw


def _loaders(args, train_ds, rank: int, world: int, device: torch.device):
    from torch.utils.data import DataLoader, DistributedSampler

    from .. import data as rodata

    n = len(train_ds)
    val_size = args.val_size if args.val_size is not None else min(1000, n // 10)
    if not 0 <= val_size < n:
        raise CLIError(f"--val-size must be in [0, {n}), got {val_size}")
    val_ds = None
    if val_size > 0:
        train_ds, val_ds = split_holdout(train_ds, val_size, args.seed)
    bs = args.batch_size // world
    pin = device.type == "cuda"
    if args.extra_data is not None:  # real and generated samples mixed per batch, sharded by rank
        from .. import proxy

        if not os.path.isfile(args.extra_data):
            raise CLIError(f"--extra-data {args.extra_data!r}: no such file")
        try:
            train_loader = proxy.MixedLoader(train_ds, args.extra_data, bs, args.extra_ratio, seed=args.seed,
                                             rank=rank, world_size=world, pin_memory=pin)
        except ValueError as e:
            raise CLIError(f"--extra-data / --extra-ratio: {e}") from None
    elif world > 1:
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


def _test(args, model, hp, dev, train_time) -> dict:
    from torch.utils.data import DataLoader

    from .. import train

    test_ds, _ = load_data(args.data, "test")
    test_loader = DataLoader(test_ds, batch_size=256, shuffle=False)
    # the model holds the run's final weights already (the weight average under --ema)
    m = train.evaluate(model, test_loader, train.FitConfig.make(args.method, **{**hp, "val_steps": args.test_steps}),
                       device=dev)
    if _uses_perturbation_model(args.method) and not _corruption_network(args.method):
        # the threat model of these methods: accuracy under latent PGD in the learned set at eps
        from ..train.methods.learned import set_accuracy

        m["set_acc"] = set_accuracy(model, hp["perturbation_model"], test_loader, hp["eps"], steps=args.test_steps,
                                    seed=args.seed, device=dev)["set_acc"]
        print(f"test: clean acc {m['clean_acc']:.4f}, learned-set PGD-{args.test_steps} acc {m['set_acc']:.4f} "
              f"(latent eps {hp['eps']:.4g})")
    else:
        print(f"test: clean acc {m['clean_acc']:.4f}, PGD-{args.test_steps} acc {m['robust_acc']:.4f} "
              f"(eps {hp['eps']:.4g}, {args.norm})" + (f", noisy acc {m['noise_acc']:.4f}" if "noise_acc" in m else "")
              + (f", IBP-certified acc {m['cert_acc']:.4f}" if "cert_acc" in m else "")
              + (f", ACR {m['acr']:.4g} (radii capped at eps), acceps {m['acceps']:.4f}" if "acr" in m else ""))
    extra = [k for k in ("cert_acc", "acr", "acceps", "set_acc") if k in m]
    cols = ["method", "clean_acc", "robust_acc", "eps", "steps", "train_time"] + extra
    with open(os.path.join(args.out, "test.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerow([args.method, m["clean_acc"], m["robust_acc"], hp["eps"], args.test_steps, train_time]
                   + [m[k] for k in extra])
    return m


def run(args) -> int:
    import math

    from .. import train

    check_data_spec(args.data)
    dataset_defaults(args)
    if args.method not in train.METHODS:
        raise CLIError(f"--method must be one of {', '.join(train.METHODS)}; got {args.method!r}")
    require_min(batch_size=(args.batch_size, 1))
    check_writable(os.path.join(args.out, "last.pt"), "--out")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise CLIError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    train_ds, info = load_data(args.data, "train")
    args.ood_images = _ood_images(args, info)  # checked before any work
    warn_empty_classes(train_ds, info, "train")  # a stray label 12 makes a 13-class model: say so
    setup_run(args, sample_numel=math.prod(info["input_shape"]))
    if args.test_steps > 0:
        load_data(args.data, "test")  # the final evaluation's data, checked now rather than after training
    eps = _learned_eps(args)
    if eps is None:
        # the moving digits: 8/255, where PGD-AT learns (at 0.05 and above it stays at chance; see the README)
        eps = args.eps if args.eps is not None else {"digits": 0.2}.get(info["name"], 8 / 255)
    hp = dict(epochs=args.epochs, eps=eps, alpha=args.alpha, steps=args.steps, norm=args.norm,
              random_start=not args.no_random_start, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
              milestones=args.milestones, gamma=args.gamma, grad_clip=args.grad_clip, amp=args.amp, channels_last=args.channels_last,
              seed=args.seed, val_eps=args.val_eps, val_steps=args.val_steps, patience=args.patience,
              select=args.select, keep_all=args.keep_all, awp=args.awp, ema=args.ema, mixup=args.mixup, cutmix=args.cutmix,
              robust_mixup=args.robust_mixup,
              **schedule_hparams(args), **method_hparams(args))
    given = {k: getattr(args, k) for k in ("coreset_frac", "coreset_every", "coreset_warmup")
             if getattr(args, k) is not None}
    if args.coreset is None and given:
        raise CLIError(f"--{next(iter(given)).replace('_', '-')} is a setting of --coreset, which is not given")
    if args.coreset is not None:
        hp.update(coreset=args.coreset, **given)
    if args.coreset is not None and args.extra_data is not None:
        raise CLIError("--coreset selects from the training set alone; it cannot be combined with --extra-data")
    hp.update(_ood_hparams(args))
    if args.perturbation_model is not None:
        hp["perturbation_model"] = os.path.abspath(args.perturbation_model)
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


def _ood_hparams(args) -> Dict[str, Any]:
    """--ood-ratio / --ood-weight as FitConfig settings (checked against --ood-data and --extra-data)."""
    if args.ood_data is None:
        given = [f for f, v in (("--ood-ratio", args.ood_ratio), ("--ood-weight", args.ood_weight)) if v is not None]
        if given:
            raise CLIError(f"{given[0]} is a setting of --ood-data, which is not given")
        return {}
    if args.extra_data is not None:
        raise CLIError("--ood-data cannot be combined with --extra-data (one mixed loader per run)")
    ratio = 0.5 if args.ood_ratio is None else args.ood_ratio
    if not 0 < ratio < 1:
        raise CLIError(f"--ood-ratio must be in (0, 1) with --ood-data, got {ratio}")
    return {"ood_ratio": ratio, "ood_weight": 1.0 if args.ood_weight is None else args.ood_weight}


def _ood_images(args, info):
    """The --ood-data images at the training data's shape (robustops.ood.load_ood), or None."""
    if args.ood_data is None:
        return None
    from ..ood import load_ood

    try:
        return load_ood(args.ood_data, info["input_shape"], args.seed)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--ood-data: {e}") from None


def _uses_perturbation_model(method: str) -> bool:
    from .. import train

    return train.registry.get(method).uses_perturbation_model


def _corruption_network(method: str) -> bool:
    """Whether --perturbation-model is an image-to-image corruption network (ada), not a latent set."""
    from .. import train

    return bool(getattr(train.registry.get(method), "corruption_network", False))


def add_schedule_flags(p) -> None:
    """--budget-schedule and its settings (robustops.train.budget), FitConfig's defaults shown; and
    --eps-schedule (the certified methods' ramp shape, added with the methods' flags) also takes the
    budget schedules: for the methods that schedule their attack budget it spells --budget-schedule
    (``budget.check_budget_spelling``)."""
    from .. import train
    from ..train import budget

    having = ", ".join(n for n in train.METHODS if train.registry.get(n).budget_schedules)
    for action in p._actions:
        if action.dest == "eps_schedule" and action.choices:
            action.choices = list(dict.fromkeys(list(action.choices) + list(budget.BUDGET_SCHEDULES)))
            action.help += f"; {having}: the attack-budget schedule (--budget-schedule)"
    d = budget.SCHEDULE_DEFAULTS
    g = p.add_argument_group(f"attack-budget schedule ({having}; Kinfu & Vidal 2022)")
    g.add_argument("--budget-schedule", default=d["budget_schedule"], choices=list(budget.BUDGET_SCHEDULES),
                   help="the budget of each minibatch: constant (eps), linear ramp, curriculum (rising per-stage "
                        "levels) or adaptive (drawn from a grid with probabilities proportional to the model's "
                        "adversarial loss); the step size follows it")
    g.add_argument("--budget-start", type=float, default=d["budget_start"],
                   help="linear / curriculum: the first budget as a fraction of eps")
    g.add_argument("--budget-warmup", type=float, default=d["budget_warmup"],
                   help="linear / curriculum: the fraction of the run over which the budget rises")
    g.add_argument("--budget-stages", type=int, default=d["budget_stages"],
                   help="curriculum: the number of budget levels (None: one per epoch)")
    g.add_argument("--budget-grid", type=int, default=d["budget_grid"],
                   help="adaptive: the number of budgets of its grid, 0 to eps")
    g.add_argument("--budget-every", type=int, default=d["budget_every"],
                   help="adaptive: epochs between estimates of its distribution")
    g.add_argument("--budget-adapt", default=d["budget_adapt"], choices=list(budget.BUDGET_ADAPT),
                   help="adaptive: one budget drawn per batch, or one per sample")


def schedule_hparams(args):
    """The schedule settings of parsed arguments, as FitConfig keywords."""
    return {k: getattr(args, k) for k in ("budget_schedule", "budget_start", "budget_warmup", "budget_stages",
                                          "budget_grid", "budget_every", "budget_adapt")}


def _learned_eps(args):
    """For the methods that train against a learned perturbation set: --perturbation-model checked, and the
    latent radius (--eps, else the checkpoint's eps); None for the other methods."""
    uses = _uses_perturbation_model(args.method)
    if not uses:
        if args.perturbation_model is not None:
            from .. import train

            learned = [m for m in train.METHODS if _uses_perturbation_model(m)]
            raise CLIError(f"--perturbation-model is a setting of the methods {', '.join(learned)}, not of "
                           f"--method {args.method}")
        return None
    if _corruption_network(args.method):  # its file is checked with the config; --eps does not apply
        if args.perturbation_model is None:
            raise CLIError(f"--method {args.method} needs --perturbation-model CKPT (its corruption network: robustops "
                           f"perturbation train --kind autoencoder, or a CVAE checkpoint)")
        return None
    if args.perturbation_model is None:
        raise CLIError(f"--method {args.method} needs --perturbation-model CKPT (a learned perturbation set: "
                       f"robustops.perturbation's checkpoint)")
    if args.eps is not None:
        if not os.path.isfile(args.perturbation_model):
            raise CLIError(f"--perturbation-model: no checkpoint at {args.perturbation_model!r}")
        return args.eps
    from ..perturbation import load_perturbation_model

    try:
        pm = load_perturbation_model(args.perturbation_model, "cpu")
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--perturbation-model: {e}") from None
    if getattr(pm, "eps", None) is None:
        raise CLIError(f"--eps is required: the perturbation checkpoint {args.perturbation_model!r} stores no eps "
                       f"(the latent radius of its set)")
    return float(pm.eps)


RUN_FILES = ("last.pt", "best.pt", "log.csv", "test.csv", "summary.json")


def _prepare_run_dir(args) -> None:
    """Rank 0, holding the directory's lock: a fresh run refuses a directory that holds a previous
    run unless --force (then its files go, so no stale best.pt or log sits beside the new run's)."""
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    old += sorted(f for f in os.listdir(args.out) if f.startswith("epoch_") and f.endswith(".pt")) \
        if os.path.isdir(args.out) else []
    old += ["tb"] if os.path.isdir(os.path.join(args.out, "tb")) else []
    if args.resume and args.force:
        raise CLIError("--resume continues the run in --out and --force replaces it: give one of them")
    if args.resume or not old:
        return
    if not args.force:
        raise CLIError(f"--out {args.out} holds a previous run ({', '.join(old)}); --resume continues it, --force "
                       f"starts afresh (removing it)")
    import shutil

    for f in old:
        path = os.path.join(args.out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _train(args, info, train_ds, hp, d) -> None:
    import torch

    from .. import train

    if args.batch_size % d.world:
        raise CLIError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({d.world})")
    torch.manual_seed(args.seed)
    name = args.model or default_model(info)
    variant = getattr(train.registry.get(args.method), "model_variant", None)
    if variant is not None:  # e.g. denoise trains the model behind a denoiser: "denoised_<model>"
        name = variant(name)
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
                        model_name=name, model_kwargs=model_kwargs, extra={"data": args.data},
                        tensorboard=os.path.join(args.out, "tb") if args.tensorboard else None,
                        threads=args.threads, ood_data=args.ood_images, **hp)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if d.rank != 0:
        return
    test = _test(args, model, hp, d.device, res.train_time) if args.test_steps > 0 else None
    summary = write_summary(os.path.join(args.out, "summary.json"), {
        "command": "train", "method": args.method, "label": res.config.label if res.config else args.method,
        "model": name, "data": args.data, "eps": hp["eps"], "batch_size": args.batch_size, "val_size": val_size,
        "norm": args.norm, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "select": res.select,
        "best_metric": res.best_metric, "stopped_early": res.stopped_early, "train_time_s": res.train_time,
        "last_epoch": res.last, "test": test, "threads": args.threads,
        "extra_data": None if args.extra_data is None else {"path": os.path.abspath(args.extra_data),
                                                            "ratio": args.extra_ratio},
        "ood_data": None if args.ood_data is None else {"spec": args.ood_data, "ratio": hp["ood_ratio"],
                                                        "weight": hp["ood_weight"], "images": len(args.ood_images)},
        "config": dataclasses.asdict(res.config) if res.config else None})
    print(f"checkpoints and log in {args.out}/ (best epoch {res.best_epoch}); summary -> {summary}")
