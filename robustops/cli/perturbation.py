"""`robustops perturbation train|quality|show`: learned perturbation sets (a conditional VAE, Wong and
Kolter 2021) on pairs (x, x_perturbed): train one and report its quality with the chosen eps, measure a
trained one on held-out pairs, or draw members of its set next to true perturbations."""
from __future__ import annotations

import argparse
import json
import os

from .common import CLIError, add_common, check_writable, fraction, fractions, pick_device, require_min, setup_run, \
    split_holdout, write_summary

HELP = "learned perturbation sets (conditional VAE), AdA's corruption networks (--kind autoencoder) and normalising " \
       "flows (--kind flow): train, quality, show"

_DATA_HELP = 'pairs: "digits" (the embedded digits, perturbed by rotation, translation, scaling and stroke ' \
             'thickness) or npz:PATH (arrays x, x_perturbed, optionally y)'


#: the models `perturbation train` trains (--kind)
KINDS = ("cvae", "autoencoder", "flow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train a perturbation model; writes model.pt, last.pt, log.csv, summary.json",
                       formatter_class=fmt)
    t.add_argument("--data", default="digits", help=_DATA_HELP)
    t.add_argument("--kind", choices=KINDS, default="cvae",
                   help="cvae: the conditional VAE on pairs (a learned perturbation set); autoencoder: a small "
                        "conv autoencoder trained on the --data images (x of each pair) by reconstruction, "
                        "AdversarialAugment's corruption network (--method ada); the CVAE-only flags (--beta, "
                        "--latent-dim, --percentile, ...) do not apply to it; flow: a Glow-style normalising flow "
                        "trained on the --data images by maximum likelihood (exact bits/dim; the joint-space threat "
                        "model's G), with the --flow-* flags")
    t.add_argument("-o", "--out", required=True, help="run directory")
    t.add_argument("--epochs", type=int, default=None, help="(None: 20; 15 for --kind flow)")
    t.add_argument("--lr", type=fraction("--lr"), default=None, help="Adam's (None: 2e-3; 5e-3 for --kind flow)")
    t.add_argument("--beta", type=fraction("--beta"), default=0.01,
                   help="KL weight of the ELBO (squared error summed over pixels + beta * KL)")
    t.add_argument("--warmup", type=fraction("--warmup"), default=0.0, help="epochs of linear beta warm-up")
    t.add_argument("--latent-dim", type=int, default=8)
    t.add_argument("--width", type=int, default=32, help="channels of the first convolution")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    t.add_argument("--percentile", type=float, default=95.0,
                   help="eps = this percentile of the training pairs' latent norms")
    t.add_argument("--repeats", type=int, default=1, help="digits: perturbed pairs per training image")
    t.add_argument("--fixed-pairs", action="store_true",
                   help="digits: one fixed perturbation per training image (default: fresh perturbations every "
                        "epoch, keyed by seed, epoch and index, as the reference code samples)")
    t.add_argument("--crop-flip", type=int, default=0, metavar="PAD",
                   help="a random crop after PAD pixels of zero padding and a random horizontal flip, the same for "
                        "both images of each training pair, new every epoch (0: off; the reference uses 4 on CIFAR-10)")
    t.add_argument("--family", default="all",
                   help="digits: the known perturbation family or families (comma list; item i from family i mod k) "
                        "of the pairs: all (every transformation at once), rotation, translation, scaling, "
                        "thickness, linf (uniform noise in the L-inf ball of --linf-eps)")
    t.add_argument("--linf-eps", type=fraction("--linf-eps"), default=0.2,
                   help="digits: the radius of the linf family, in [0, 1]")
    t.add_argument("--val-size", type=int, default=None,
                   help="npz: pairs held out for the quality report (None: 10%%)")
    t.add_argument("--approx-steps", type=int, default=50,
                   help="latent PGD steps of the approximation error (0: skip it)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--flow-depth", type=int, default=4, help="flow: Glow steps per scale")
    t.add_argument("--flow-hidden", type=int, default=64, help="flow: channels of each coupling network")
    t.add_argument("--flow-levels", type=int, default=0, help="flow: scales (0: 1 up to 8x8, 2 up to 16x16, else 3)")
    t.add_argument("--flow-bins", type=int, default=0,
                   help="flow: the levels of the quantised pixels, for the dequantisation noise and bits/dim (0: 17 "
                        "for the digits, whose pixels are k/16; else 256)")
    add_common(t)

    q = sub.add_parser("quality", help="quality of a trained perturbation set on held-out pairs", formatter_class=fmt)
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", default="digits", help=_DATA_HELP + "; digits: the test split")
    q.add_argument("--eps", type=fraction("--eps"), default=None, help="radius (None: the checkpoint's)")
    q.add_argument("--approx-steps", type=int, default=50)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("-o", "--out", default=None, help="JSON summary (None: printed only)")
    add_common(q)

    s = sub.add_parser("show", help="a grid of inputs, true perturbations and members of the learned set",
                       formatter_class=fmt)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("-o", "--out", required=True, help="the picture (PNG; a PDF goes beside it)")
    s.add_argument("--data", default="digits", help=_DATA_HELP + "; digits: the test split")
    s.add_argument("--inputs", type=int, default=6, help="rows (inputs)")
    s.add_argument("--true", type=int, default=3, help="digits: true perturbations per input")
    s.add_argument("--samples", type=int, default=4, help="members of S(x) per eps")
    s.add_argument("--eps-list", type=fractions("--eps-list"), default=None,
                   help="radii, comma-separated (None: half, one and one and a half times the checkpoint's eps)")
    add_common(s)


