"""`robustops demo`: the main job on the embedded digits data: train several methods, evaluate clean,
PGD and APGD-CE+T accuracy, certify the models trained for smoothing (randomized smoothing, L2) and
every model with interval bound propagation (L-inf), print and write a comparison table and plots;
then the section on learned perturbation sets (``demo_learned``)."""
from __future__ import annotations

import argparse
import csv
import math
import os
import time
from typing import List, Optional

from . import (demo_autoattack, demo_certified, demo_corruptions, demo_learned, demo_objectives, demo_threat,
               demo_video)
from .common import (DIGITS_MODEL, CLIError, add_common, alias, fmt_pct, fraction, physical_cores, pick_device,
                     require_min, setup_run, split_holdout, write_summary)
from .train import add_method_flags, method_hparams

HELP = ("train natural / PGD / free / FGSM-SDI / PGD+coreset / Gaussian / consistency / MACER / IBP / ACERT / "
        "DALE-PD / PGD+AWP / PGD+EMA / PGD+proxy-data models "
        "on the embedded digits data, evaluate and certify them, print a comparison table; learn a perturbation set "
        "and train / attack / certify against it")

DEMO_METHODS = ("natural", "pgd", "free", "fgsm_sdi", "pgd+coreset", "gaussian", "consistency", "macer", "ibp", "acert",
                "dale_pd", "pgd+awp", "pgd+ema", "pgd+proxy")
#: demo rows that are a method with options: row -> (method, options). "proxy" mixes generated digits
#: (a class-conditional PCA + Gaussian-mixture generator fit on the training split) into every batch.
#: MACER runs with lambda 1 after 10 epochs of warm-up and 8 noise copies: with the paper's lambda 12 and
#: no warm-up it collapses at this learning rate on the digits (ACR 0.09; see the README).
ROW_SPECS = {"macer": ("macer", {"macer_lambda": 1.0, "macer_warmup": 10, "noise_copies": 8}),
             "pgd+awp": ("pgd", {"awp": 5e-3}), "pgd+ema": ("pgd", {"ema": 0.999}),
             "pgd+proxy": ("pgd", {"proxy": 0.5}),
             "pgd+coreset": ("pgd", {"coreset": "craig", "coreset_frac": 0.5})}
