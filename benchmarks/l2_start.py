"""Which random start makes L2 PGD strongest: start laws compared by measurement on an L2-PGD-trained
digits model.

An L2 random start is x + r * z / ||z|| (z ~ N(0, I) over the D pixels of a sample, r a radius law),
clamped to [0, 1]. Laws compared (U uniform in [0, 1), one per sample):

- volume: r = eps * U^(1/D), uniform in the ball's volume (random_init's radius="ball"; ~0.98 eps at D = 64);
- radius: r = eps * U, uniform radius (torchattacks.PGDL2's law);
- sqrt:   r = eps * U^(1/2), uniform in a 2-d disc's area (between the two above);
- half:   r = eps / 2, a fixed radius (the mean of "radius");
- square: r = eps * U^2 (mean eps / 3: smaller starts than "radius");
- clean:  no random start (r = 0).

For every seed the laws share one draw of (z, U) (common random numbers, so their paired differences
carry no noise from the direction draw); the start is clamped to [0, 1] and then run through the same
fused iteration, ``PGD(..., norm="l2", random_start=False).engine.iterate`` (alpha = 2.5 eps / steps).
Two external rows use their own random streams, paired with the laws by seed only:

- torchattacks: torchattacks.PGDL2(model, eps, alpha, steps, random_start=True), torch.manual_seed(seed) first;
- robustops: robustops.attacks.PGD(model, eps, alpha, steps, norm="l2", random_start=True, seed=seed), whose
  default start was "volume" until this measurement and is "radius" (l2_radius="uniform") since.

(torchattacks' draws -- normal_ then uniform_ from the default CPU generator after manual_seed(seed) -- are
the same numbers as this script's torch.Generator(seed) draws, so its row reproduces the "radius" row:
a check that the fused iteration is torchattacks' and only the start law differs.)

Finding (2026-11-29, CPU, 20 seeds): with one start, strength rises as the start radius shrinks (volume
weakest, clean strongest; eps 1.0: volume 0.460 / radius 0.442 / half 0.437 / clean 0.428 robust accuracy at
10 steps); with 5 restarts the order reverses (volume 0.375 / radius 0.383 / square 0.394 / clean 0.428).
eps 2.0 is saturated (0 for every law) on this model.

Restarts: a second table (--restarts R, default 5, at --restart-eps / --restart-steps) counts a sample robust
only when it survives all R starts of a law (the per-sample worst case, as PGD's ``restarts`` keeps the first
restart that fools), R independent draws per seed; "clean" is deterministic, its R starts are one.

Robust accuracy counts a test sample robust when it is classified correctly both clean and at the final
iterate. The model: SmallCNN trained with robustops.train.fit, method "pgd", norm "l2", eps 1.0, 7 steps
(SGD, cyclic lr, 0.1 peak), on the embedded digits' train split; evaluation on the 360-image test split.

    python benchmarks/l2_start.py           # 20 seeds, eps 0.5 / 1.0 / 2.0, steps 10 / 40 (~10 min, 1 CPU thread)
    python benchmarks/l2_start.py --seeds 5 --eps 1.0 --steps 10 --no-csv

Prints, per (eps, steps), each law's mean robust accuracy, its standard deviation over seeds and the paired
comparisons with "volume" and with "radius" (mean difference, law minus volume / radius: negative = a
stronger attack; p-value of scipy.stats.ttest_rel), and appends the same rows to
benchmarks/results/l2_start.csv (columns date, torch, device, eps, steps, law, seeds, robust_acc_mean,
robust_acc_std, diff_vs_volume, p_vs_volume, then restarts, diff_vs_radius, p_vs_radius).
"""
from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from scipy import stats
from torch.utils.data import DataLoader

from common import finish, parser, setup
import robustops
from robustops.data import load_digits
from robustops.models import SmallCNN
from robustops.train import fit

# radius(eps, U, D) per law; None: no random start.
LAWS = {
    "volume": lambda eps, u, D: eps * u.pow(1.0 / D),
    "radius": lambda eps, u, D: eps * u,
    "sqrt": lambda eps, u, D: eps * u.sqrt(),
    "half": lambda eps, u, D: torch.full_like(u, 0.5 * eps),
    "square": lambda eps, u, D: eps * u * u,
    "clean": None,
}
EXTERNAL = ("torchattacks", "robustops")