def _pairs(spec: str, split: str, seed: int, repeats: int = 1, fresh: bool = False, family=("all",),
           linf_eps: float = 0.2):
    """(dataset, description) of a pairs spec; CLIError naming --data otherwise. fresh: digits' perturbations
    new every epoch (training pairs); family, linf_eps: DigitsPairs' (checked by :func:`_families`)."""
    from .. import perturbation as P

    if spec == "digits":
        return P.DigitsPairs(split, seed=seed if split == "train" else seed + 1, repeats=repeats,
                             fresh=fresh, family=family, linf_eps=linf_eps), "digits"
    kind, sep, path = spec.partition(":")
    if not sep or kind.lower() != "npz":
        raise CLIError(f'--data {spec!r}: expected "digits" or npz:PATH (a .npz with arrays x, x_perturbed, '
                       f'optionally y)')
    path = os.path.expanduser(path)
    try:
        return P.NpzPairs(path), f"npz:{os.path.abspath(path)}"
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise CLIError(f"--data {spec!r}: {msg}") from None


def _families(args):
    """(the families, linf_eps) of --family / --linf-eps, checked; digits pairs only."""
    from ..perturbation import families

    try:
        fams = families.parse_families(args.family, "--family")
        linf_eps = families.check_linf_eps(args.linf_eps)
    except ValueError as e:
        raise CLIError(str(e).replace("linf_eps", "--linf-eps", 1)) from None
    if args.data != "digits" and (fams != ("all",) or args.linf_eps != 0.2):
        raise CLIError(f"--family / --linf-eps choose the digits' perturbations; --data {args.data!r} brings its own")
    return fams, linf_eps


def _load(path: str, device):
    from .. import perturbation as P

    try:
        return P.load_perturbation_model(path, device)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--checkpoint: {e}") from None


def _shape_check(model, ds, device) -> None:
    import torch

    x = ds[0][0].unsqueeze(0).to(device)
    try:
        with torch.no_grad():
            model.prior(x)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--checkpoint: the perturbation model does not accept --data inputs of shape "
                       f"{list(x.shape[1:])} ({str(e).splitlines()[0]})") from None


def _print_quality(q: dict) -> None:
    approx = f"{q['approx_mse']:.5f}" if q.get("approx_mse") is not None else "-"
    print(f"held-out pairs: {q['n']}  eps {q['eps']:.4g}  coverage {q['coverage']:.3f}  recon_mse {q['recon_mse']:.5f}"
          f"  identity_mse {q['identity_mse']:.5f}  approx_mse {approx}  prior_mean_mse {q['prior_mean_mse']:.5f}")
    if "expected_mse" in q:  # the paper's sufficient likelihood and the likelihood bound
        print(f"random members: expected_mse {q['expected_mse']:.5f} (u in the eps-ball)  prior_expected_mse "
              f"{q['prior_expected_mse']:.5f} (u ~ N(0, I))  nll_bound {q['nll_bound']:.2f} nats per pair")