#: The models whose IBP-certified accuracy against radius the demo plots.
IBP_PLOT_METHODS = ("natural", "pgd", "ibp", "acert")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import train

    p.add_argument("-o", "--out", default="runs/demo", help="output directory")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated rows: training methods (any of {', '.join(train.METHODS)}) or "
                        f"{', '.join(ROW_SPECS)} (a method with an option)")
    p.add_argument("--proxy-n", type=int, default=10000, help="generated digits for the pgd+proxy row")
    p.add_argument("--epochs", type=int, default=30,
                   help="epochs per method (free: counted in forward/backward passes, so the data are "
                        "traversed ceil(epochs/m) times)")
    p.add_argument("--eps", type=fraction("eps"), default=0.2,
                   help="L-inf budget for training and the attack")
    p.add_argument("--steps", type=int, default=7, help="PGD-AT / TRADES inner steps")
    add_method_flags(p, defaults={"m": 4, "sigma": 0.25})
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cyclic schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=144,
                   help="training images held out to pick each method's best epoch (0: last epoch)")
    p.add_argument("--attack-steps", type=int, default=20, help="steps of the evaluation PGD attack")
    p.add_argument("--jobs", type=int, default=None,
                   help="rows trained and evaluated at once, each in its own process with --threads threads (None: "
                        "the physical cores // --threads on the CPU, at most 4, 1 on a GPU; the rows' figures do "
                        "not depend on it; the main table and the autoattack / certified sections, not the video "
                        "section, whose rows run in order)")
    p.add_argument("--section", default=None,
                   choices=[demo_autoattack.SECTION, demo_certified.SECTION, demo_video.SECTION,
                            demo_corruptions.SECTION, demo_objectives.SECTION, demo_threat.SECTION],
                   help="run one section only: autoattack (AutoAttack at its published budgets on the natural and "
                        "PGD-7 AT models, stage by stage, and the masking check on a masked-gradient model); "
                        "certified (IBP / FastIBP / CROWN-IBP / ACERT models certified with IBP, CROWN-IBP, CROWN "
                        "and best); video (natural, PGD-AT and budget-scheduled AT of a 3-D-conv model on the "
                        "moving digits); corruptions (natural, Gaussian with a fixed and a uniform sigma, small-eps "
                        "PGD-AT, AdA, AugRmixAT and RLAT scored on digits-C: the 15 CIFAR-10-C corruptions x 5 "
                        "severities); objectives (PGD-7 AT, TRADES, stylized max-margin AT, InfoAT, J-SIGR and "
                        "PGD-7 AT + OOD data: clean, PGD-20, AutoAttack and transfer-attack accuracy); threat-models "
                        "(PGD-7 AT, iwd and ijsat under L-inf, IWD and JSTM attacks and digits-C, and preemptive "
                        "robustification of test digits)")
    p.add_argument("--aa-steps", type=int, default=None,
                   help="iterations of APGD-CE and APGD-T (each target) in the AutoAttack (standard) column (None: "
                        "50; --section autoattack: AutoAttack's own 100; 0: skip the column)")
    alias(p, "--apgd-steps", dest="aa_steps", type=int)
    p.add_argument("--aa-fab-steps", type=int, default=None,
                   help="iterations of FAB-T (each target) in the AutoAttack column (None: 10; --section "
                        "autoattack: 100)")
    p.add_argument("--aa-queries", type=int, default=None,
                   help="Square's queries in the AutoAttack column (None: 300; --section autoattack: AutoAttack's "
                        "5000; on the 8x8 digits FAB-T and Square break no point the APGD stages left, see README)")
    p.add_argument("--ibp-eps-max", type=fraction("ibp-eps-max"), default=None,
                   help="largest L-inf radius of the IBP certification of every model (None: --eps; 0: skip it)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=1000, help="CERTIFY estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="CERTIFY failure probability")
    p.add_argument("--certify-max", type=int, default=None, help="certify only the first N test images")
    p.add_argument("--certify-batch", type=int, default=2000, help="noisy samples per forward pass")
    p.add_argument("--sequential-images", type=int, default=100,
                   help="test images of the sequential-certification line (Smooth.certify_radius at "
                        "--sequential-radius, n_max 100,000, on the first smoothing row's model; 0: skip it)")
    p.add_argument("--sequential-radius", type=fraction("sequential-radius"), default=0.25,
                   help="the radius of the sequential-certification line")
    p.add_argument("--sequential-n-max", type=int, default=100_000,
                   help="most estimation samples per image of the sequential-certification line")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="also replace the demo block of this README (between its <!-- demo --> markers) with the "
                        "table and the certified-accuracy line printed here")
    add_common(p)
    demo_learned.add_arguments(p)
    demo_certified.add_arguments(p)
    demo_video.add_arguments(p)
    demo_corruptions.add_arguments(p)
    demo_objectives.add_arguments(p)
    demo_threat.add_arguments(p)


