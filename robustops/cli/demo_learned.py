"""The demo's section on learned perturbation sets (Wong and Kolter 2021): a CVAE learned from digits
pairs (x, a rotated / shifted / scaled / thickened x), the quality of its set, and a natural model
against models trained with the set (random members: ``learned_aug``; latent PGD: ``learned``):
clean, random-set and adversarial-set accuracy and the certified latent ACR (randomized smoothing of
the classifier composed with the decoder). Called by ``robustops demo``; its arguments are the demo's."""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Tuple

from .common import DIGITS_MODEL, CLIError, fmt_pct, fraction

#: the models the section compares (the natural one is the demo's own when it trained one)
LEARNED_METHODS = ("natural", "learned_aug", "learned")
RANDOM_MEMBERS = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learned perturbation sets")
    g.add_argument("--no-learned", dest="learned", action="store_false",
                   help="skip the section on learned perturbation sets")
    g.add_argument("--cvae-epochs", type=int, default=10, help="epochs of the CVAE perturbation model")
    g.add_argument("--set-percentile", type=float, default=95.0,
                   help="the set's radius eps: this percentile of the training pairs' latent norms")
    g.add_argument("--learned-steps", type=int, default=3, help="latent PGD steps of learned-set training")
    g.add_argument("--set-attack-steps", type=int, default=20, help="latent PGD steps of the evaluation attack")
    g.add_argument("--latent-sigma", type=fraction("latent-sigma"), default=None,
                   help="noise level of latent randomized smoothing (in units of the prior's scale; None: the "
                        "smallest at which --latent-n samples certify the set's eps with 1%% dissenting votes, "
                        "smoothing.sigma_for_radius)")
    g.add_argument("--latent-n", type=int, default=500, help="CERTIFY estimation samples in latent space")
    g.add_argument("--latent-certify-max", type=int, default=120,
                   help="certify the first N test images in latent space")


def check_arguments(args) -> None:
    from .common import require_min

    if not args.learned:
        return
    require_min(cvae_epochs=(args.cvae_epochs, 1), learned_steps=(args.learned_steps, 1),
                set_attack_steps=(args.set_attack_steps, 1), latent_n=(args.latent_n, 1),
                latent_certify_max=(args.latent_certify_max, 1))
    if not 0 < args.set_percentile <= 100:
        raise CLIError(f"--set-percentile must lie in (0, 100], got {args.set_percentile}")
    if args.latent_sigma is not None and not args.latent_sigma > 0:
        raise CLIError(f"--latent-sigma must be > 0, got {args.latent_sigma}")
    if args.latent_sigma is None:
        try:  # eps is not known yet; n and alpha alone decide whether any radius can be certified
            latent_sigma(args, 1.0)
        except ValueError as e:
            raise CLIError(f"--latent-n: {e}") from None


def _perturbation_model(args, dev):
    """The CVAE trained on digits pairs, its eps (a percentile of the training latent norms) and its
    quality on held-out pairs (the test split's pairs, another seed)."""
    import torch
    from torch.utils.data import DataLoader

    from .. import perturbation as P

    train_pairs = P.DigitsPairs("train", seed=args.seed)
    held = DataLoader(P.DigitsPairs("test", seed=args.seed + 1), batch_size=360)
    torch.manual_seed(args.seed)
    pm = P.CVAE(1, 8)
    t0 = time.perf_counter()
    P.fit_perturbation(pm, DataLoader(train_pairs, batch_size=64, shuffle=True, drop_last=True), args.cvae_epochs,
                       device=dev, out_dir=os.path.join(args.out, "cvae"), progress=args.progress, seed=args.seed,
                       verbose=False)
    t_fit = time.perf_counter() - t0
    eps = P.choose_eps(pm, DataLoader(train_pairs, batch_size=256), args.set_percentile, dev)
    pm.eps = eps
    q = P.quality(pm, held, eps, device=dev)
    P.save_perturbation_model(os.path.join(args.out, "cvae", "model.pt"), pm, percentile=args.set_percentile,
                              data="digits", quality=q)
    return pm, eps, q, t_fit