def _train(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .. import perturbation as P

    flow = args.kind == "flow"
    args.epochs = args.epochs if args.epochs is not None else (15 if flow else 20)
    args.lr = args.lr if args.lr is not None else (5e-3 if flow else 2e-3)
    if args.kind == "autoencoder":
        return _train_autoencoder(args)
    if flow:
        return _train_flow(args)
    require_min(epochs=(args.epochs, 1), latent_dim=(args.latent_dim, 1), width=(args.width, 1),
                batch_size=(args.batch_size, 1), repeats=(args.repeats, 1), approx_steps=(args.approx_steps, 0),
                workers=(args.workers, 0))
    if args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.beta < 0 or args.warmup < 0:
        raise CLIError(f"--beta and --warmup must be >= 0, got {args.beta} and {args.warmup}")
    if not 0 <= args.percentile <= 100:
        raise CLIError(f"--percentile must lie in [0, 100], got {args.percentile}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a directory")
    dev = pick_device(args.device)
    if args.crop_flip < 0:
        raise CLIError(f"--crop-flip must be >= 0 (pixels of padding; 0: off), got {args.crop_flip}")
    fams, linf_eps = _families(args)
    train_ds, source = _pairs(args.data, "train", args.seed, args.repeats, fresh=not args.fixed_pairs, family=fams,
                              linf_eps=linf_eps)
    if args.data == "digits":
        held_ds, _ = _pairs(args.data, "test", args.seed, family=fams, linf_eps=linf_eps)
    else:
        n = len(train_ds)
        val = args.val_size if args.val_size is not None else max(1, n // 10)
        if not 1 <= val < n:
            raise CLIError(f"--val-size must be in [1, {n - 1}] for {n} pairs, got {val}")
        train_ds, held_ds = split_holdout(train_ds, val, args.seed)
    x0 = train_ds[0][0]
    if x0.dim() != 3 or x0.shape[1] != x0.shape[2]:
        raise CLIError(f"--data: the default CVAE takes square images [C, S, S], got {list(x0.shape)}")
    setup_run(args, x0.numel())
    C, S = int(x0.shape[0]), int(x0.shape[1])
    torch.manual_seed(args.seed)  # the initial weights
    try:
        model = P.CVAE(C, S, latent_dim=args.latent_dim, width=args.width)
    except ValueError as e:
        raise CLIError(f"--data: {e}") from None
    fit_ds = P.CropFlipPairs(train_ds, args.crop_flip, seed=args.seed) if args.crop_flip > 0 else train_ds
    loader = DataLoader(fit_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(train_ds) > args.batch_size)
    eval_train = DataLoader(train_ds, batch_size=256, num_workers=args.workers)
    held = DataLoader(held_ds, batch_size=256, num_workers=args.workers)
    _open_run_dir(args)
    try:
        res = P.fit_perturbation(model, loader, args.epochs, args.lr, beta=args.beta, warmup=args.warmup,
                                 amp=None if args.amp == "none" else args.amp, device=dev, out_dir=args.out,
                                 resume=args.resume, progress=args.progress, seed=args.seed, val_loader=held,
                                 verbose=True, data_settings=_data_settings(args, source, fams, linf_eps))
    except ValueError as e:
        raise CLIError(str(e)) from None
    eps = P.choose_eps(model, eval_train, args.percentile, dev)
    model.eps = eps
    q = P.quality(model, held, eps, approx_steps=args.approx_steps, device=dev)
    path = P.save_perturbation_model(os.path.join(args.out, "model.pt"), model, percentile=args.percentile,
                                     data=source, quality=q)
    _print_quality(q)
    summary = {"command": "perturbation train", "data": source, "checkpoint": os.path.abspath(path),
               "eps": eps, "percentile": args.percentile, "quality": q, "train_pairs": len(train_ds),
               "held_out_pairs": len(held_ds), "epochs": args.epochs, "train_time": res.train_time,
               "history": res.history,
               "settings": {k: v for k, v in vars(args).items() if k not in ("func",)}}
    out_json = write_summary(os.path.join(args.out, "summary.json"), summary)
    print(f"model -> {path} (eps {eps:.4g}, the {args.percentile:g}th percentile of the training latent norms); "
          f"summary -> {out_json}")
    return 0


def _image_data(args):
    """(training images, held-out images, source) for --kind autoencoder: the digits' train / test splits
    (x, y), or the x of --data npz:PATH's pairs with --val-size held out."""
    from ..data import load_digits

    if args.data == "digits":
        return load_digits("train"), load_digits("test"), "digits"
    ds, source = _pairs(args.data, "train", args.seed)
    n = len(ds)
    val = args.val_size if args.val_size is not None else max(1, n // 10)
    if not 1 <= val < n:
        raise CLIError(f"--val-size must be in [1, {n - 1}] for {n} pairs, got {val}")
    train_ds, held_ds = split_holdout(ds, val, args.seed)
    return train_ds, held_ds, source


def _train_autoencoder(args) -> int:
    """`perturbation train --kind autoencoder`: AdA's corruption network (robustops.perturbation.CorruptionAE)
    trained by reconstruction through fit_perturbation (checkpoints, --resume, log.csv); model.pt and
    summary.json as for the CVAE, with the held-out reconstruction error in place of the set's quality."""
    import torch
    from torch.utils.data import DataLoader

    from .. import perturbation as P

    require_min(epochs=(args.epochs, 1), width=(args.width, 1), batch_size=(args.batch_size, 1),
                workers=(args.workers, 0))
    if args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a directory")
    dev = pick_device(args.device)
    train_ds, held_ds, source = _image_data(args)
    x0 = train_ds[0][0]
    if x0.dim() != 3:
        raise CLIError(f"--data: the autoencoder takes images [C, H, W], got {list(x0.shape)}")
    setup_run(args, x0.numel())
    torch.manual_seed(args.seed)  # the initial weights
    model = P.CorruptionAE(int(x0.shape[0]), width=args.width)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(train_ds) > args.batch_size)
    held = DataLoader(held_ds, batch_size=256, num_workers=args.workers)
    _open_run_dir(args)
    try:
        res = P.fit_perturbation(model, loader, args.epochs, args.lr, amp=None if args.amp == "none" else args.amp,
                                 device=dev, out_dir=args.out, resume=args.resume, progress=args.progress,
                                 seed=args.seed, val_loader=held, verbose=True,
                                 data_settings={"--data": source, "--kind": "autoencoder"})
    except ValueError as e:
        raise CLIError(str(e)) from None
    mse = res.last.get("val_recon_mse")
    path = P.save_perturbation_model(os.path.join(args.out, "model.pt"), model, data=source)
    summary = {"command": "perturbation train", "kind": "autoencoder", "data": source,
               "checkpoint": os.path.abspath(path), "held_out_recon_mse": mse, "train_images": len(train_ds),
               "held_out_images": len(held_ds), "epochs": args.epochs, "train_time": res.train_time,
               "history": res.history, "settings": {k: v for k, v in vars(args).items() if k not in ("func",)}}
    out_json = write_summary(os.path.join(args.out, "summary.json"), summary)
    print(f"held-out images: {len(held_ds)}  recon_mse {mse:.5f}\nmodel -> {path} (a corruption network for "
          f"--method ada); summary -> {out_json}")
    return 0


def _train_flow(args) -> int:
    """`perturbation train --kind flow`: a normalising flow (robustops.perturbation.Flow) trained on the --data
    images by maximum likelihood through fit_perturbation (checkpoints, --resume, log.csv of train / held-out
    bits/dim); model.pt and summary.json with the final held-out bits/dim."""
    import math

    import torch
    from torch.utils.data import DataLoader

    from .. import perturbation as P

    require_min(epochs=(args.epochs, 1), batch_size=(args.batch_size, 1), workers=(args.workers, 0),
                flow_depth=(args.flow_depth, 1), flow_hidden=(args.flow_hidden, 1), flow_levels=(args.flow_levels, 0))
    if args.flow_bins == 1 or args.flow_bins < 0:
        raise CLIError(f"--flow-bins must be 0 (automatic) or an int >= 2, got {args.flow_bins}")
    if args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.amp != "none":
        raise CLIError(f"--amp must be none for --kind flow (its inverse and log-determinant run in float32), got "
                       f"{args.amp}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a directory")
    dev = pick_device(args.device)
    train_ds, held_ds, source = _image_data(args)
    x0 = train_ds[0][0]
    if x0.dim() != 3 or x0.shape[1] != x0.shape[2]:
        raise CLIError(f"--data: the flow takes square images [C, S, S], got {list(x0.shape)}")
    setup_run(args, x0.numel())
    bins = args.flow_bins or (17 if source == "digits" else 256)
    torch.manual_seed(args.seed)  # the initial weights
    try:
        model = P.Flow(int(x0.shape[0]), int(x0.shape[1]), depth=args.flow_depth, hidden=args.flow_hidden,
                       levels=args.flow_levels or None, bins=bins)
    except ValueError as e:
        raise CLIError(f"--data / --flow-levels: {e}") from None
    except ImportError as e:
        raise CLIError(str(e)) from None
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(train_ds) > args.batch_size)
    held = DataLoader(held_ds, batch_size=256, num_workers=args.workers)
    _open_run_dir(args)
    flow_settings = {"--data": source, "--kind": "flow", "--flow-depth": args.flow_depth,
                     "--flow-hidden": args.flow_hidden, "--flow-levels": args.flow_levels, "--flow-bins": bins}
    try:
        res = P.fit_perturbation(model, loader, args.epochs, args.lr, schedule="cosine", device=dev, out_dir=args.out,
                                 resume=args.resume, progress=args.progress, seed=args.seed, val_loader=held,
                                 verbose=True, data_settings=flow_settings)
    except ValueError as e:
        raise CLIError(str(e)) from None
    bpd = res.last.get("val_bpd")
    path = P.save_perturbation_model(os.path.join(args.out, "model.pt"), model, data=source, held_out_bpd=bpd)
    summary = {"command": "perturbation train", "kind": "flow", "data": source, "checkpoint": os.path.abspath(path),
               "held_out_bpd": bpd, "train_bpd": res.last.get("bpd"), "uniform_bpd": math.log2(bins), "bins": bins,
               "train_images": len(train_ds), "held_out_images": len(held_ds), "epochs": args.epochs,
               "train_time": res.train_time, "history": res.history,
               "settings": {k: v for k, v in vars(args).items() if k not in ("func",)}}
    out_json = write_summary(os.path.join(args.out, "summary.json"), summary)
    print(f"held-out images: {len(held_ds)}  bits/dim {bpd:.4f} (uniform over {bins} levels: {math.log2(bins):.4f})\n"
          f"model -> {path} (a normalising flow); summary -> {out_json}")
    return 0


def _open_run_dir(args) -> None:
    """Creates --out; a fresh run refuses one that holds a run already (last.pt) unless --resume."""
    os.makedirs(args.out, exist_ok=True)
    if not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        raise CLIError(f"--out {args.out!r} already holds a run (last.pt); pass --resume to continue it or choose "
                       f"another directory")


def _data_settings(args, source: str, fams, linf_eps) -> dict:
    """How the training pairs are made, under the flags' names: a resumed run must make them the same way
    (fit_perturbation refuses otherwise, naming the flag)."""
    return {"--data": source, "--repeats": args.repeats, "--fixed-pairs": bool(args.fixed_pairs),
            "--crop-flip": int(args.crop_flip), "--family": ",".join(fams), "--linf-eps": float(linf_eps)}


def _quality(args) -> int:
    from torch.utils.data import DataLoader

    from .. import perturbation as P

    require_min(approx_steps=(args.approx_steps, 0), batch_size=(args.batch_size, 1))
    if args.out:
        check_writable(args.out, "-o")
    dev = pick_device(args.device)
    model = _load(args.checkpoint, dev)
    if P.is_flow(model):
        return _flow_quality(args, model, dev)
    ds, source = _pairs(args.data, "test", args.seed)
    setup_run(args, ds[0][0].numel())
    _shape_check(model, ds, dev)
    eps = args.eps if args.eps is not None else model.eps
    if eps is None:
        raise CLIError("--eps is needed: the checkpoint holds no eps")
    if eps < 0:
        raise CLIError(f"--eps must be >= 0, got {eps}")
    q = P.quality(model, DataLoader(ds, batch_size=args.batch_size), eps, approx_steps=args.approx_steps, device=dev)
    _print_quality(q)
    if args.out:
        write_summary(args.out, {"command": "perturbation quality", "checkpoint": os.path.abspath(args.checkpoint),
                                 "data": source, "quality": q})
        print(f"summary -> {args.out}")
    else:
        print(json.dumps(q))
    return 0


def _show(args) -> int:
    import torch

    from .. import perturbation as P

    require_min(inputs=(args.inputs, 1), true=(args.true, 1), samples=(args.samples, 1))
    check_writable(args.out, "-o")
    dev = pick_device(args.device)
    model = _load(args.checkpoint, dev)
    if P.is_flow(model):
        return _flow_show(args, model, dev)
    if args.data == "digits":
        ds = P.DigitsPairs("test", seed=args.seed + 1, repeats=args.true)
        n_img = ds.images.shape[0]
        rows = min(args.inputs, n_img)
        x, xt = [], []
        for i in range(rows):
            xi, xti, _ = ds.pair([i + j * n_img for j in range(args.true)])
            x.append(xi[0])
            xt.append(xti)
        x, xt = torch.stack(x), torch.stack(xt)
        source = "digits"
    else:
        ds, source = _pairs(args.data, "test", args.seed)
        rows = min(args.inputs, len(ds))
        x = torch.stack([ds[i][0] for i in range(rows)])
        xt = torch.stack([ds[i][1] for i in range(rows)])
    setup_run(args, x[0].numel())
    _shape_check(model, [(x[0], xt[0])], dev)
    if args.eps_list is not None:
        eps_list = args.eps_list
    elif model.eps is not None:
        eps_list = [0.5 * model.eps, model.eps, 1.5 * model.eps]
    else:
        raise CLIError("--eps-list is needed: the checkpoint holds no eps")
    if any(e < 0 for e in eps_list):
        raise CLIError(f"--eps-list entries must be >= 0, got {eps_list}")
    paths = P.plot_perturbations(model, x.to(dev), xt.to(dev), eps_list, args.out, n=args.samples, seed=args.seed,
                                 title=f"{source}: eps {', '.join(f'{e:.3g}' for e in eps_list)}")
    print(f"picture -> {paths[0]} and {paths[1]}")
    return 0


def _flow_images(args, model):
    """(images [N, C, S, S], source) a flow is measured or shown on: the digits' test split, or the x of
    --data npz:PATH's pairs; CLIError when their shape is not the flow's."""
    import torch

    from ..data import load_digits

    if args.data == "digits":
        x, source = load_digits("test").tensors[0], "digits"
    else:
        ds, source = _pairs(args.data, "test", args.seed)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    if tuple(x.shape[1:]) != tuple(model.image_shape):
        raise CLIError(f"--checkpoint: the flow models images of shape {list(model.image_shape)}, --data has "
                       f"{list(x.shape[1:])}")
    return x, source


def _flow_quality(args, model, dev) -> int:
    """`perturbation quality` of a flow: the mean bits/dim of the --data images (one dequantisation draw per
    image, keyed by --seed)."""
    import math

    import torch

    x, source = _flow_images(args, model)
    setup_run(args, x[0].numel())
    g = torch.Generator(device=dev).manual_seed(args.seed)
    with torch.no_grad():
        bpd = torch.cat([model.bits_per_dim(b.to(dev), g) for b in x.split(args.batch_size)])
    q = {"n": int(x.shape[0]), "bpd": bpd.mean().item(), "uniform_bpd": math.log2(model.bins)}
    print(f"held-out images: {q['n']}  bits/dim {q['bpd']:.4f} (uniform: {q['uniform_bpd']:.4f})")
    if args.out:
        write_summary(args.out, {"command": "perturbation quality", "kind": "flow", "data": source,
                                 "checkpoint": os.path.abspath(args.checkpoint), "quality": q})
        print(f"summary -> {args.out}")
    return 0


def _flow_show(args, model, dev) -> int:
    """`perturbation show` of a flow: --inputs images of --data, their reconstructions decode(encode(x)) and
    --inputs samples at temperatures 0.7 and 1 (seeded by --seed), one row each."""
    import torch

    from ..plotting import plot_image_grid

    x, source = _flow_images(args, model)
    x = x[:args.inputs].to(dev)
    setup_run(args, x[0].numel())
    g = torch.Generator(device=dev).manual_seed(args.seed)
    with torch.no_grad():
        rec = model.decode(model.encode(x)).clamp(0, 1)
    rows = {"data": x, "reconstruction": rec}
    for t in (0.7, 1.0):
        rows[f"samples T={t:g}"] = model.sample(x.shape[0], t, g)
    as_arrays = {k: [im[0].cpu().numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).cpu().numpy() for im in v]
                 for k, v in rows.items()}
    paths = plot_image_grid(args.out, as_arrays, title=f"{source}: a normalising flow")
    print(f"picture -> {paths[0]} and {paths[1]}")
    return 0


def run(args) -> int:
    return {"train": _train, "quality": _quality, "show": _show}[args.action](args)