def run(args) -> int:
    import torch

    from .. import train

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in train.METHODS and m not in ROW_SPECS]
    if bad or not methods:
        raise CLIError(f"--methods must be a comma-separated list of {', '.join(train.METHODS)} or "
                       f"{', '.join(ROW_SPECS)}; got {args.methods!r}")
    args.aa_section_budget = demo_autoattack.budgets(args, section=True)
    args.aa_steps, args.aa_fab_steps, args.aa_queries = demo_autoattack.budgets(args, section=False)
    require_min(epochs=(args.epochs, 1), steps=(args.steps, 1), m=(args.m, 1), batch_size=(args.batch_size, 1),
                attack_steps=(args.attack_steps, 1), aa_steps=(args.aa_steps, 0), aa_queries=(args.aa_queries, 1),
                aa_fab_steps=(args.aa_fab_steps, 1), n0=(args.n0, 1), n=(args.n, 1),
                certify_batch=(args.certify_batch, 1), val_size=(args.val_size, 0), proxy_n=(args.proxy_n, 1),
                sequential_images=(args.sequential_images, 0), sequential_n_max=(args.sequential_n_max, 1))
    if args.jobs is not None:
        require_min(jobs=(args.jobs, 1))
    if not args.eps >= 0:
        raise CLIError(f"--eps must be >= 0, got {args.eps}")
    if not args.sigma > 0:
        raise CLIError(f"--sigma must be > 0, got {args.sigma}")
    if not 0 < args.alpha < 1:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.ibp_eps_max is None:
        args.ibp_eps_max = args.eps
    if not 0 <= args.ibp_eps_max < math.inf:
        raise CLIError(f"--ibp-eps-max must be a finite number >= 0, got {args.ibp_eps_max}")
    demo_learned.check_arguments(args)
    args.cert_methods_list = demo_certified.check_arguments(args) if args.section == demo_certified.SECTION else []
    if args.section == demo_video.SECTION:
        demo_video.check_arguments(args)
    args.corruption_rows_list = demo_corruptions.check_arguments(args)
    args.objectives_rows_list = demo_objectives.check_arguments(args)
    args.threat_rows_list = demo_threat.check_arguments(args)
    if args.readme and not os.path.isfile(args.readme):
        raise CLIError(f"--readme {args.readme!r}: no such file")
    dev = pick_device(args.device)
    old_threads = torch.get_num_threads()
    setup_run(args, sample_numel=64)  # 8x8 digits: one thread unless --threads says otherwise
    try:
        return _demo(args, methods, dev)
    finally:
        torch.set_num_threads(old_threads)


class _Data:
    """The digits splits and loaders of the demo."""

    def __init__(self, args):
        from torch.utils.data import DataLoader

        from .. import data as rodata

        self.train_ds, _ = rodata.get_dataset("digits", "train")
        self.test_ds, _ = rodata.get_dataset("digits", "test")
        self.val_loader = None
        if args.val_size > 0:
            self.train_ds, val_ds = split_holdout(self.train_ds, args.val_size, args.seed)
            self.val_loader = DataLoader(val_ds, batch_size=256, shuffle=False)
        self.test_loader = DataLoader(self.test_ds, batch_size=360, shuffle=False)
        self.x_test, self.y_test = self.test_ds.tensors
        n = len(self.test_ds)
        self.k = n if args.certify_max is None else max(1, min(args.certify_max, n))

    def train_loader(self, args):
        from torch.utils.data import DataLoader

        return DataLoader(self.train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)


def _proxy_data(args, data: _Data) -> dict:
    """The generated digits of the pgd+proxy row: a class-conditional PCA + Gaussian-mixture generator
    fit on the training split, proxy_n samples, and its robust-discrimination score (an adversarially
    trained real-vs-generated classifier's held-out robust accuracy over eps; 0.5 = indistinguishable)."""
    from .. import proxy, train

    t0 = time.perf_counter()
    x = _stack_dataset(data.train_ds)
    gen = proxy.fit_generator(x[0], x[1], seed=args.seed)
    gx, gy = gen.generate(args.proxy_n, seed=args.seed)
    score = train.robust_discrimination(x[0], gx, (0.0, 1 / 32, 1 / 16), epochs=10, max_samples=1000,
                                        seed=args.seed, threads=args.threads)
    return {"x": gx, "y": gy, "score": score, "time_s": time.perf_counter() - t0}


def _stack_dataset(ds):
    """(images, labels) of a dataset of (image, label) pairs, stacked."""
    import torch

    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor([int(v) for v in ys])


def _with_nu_range(label: str, res) -> str:
    """A DALE row's label with the range its nu took (start and epoch ends): how far the dual variable moved
    is part of what the row's figures mean."""
    nus = [r["nu"] for r in res.history if "nu" in r]
    if not nus:
        return label
    nus.append(float(res.config.nu))
    rng = f"nu {min(nus):.2f}-{max(nus):.2f}"
    return label[:-1] + f", {rng})" if label.endswith(")") else f"{label} ({rng})"