def _train(args, method: str, pm, eps: float, data, dev):
    import torch

    from .. import models, train

    torch.manual_seed(args.seed)
    model = models.get_model("small_cnn", **DIGITS_MODEL).to(dev)
    hp = {} if method == "natural" else dict(eps=eps, steps=args.learned_steps, perturbation_model=pm)
    res = train.fit(model, data.train_loader(args), method, val_loader=data.val_loader,
                    out_dir=os.path.join(args.out, method), progress=args.progress, verbose=False, device=dev,
                    epochs=args.epochs, lr=args.lr, seed=args.seed, val_steps=10, model_name="small_cnn",
                    model_kwargs=dict(DIGITS_MODEL), extra={"data": "digits"}, threads=args.threads, **hp)
    return model.eval(), res.config.method_class.label(res.config), res.train_time


def latent_sigma(args, eps: float) -> float:
    """--latent-sigma, else sized so that --latent-n samples at --alpha can certify radius eps (the whole set)."""
    from ..smoothing import COVER_DISSENT, sigma_for_radius

    return args.latent_sigma if args.latent_sigma is not None else sigma_for_radius(eps, args.latent_n, args.alpha,
                                                                                    COVER_DISSENT)


def _evaluate(args, model, pm, eps: float, data, dev) -> dict:
    """Clean, random-set (mean over RANDOM_MEMBERS random members per image) and adversarial-set
    (LatentPGD, restarts 1) accuracy on the test set, and the certified latent radii of the first
    latent_certify_max test images."""
    import torch

    from .. import attacks, perturbation, smoothing

    x, y = data.x_test.to(dev), data.y_test.to(dev)
    atk = attacks.LatentPGD(model, pm, eps=eps, steps=args.set_attack_steps, seed=args.seed)
    ev = attacks.robust_accuracy(model, data.test_loader, atk, device=dev, progress=False)
    with torch.no_grad():
        members = perturbation.sample(pm, x, eps, n=RANDOM_MEMBERS, seed=args.seed)
        pred = model(members.flatten(0, 1)).argmax(1).view(y.shape[0], RANDOM_MEMBERS)
        random_acc = float((pred == y[:, None]).float().mean())
    k = min(args.latent_certify_max, x.shape[0])
    t0 = time.perf_counter()
    cert = smoothing.LatentSmooth(model, pm, 10, latent_sigma(args, eps)).certify(
        x[:k], n0=args.n0, n=args.latent_n, alpha=args.alpha, batch_size=args.certify_batch, seed=args.seed)
    correct = (cert.prediction == data.y_test[:k]).numpy()
    radius = cert.radius.numpy()
    return {"clean_acc": ev["clean_acc"], "random_acc": random_acc, "set_acc": ev["robust_acc"],
            "latent_acr": smoothing.acr(radius, correct), "latent_radius": radius, "latent_correct": correct,
            "latent_cert_at_eps": smoothing.certified_accuracy(radius, correct, eps),
            "latent_certify_s": time.perf_counter() - t0}


def _picture(args, pm, eps: float, model, dev) -> List[str]:
    """x, three true perturbations, set samples at eps/2, eps, 3 eps/2 and the member LatentPGD finds
    against the natural model, for six test digits."""
    import torch

    from .. import attacks, perturbation as P

    pairs = P.DigitsPairs("test", seed=args.seed + 1, repeats=3)
    n_img = pairs.images.shape[0]
    x, true, y = [], [], []
    for i in range(6):
        xi, xti, yi = pairs.pair([i + j * n_img for j in range(3)])
        x.append(xi[0])
        true.append(xti)
        y.append(yi[0])
    x, true, y = torch.stack(x).to(dev), torch.stack(true), torch.stack(y).to(dev)
    adv = attacks.LatentPGD(model, pm, eps=eps, steps=args.set_attack_steps, seed=args.seed).perturb(x, y).x_adv
    return P.plot_perturbations(pm, x, true, [eps / 2, eps, 1.5 * eps], os.path.join(args.out, "perturbation_sets.png"),
                                adversarial=adv, n=3, seed=args.seed,
                                title=f"digits: true perturbations, samples of S(x) and the adversarial member "
                                      f"(eps={eps:.2f})")