def train_model(epochs: int, device: torch.device):
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    loader = DataLoader(load_digits("train"), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    fit(model, loader, "pgd", norm="l2", eps=1.0, steps=7, epochs=epochs, lr=0.1, seed=0, device=device,
        progress=False, verbose=False)
    model.eval()
    return model, time.perf_counter() - t0


def draw(x: torch.Tensor, seed: int):
    """(unit directions [B, D], U [B]) for one seed, drawn on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    B, D = x.shape[0], x[0].numel()
    z = torch.randn(B, D, generator=g)
    u = torch.rand(B, generator=g)
    return (z / z.norm(dim=1, keepdim=True)).to(x.device), u.to(x.device)


def start_point(x, law, eps, direction, u):
    if LAWS[law] is None:
        return x.clone()
    r = LAWS[law](eps, u, direction.shape[1])
    return (x + (r[:, None] * direction).view_as(x)).clamp(0.0, 1.0)


@torch.no_grad()
def robust_mask(model, x_adv, y, clean_ok) -> torch.Tensor:
    """BoolTensor[B]: clean-correct and still correct at x_adv."""
    return clean_ok & (model(x_adv).argmax(1) == y)


def run_law(model, x, y, clean_ok, law, eps, steps, seed, direction, u) -> torch.Tensor:
    """The per-sample robust mask of one attack run with start law ``law``."""
    alpha = 2.5 * eps / steps
    if law == "torchattacks":
        import torchattacks
        torch.manual_seed(seed)
        x_adv = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        model.eval()
        return robust_mask(model, x_adv, y, clean_ok)
    if law == "robustops":
        atk = robustops.attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, norm="l2", random_start=True,
                                    seed=seed)
        return robust_mask(model, atk(x, y), y, clean_ok)
    atk = robustops.attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, norm="l2", random_start=False)
    xa = start_point(x, law, eps, direction, u)
    atk.engine.iterate(x, xa, (y, None), eps, alpha, steps)
    return robust_mask(model, xa, y, clean_ok)


def paired(a, base):
    """(mean of a - base, ttest_rel p-value or nan when undefined)."""
    diff = [ai - bi for ai, bi in zip(a, base)]
    pval = float("nan")
    if len(a) > 1 and any(d != diff[0] for d in diff):
        pval = float(stats.ttest_rel(a, base).pvalue)
    return statistics.fmean(diff), pval


def report(acc, laws, stamp, eps, steps, restarts, title):
    """Prints one table and returns its CSV rows."""
    print(f"\n{title}")
    print(f"{'law':<13} {'robust acc':>10} {'std':>7} {'vs volume':>10} {'p':>8} {'vs radius':>10} {'p':>8}")
    rows = []

    def fmt_p(v):
        return "" if math.isnan(v) else f"{v:.2g}"
    for law in laws:
        a = acc[law]
        mean, sd = statistics.fmean(a), (statistics.stdev(a) if len(a) > 1 else 0.0)
        dv, pv = paired(a, acc["volume"]) if law != "volume" else (0.0, float("nan"))
        dr, pr = (paired(a, acc["radius"]) if law != "radius" else (0.0, float("nan"))) \
            if "radius" in acc else (float("nan"), float("nan"))
        print(f"{law:<13} {mean:>10.4f} {sd:>7.4f} {dv:>+10.4f} {fmt_p(pv):>8} {dr:>+10.4f} {fmt_p(pr):>8}")
        rows.append(dict(**stamp, eps=eps, steps=steps, law=law, seeds=len(a), robust_acc_mean=round(mean, 5),
                         robust_acc_std=round(sd, 5), diff_vs_volume="" if law == "volume" else round(dv, 5),
                         p_vs_volume="" if math.isnan(pv) else f"{pv:.3g}", restarts=restarts,
                         diff_vs_radius="" if law == "radius" or math.isnan(dr) else round(dr, 5),
                         p_vs_radius="" if math.isnan(pr) else f"{pr:.3g}"))
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "l2_start.csv")
    p.set_defaults(threads=1)
    p.add_argument("--seeds", type=int, default=20, help="seeds per (law, eps, steps) (default 20)")
    p.add_argument("--eps", default="0.5,1.0,2.0", help="L2 radii (default 0.5,1.0,2.0)")
    p.add_argument("--steps", default="10,40", help="PGD step counts (default 10,40)")
    p.add_argument("--epochs", type=int, default=30, help="L2 PGD-7 training epochs (default 30)")
    p.add_argument("--laws", default=",".join(list(LAWS) + list(EXTERNAL)),
                   help="laws and external attacks to run (default all; volume is always run)")
    p.add_argument("--restarts", type=int, default=5, help="starts per sample in the restarts table (default 5; "
                   "1: no restarts table)")
    p.add_argument("--restart-eps", default="1.0", help="eps of the restarts table (default 1.0)")
    p.add_argument("--restart-steps", default="10,40", help="steps of the restarts table (default 10,40)")
    p.add_argument("--restart-seeds", type=int, default=10, help="seeds of the restarts table (default 10)")
    p.add_argument("--restart-laws", default="volume,radius,half,square,clean",
                   help="laws of the restarts table (default volume,radius,half,square,clean)")
    args = p.parse_args(argv)
    stamp = setup(args)
    dev = torch.device(args.device)
    laws = [s.strip() for s in args.laws.split(",") if s.strip()]
    rlaws = [s.strip() for s in args.restart_laws.split(",") if s.strip()]
    for law in laws + rlaws:
        if law not in LAWS and law not in EXTERNAL:
            p.error(f"unknown law {law!r} ({', '.join(list(LAWS) + list(EXTERNAL))})")
    laws = ["volume"] + [law for law in laws if law != "volume"]
    rlaws = ["volume"] + [law for law in rlaws if law != "volume"]
    t_start = time.perf_counter()

    model, t_train = train_model(args.epochs, dev)
    x, y = (t.to(dev) for t in load_digits("test").tensors)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    print(f"device: {stamp['device']}; torch {torch.__version__}")
    print(f"SmallCNN, L2 PGD-7 training (eps 1.0), {args.epochs} epochs in {t_train:.1f} s; "
          f"clean test accuracy {clean_ok.float().mean().item():.4f} (n = {x.shape[0]}); {args.seeds} seeds")

    rows = []
    for eps in (float(v) for v in args.eps.split(",")):
        for steps in (int(v) for v in args.steps.split(",")):
            acc = {law: [] for law in laws}
            for seed in range(args.seeds):
                direction, u = draw(x, seed)
                for law in laws:
                    if law == "clean" and acc[law]:
                        acc[law].append(acc[law][0])  # deterministic: the same value for every seed
                        continue
                    m = run_law(model, x, y, clean_ok, law, eps, steps, seed, direction, u)
                    acc[law].append(m.float().mean().item())
            rows += report(acc, laws, stamp, eps, steps, 1,
                           f"L2 eps {eps:g}, {steps} steps, alpha {2.5 * eps / steps:.4g}, one start")

    if args.restarts > 1:
        R = args.restarts
        for eps in (float(v) for v in args.restart_eps.split(",")):
            for steps in (int(v) for v in args.restart_steps.split(",")):
                acc = {law: [] for law in rlaws}
                clean_mask = None
                for seed in range(args.restart_seeds):
                    masks = {law: [] for law in rlaws}
                    for r in range(R):
                        direction, u = draw(x, 100_000 + seed * R + r)  # streams apart from the table above
                        for law in rlaws:
                            if law == "clean":
                                if clean_mask is None:
                                    clean_mask = run_law(model, x, y, clean_ok, law, eps, steps, 0, direction, u)
                                continue
                            masks[law].append(run_law(model, x, y, clean_ok, law, eps, steps, 0, direction, u))
                    for law in rlaws:
                        m = clean_mask if law == "clean" else torch.stack(masks[law]).all(0)
                        acc[law].append(m.float().mean().item())
                rows += report(acc, rlaws, stamp, eps, steps, R,
                               f"L2 eps {eps:g}, {steps} steps, robust under all of {R} starts "
                               f"({args.restart_seeds} seeds)")

    print(f"\n(vs volume / vs radius: mean paired difference, negative = a stronger attack; p: ttest_rel. The laws "
          f"share each seed's draw; torchattacks / robustops use their own streams.) "
          f"total {time.perf_counter() - t_start:.0f} s")
    finish(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