def _train_and_evaluate(args, key: str, data: _Data, dev, proxy_data=None) -> dict:
    import torch

    from .. import attacks, models, proxy, train
    from ..attacks.suites import Suite

    if args.section == demo_corruptions.SECTION and key in demo_corruptions.ROWS:
        method, opts = demo_corruptions.row_options(args, key)
    elif args.section == demo_objectives.SECTION and key in demo_objectives.ROWS:
        method, opts = demo_objectives.row_options(args, key)
    elif args.section == demo_threat.SECTION and key in demo_threat.ROWS:
        method, opts = demo_threat.row_options(args, key)
    else:
        method, opts = ROW_SPECS.get(key, (key, {}))
    opts = dict(opts)
    ratio = opts.pop("proxy", None)
    if method == "ada" and "perturbation_model" not in opts:  # AdA perturbs a corruption network: train one here
        opts["perturbation_model"] = demo_corruptions.corruption_network(args, data.train_ds, dev)
    torch.manual_seed(args.seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(dev)
    epochs = args.epochs
    loader = data.train_loader(args)
    if ratio is not None:  # generated digits in every batch; epochs cut so the run takes the same steps
        loader = proxy.MixedLoader(data.train_ds, (proxy_data["x"], proxy_data["y"]), args.batch_size, ratio,
                                   seed=args.seed)
        epochs = max(1, round(args.epochs * len(data.train_loader(args)) / len(loader)))
    hp = {**dict(epochs=epochs, eps=args.eps, steps=args.steps, lr=args.lr, seed=args.seed, val_steps=10),
          **method_hparams(args), **opts}
    res = train.fit(model, loader, method, val_loader=data.val_loader,
                    out_dir=os.path.join(args.out, key.replace("+", "_")), progress=args.progress, verbose=False,
                    device=dev, model_name="small_cnn", model_kwargs=dict(DIGITS_MODEL), extra={"data": "digits"},
                    threads=args.threads, **hp)
    model.eval()
    atk = attacks.PGD(model, eps=args.eps, steps=args.attack_steps, norm="linf", random_start=True, seed=args.seed)
    ev = attacks.robust_accuracy(model, data.test_loader, atk, device=dev, progress=False)
    aa = None
    if args.aa_steps and args.eps > 0:  # AutoAttack has no eps-0 threat model (the column stays empty)
        suite = Suite(model, args.eps, "linf", steps=args.aa_steps, fab_steps=args.aa_fab_steps,
                      n_queries=args.aa_queries, seed=args.seed)
        aa = suite.run(data.test_loader, device=dev, progress=False)["robust_acc"]
    label = _with_nu_range(res.config.label, res) + (f" + proxy data ({ratio:.0%})" if ratio is not None else "")
    cc = demo_corruptions.evaluate_row(args, model, data, dev) \
        if args.section in (None, demo_corruptions.SECTION, demo_threat.SECTION) else None  # digits-C: 15 corruptions x 5 severities, ~1 s
    row = {"method": key, "label": label, "clean_acc": ev["clean_acc"],
           "robust_acc": ev["robust_acc"], "aa_acc": aa, "acr": None, "ibp_acr": None, "train_time_s": res.train_time,
           "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "model": model,
           "sigma": res.config.noise_sigma, "mca": cc and cc["mean_corruption_acc"], "corruptions": cc}
    if row["sigma"] is not None and args.section not in (demo_corruptions.SECTION, demo_objectives.SECTION,
                                                         demo_threat.SECTION):
        _certify(args, row, data, dev)
    if args.ibp_eps_max > 0:
        _certify_ibp(args, row, data, dev)
    return row


def _certify_ibp(args, row: dict, data: _Data, dev) -> None:
    """The IBP-certified L-inf radius of every test image for the row's model (robustops.bounds)."""
    from .. import bounds, smoothing

    res = bounds.certified_radius(row["model"], data.x_test.to(dev), eps_max=args.ibp_eps_max, tol=1e-3)
    correct = (res.prediction.cpu() == data.y_test).numpy()
    radius = res.radius.cpu().numpy()
    row.update(ibp_radius=radius, ibp_correct=correct, ibp_acr=smoothing.acr(radius, correct),
               ibp_cert_acc=float(((radius >= args.eps - 1e-9) & correct).mean()))


def _certify(args, row: dict, data: _Data, dev) -> None:
    """Certifies the first k test images with the row's model smoothed at its training sigma."""
    from .. import smoothing

    k = data.k
    t0 = time.perf_counter()
    smooth = smoothing.Smooth(row["model"], 10, row["sigma"])
    cert = smooth.certify(data.x_test[:k].to(dev), n0=args.n0, n=args.n, alpha=args.alpha,
                          batch_size=args.certify_batch, seed=args.seed)
    t_cert = time.perf_counter() - t0
    correct = (cert.prediction == data.y_test[:k]).numpy()
    radius = cert.radius.numpy()
    row.update(acr=smoothing.acr(radius, correct), certify_time_s=t_cert, radius=radius, correct=correct)
    with open(os.path.join(args.out, f"certify_{row['method']}.tsv"), "w") as fh:
        fh.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
        for i in range(k):
            fh.write(f"{i}\t{int(data.y_test[i])}\t{int(cert.prediction[i])}\t{radius[i]:.4g}\t"
                     f"{int(correct[i])}\t{t_cert / k:.4f}\n")


def _sequential_line(args, rows, data, dev) -> Optional[str]:
    """Sequential certification (Smooth.certify_radius, Clopper-Pearson looks) of the first smoothing row's
    model at one radius with n_max estimation samples at most: certified accuracy and mean samples per image
    against fixed-n CERTIFY's n0 + n_max."""
    from .. import smoothing

    row = next((r for r in rows if r["acr"] is not None), None)
    k = min(args.sequential_images, data.k)
    if row is None or k <= 0:
        return None
    r, n_max = args.sequential_radius, args.sequential_n_max
    t0 = time.perf_counter()
    res = smoothing.Smooth(row["model"], 10, row["sigma"]).certify_radius(
        data.x_test[:k].to(dev), r, args.alpha, args.certify_batch, n0=args.n0, n_max=n_max, seed=args.seed)
    elapsed = time.perf_counter() - t0
    certified = (res.decisions[:, 0] == smoothing.CERTIFIED).numpy()
    acc = float((certified & (res.prediction == data.y_test[:k]).numpy()).mean())
    fixed = float(smoothing.certified_accuracy(row["radius"][:k], row["correct"][:k], [r])[0])
    mean = float(res.samples.double().mean())
    undecided = int((res.decisions[:, 0] == smoothing.ABSTAINED).sum())
    return (f"sequential certification of the smoothed {row['label']} model at r={r:g} ({k} images, Clopper-Pearson "
            f"at threshold-aimed looks, n0={args.n0}, n_max={n_max:,}, alpha={args.alpha:g}): certified accuracy "
            f"{fmt_pct(acc)} (fixed CERTIFY with n={args.n}: {fmt_pct(fixed)}) with {mean:,.0f} samples per image "
            f"on average, {(args.n0 + n_max) / mean:.0f}x fewer than fixed n={n_max:,} CERTIFY's {args.n0 + n_max:,}; "
            f"{undecided} undecided at n_max; {elapsed:.1f}s")


def _table(args, rows) -> list:
    header = ["method", "clean acc", f"PGD-{args.attack_steps} acc (eps={args.eps:g})"]
    header += [f"AutoAttack acc (APGD {args.aa_steps}, FAB {args.aa_fab_steps}, Square {args.aa_queries})"] \
        if args.aa_steps else []
    header += ["digits-C mean acc"]
    header += [f"ACR (sigma={args.sigma:g})"]
    header += [f"IBP ACR (L-inf, <= {args.ibp_eps_max:g})"] if args.ibp_eps_max > 0 else []
    header += ["train time"]
    table = [[r["label"], fmt_pct(r["clean_acc"]), fmt_pct(r["robust_acc"])]
             + ([fmt_pct(r["aa_acc"])] if args.aa_steps else [])
             + [fmt_pct(r["mca"])]
             + ["-" if r["acr"] is None else f"{r['acr']:.3f}"]
             + ([f"{r['ibp_acr']:.4f}"] if args.ibp_eps_max > 0 else [])
             + [f"{r['train_time_s']:.1f} s"] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    md = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
          "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    md += ["| " + " | ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(t, widths))) + " |"
           for t in table]
    return md