def run_section(args, data, rows, dev) -> Tuple[List[str], List[str], List[dict]]:
    """Runs the section; returns (the lines it prints and puts in the README block, the files it wrote
    under args.out, its rows for results.json)."""

    pm, eps, q, t_fit = _perturbation_model(args, dev)
    head = (f"learned perturbation set (CVAE, {args.cvae_epochs} epochs, {t_fit:.1f}s): eps {eps:.2f} (the "
            f"{args.set_percentile:g}th percentile of the training pairs' latent norms); held-out pairs: coverage "
            f"{fmt_pct(q['coverage'])}, reconstruction MSE {q['recon_mse']:.4f} (identity map "
            f"{q['identity_mse']:.4f}), nearest member of S(x) {q['approx_mse']:.4f}, random member of S(x) "
            f"{q['expected_mse']:.4f}, negative ELBO {q['nll_bound']:.1f} nats")
    print("\n" + head, flush=True)
    own = {r["method"]: r for r in rows}
    results = []
    for method in LEARNED_METHODS:
        if method == "natural" and "natural" in own:  # the demo's natural model (same data and settings)
            model, label, t_train = own["natural"]["model"], own["natural"]["label"], own["natural"]["train_time_s"]
        else:
            model, label, t_train = _train(args, method, pm, eps, data, dev)
        ev = _evaluate(args, model, pm, eps, data, dev)
        results.append({"method": method, "label": label, "train_time_s": t_train, **ev, "model": model})
        print(f"  {label:<36} clean {fmt_pct(ev['clean_acc']):>6}  random-set {fmt_pct(ev['random_acc']):>6}  "
              f"adversarial-set {fmt_pct(ev['set_acc']):>6}  latent ACR {ev['latent_acr']:.3f}  "
              f"certified at r=eps {fmt_pct(ev['latent_cert_at_eps']):>6}  "
              f"(trained {t_train:.1f}s, certified in {ev['latent_certify_s']:.1f}s)", flush=True)
    outputs = _picture(args, pm, eps, results[0]["model"], dev)
    header = ["model", "clean acc", f"random-set acc ({RANDOM_MEMBERS} members)",
              f"adversarial-set acc (latent PGD-{args.set_attack_steps})",
              f"latent ACR (sigma={latent_sigma(args, eps):.3g})", f"certified acc at r=eps={eps:.2f}", "train time"]
    table = [[r["label"], fmt_pct(r["clean_acc"]), fmt_pct(r["random_acc"]), fmt_pct(r["set_acc"]),
              f"{r['latent_acr']:.3f}", fmt_pct(r["latent_cert_at_eps"]), f"{r['train_time_s']:.1f} s"]
             for r in results]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    md = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
          "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    md += ["| " + " | ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(t, widths))) + " |"
           for t in table]
    k = min(args.latent_certify_max, data.x_test.shape[0])
    foot = (f"(eps and radii are latent L2 norms of u, z = mu(x) + sigma(x) u; latent ACR over the first {k} test "
            f"images, n0={args.n0}, n={args.latent_n}, alpha={args.alpha:g}; "
            + ("sigma set by --latent-sigma" if args.latent_sigma is not None else
               "sigma sized so that n samples can certify r=eps with 1% of the votes elsewhere") + ")")
    print("\n" + "\n".join(md) + "\n" + foot)
    summary = [{"quality": q, "eps": eps}] + [
        {k2: v for k2, v in r.items() if k2 not in ("model", "latent_radius", "latent_correct")} for r in results]
    return [head, ""] + md + [foot], ["cvae/model.pt"] + [os.path.relpath(o, args.out) for o in outputs], summary