def _write_outputs(args, rows, md, certified, lines, learned=None) -> list:
    from .. import smoothing

    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "label", "clean_acc", "robust_acc", "eps", "attack_steps", "autoattack_acc",
                    "autoattack_steps", "autoattack_fab_steps", "autoattack_queries", "corruption_acc",
                    "acr", "sigma", "ibp_acr", "ibp_eps_max", "train_time_s", "epochs_run", "best_epoch"])
        for r in rows:
            w.writerow([r["method"], r["label"], f"{r['clean_acc']:.4f}", f"{r['robust_acc']:.4f}", args.eps,
                        args.attack_steps, "" if r["aa_acc"] is None else f"{r['aa_acc']:.4f}", args.aa_steps,
                        args.aa_fab_steps, args.aa_queries, f"{r['mca']:.4f}",
                        "" if r["acr"] is None else f"{r['acr']:.4f}", args.sigma,
                        "" if r["ibp_acr"] is None else f"{r['ibp_acr']:.5f}", args.ibp_eps_max,
                        f"{r['train_time_s']:.2f}", r["epochs_run"], r["best_epoch"]])
    write_summary(os.path.join(args.out, "results.json"), {
        "command": "demo", "eps": args.eps, "attack_steps": args.attack_steps, "autoattack_steps": args.aa_steps,
        "autoattack_fab_steps": args.aa_fab_steps, "autoattack_queries": args.aa_queries,
        "n0": args.n0, "n": args.n,
        "alpha": args.alpha, "epochs": args.epochs, "seed": args.seed, "table": md, "lines": lines,
        "rows": [{k: v for k, v in r.items() if k not in ("model", "radius", "correct", "ibp_radius", "ibp_correct",
                                                          "corruptions")}
                 for r in rows],
        "learned_perturbation_sets": learned})
    outputs = ["results.md", "results.csv", "results.json"]
    if certified:
        limits = {r["label"]: smoothing.largest_certifiable_radius(r["sigma"], args.n, args.alpha)
                  for r in rows if r["acr"] is not None}
        smoothing.plot_certified_accuracy(os.path.join(args.out, "certified_accuracy.png"), certified,
                                          title=f"digits, randomized smoothing (n={args.n}, alpha={args.alpha:g})",
                                          certifiable=limits)
        outputs += ["certified_accuracy.png", "certified_accuracy.pdf"] + [
            f"certify_{r['method']}.tsv" for r in rows if r["acr"] is not None]
    ibp_rows = [r for r in rows if r["ibp_acr"] is not None and r["method"] in IBP_PLOT_METHODS]
    if ibp_rows:
        smoothing.plot_certified_accuracy(
            os.path.join(args.out, "ibp_certified_accuracy.png"),
            {r["label"]: (r["ibp_radius"], r["ibp_correct"]) for r in ibp_rows}, max_radius=args.ibp_eps_max,
            title="digits, interval bound propagation (deterministic)", norm="L-inf")
        outputs += ["ibp_certified_accuracy.png", "ibp_certified_accuracy.pdf"]
    return outputs


def update_readme(path: str, block: List[str]) -> None:
    """Replaces the lines between "<!-- demo -->" and "<!-- /demo -->" of a README with a code block."""
    with open(path) as fh:
        text = fh.read()
    start, end = "<!-- demo -->\n", "<!-- /demo -->"
    if start not in text or end not in text:
        raise CLIError(f"--readme {path}: no <!-- demo --> ... <!-- /demo --> block to replace")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(head + start + "```\n" + "\n".join(block) + "\n```\n" + end + tail)
    os.replace(tmp, path)


#: The default --jobs at most: each row's process holds its own torch (about half a GB).
MAX_DEFAULT_JOBS = 4


def _jobs(args, dev, n_rows: int) -> int:
    """How many rows run at once: --jobs, else the physical cores // the threads per row on the CPU (one
    on a GPU; at most MAX_DEFAULT_JOBS), never more than the rows."""
    if args.jobs is not None:
        return max(1, min(args.jobs, n_rows))
    if dev.type != "cpu":
        return 1
    return max(1, min(physical_cores() // max(1, args.threads), n_rows, MAX_DEFAULT_JOBS))


#: A demo row worker's state: (args, dev, data), set once per process by _row_worker_init.
_WORKER: dict = {}


def _row_worker_init(args, dev) -> None:
    import torch

    torch.set_num_threads(args.threads)  # the parent's count: the rows' arithmetic, hence figures, are the same
    _WORKER.update(args=args, dev=dev, data=_Data(args))


def _row_worker(key: str, proxy_data) -> dict:
    w = _WORKER
    return _train_and_evaluate(w["args"], key, w["data"], w["dev"], proxy_data)


def _train_rows(args, methods, data: _Data, dev, proxy_data=None, each: bool = False):
    """The rows of ``methods`` (``_train_and_evaluate``), in order, ``_jobs`` at a time: each row in a
    process of its own (spawned; the data rebuilt there, the same splits) when more than one. Every row
    seeds its own model, training and attacks from --seed, so a row's figures do not depend on the
    jobs. each=True: a generator yielding each row as soon as it and those before it are done."""
    gen = _iter_rows(args, list(methods), data, dev, proxy_data)
    return gen if each else list(gen)


def _iter_rows(args, methods, data, dev, proxy_data):
    jobs = _jobs(args, dev, len(methods))
    if jobs == 1:
        for m in methods:
            yield _train_and_evaluate(args, m, data, dev, proxy_data)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_row_worker_init,
                             initargs=(args, dev)) as pool:
        futures = [pool.submit(_row_worker, m, proxy_data) for m in methods]
        for f in futures:
            yield f.result()


def _section(args, data: _Data, dev) -> None:
    """One section (--section): train its models with the demo's settings, then run it."""
    if args.section == demo_autoattack.SECTION:
        args.aa_steps = 0  # the section runs AutoAttack itself, at its own budgets
        rows = _train_rows(args, ("natural", "pgd"), data, dev)
        demo_autoattack.run_section(args, data, rows, dev)
    elif args.section == demo_objectives.SECTION:
        args.ibp_eps_max = 0.0  # clean, PGD-20, AutoAttack (the main table's) and transfer are its columns
        rows = _train_rows(args, args.objectives_rows_list, data, dev)
        demo_objectives.run_section(args, data, rows, dev)
    elif args.section == demo_threat.SECTION:
        args.ibp_eps_max = 0.0  # clean, PGD-20, AutoAttack, IWD, JSTM and digits-C are its columns
        flow, args.threat_flow_path = demo_threat.flow_model(args, data.train_ds, dev)
        rows = _train_rows(args, args.threat_rows_list, data, dev)
        demo_threat.run_section(args, data, rows, dev, flow)
    elif args.section == demo_corruptions.SECTION:
        args.aa_steps, args.ibp_eps_max = 0, 0.0  # digits-C and PGD-20 are its columns
        rows = _train_rows(args, args.corruption_rows_list, data, dev)
        demo_corruptions.run_section(args, data, rows, dev)
    else:
        args.aa_steps, args.ibp_eps_max = 0, 0.0  # the section certifies with every bound itself
        rows = _train_rows(args, args.cert_methods_list, data, dev)
        demo_certified.run_section(args, data, rows, dev)


def _demo(args, methods, dev) -> int:
    import torch

    from .. import smoothing

    os.makedirs(args.out, exist_ok=True)
    if args.section == demo_video.SECTION:  # its own data and model: nothing of the digits rows
        return demo_video.run_section(args, dev)
    data = _Data(args)
    print(f"robustops demo: digits 8x8 ({len(data.train_ds)} train, {args.val_size} validation, "
          f"{len(data.test_ds)} test), SmallCNN, {args.epochs} epochs, L-inf eps {args.eps:g}, on {dev} "
          f"({torch.get_num_threads()} thread(s))", flush=True)
    rows = []
    t_start = time.perf_counter()
    if args.section is not None:
        _section(args, data, dev)
        print(f"({time.perf_counter() - t_start:.0f} s in all)")
        return 0
    proxy_data, proxy_line = None, None
    if any("proxy" in ROW_SPECS.get(m, ("", {}))[1] for m in methods):
        proxy_data = _proxy_data(args, data)
        sc = proxy_data["score"]
        proxy_line = (f"generated digits for the proxy row: {args.proxy_n} from a class-conditional PCA + Gaussian "
                      f"mixture fit on the training split ({proxy_data['time_s']:.1f}s with its score); robust "
                      f"discrimination (real-vs-generated classifiers, PGD-trained at each eps, held-out robust "
                      f"accuracy; 50% = indistinguishable): "
                      + ", ".join(f"eps {e:.3g}: {fmt_pct(a)}" for e, a in zip(sc["eps"], sc["robust_acc"])))
        print("  " + proxy_line, flush=True)
    for row in _train_rows(args, methods, data, dev, proxy_data, each=True):
        rows.append(row)
        extra = (f", ACR {row['acr']:.3f} ({data.k} images, n={args.n}, certified in {row['certify_time_s']:.1f}s)"
                 if row["acr"] is not None else "")
        aa = f"  AutoAttack {fmt_pct(row['aa_acc']):>6}" if row["aa_acc"] is not None else ""
        print(f"  {row['label']:<28} clean {fmt_pct(row['clean_acc']):>6}  PGD-{args.attack_steps} "
              f"{fmt_pct(row['robust_acc']):>6}{aa}{extra}  (trained {row['train_time_s']:.1f}s)", flush=True)
    md = _table(args, rows)
    print()
    print("\n".join(md))
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    certified = {r["label"]: (r["radius"], r["correct"]) for r in rows if r["acr"] is not None}
    lines = []
    for r in rows:
        if r["acr"] is None:
            continue
        accs = smoothing.certified_accuracy(r["radius"], r["correct"], radii)
        lines.append(f"certified accuracy of the smoothed {r['label']} model (n0={args.n0}, n={args.n}, "
                     f"alpha={args.alpha:g}):\n" + ", ".join(f"r={x:g}: {fmt_pct(float(a))}" for x, a in
                                                             zip(radii, accs))
                     + f" (the largest radius n={args.n} samples can certify is "
                       f"{smoothing.largest_certifiable_radius(r['sigma'], args.n, args.alpha):.2f})")
        print("\n" + lines[-1].replace(":\n", ": "))
    seq_line = _sequential_line(args, rows, data, dev)
    if seq_line is not None:
        lines.append(seq_line)
        print("\n" + seq_line)
    if proxy_line is not None:
        lines.append(proxy_line)
        print("\n" + proxy_line)
    for r in rows:
        if r["ibp_acr"] is None or r["method"] not in ("ibp", "acert"):
            continue
        ibp_radii = sorted({args.ibp_eps_max / 4, args.ibp_eps_max / 2, args.ibp_eps_max})
        accs = smoothing.certified_accuracy(r["ibp_radius"], r["ibp_correct"], ibp_radii)
        lines.append(f"IBP-certified accuracy of the {r['label']} model (L-inf): "
                     + ", ".join(f"r={x:g}: {fmt_pct(float(a))}" for x, a in zip(ibp_radii, accs)))
        print("\n" + lines[-1])
    block = md + [""] + lines
    learned_outputs, learned = [], None
    if args.learned:
        learned_lines, learned_outputs, learned = demo_learned.run_section(args, data, rows, dev)
        block += [""] + learned_lines
    outputs = _write_outputs(args, rows, md, certified, lines, learned) + learned_outputs
    if args.readme:
        update_readme(args.readme, block)
        print(f"\nupdated the demo block of {args.readme}")
    print(f"\nwrote {', '.join(os.path.join(args.out, o) for o in outputs)} and one checkpoint directory per method "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return 0
