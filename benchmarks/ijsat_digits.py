"""IJSAT (Lau et al. 2023: joint-space adversaries through a normalising flow, on robust-mixup inputs) on the
digits beside PGD-7 AT, with the demo's settings (SmallCNN, SGD with the cyclic schedule, lr 0.05, batch 64,
7 inner steps at --eps, 144 training images held out to pick the best epoch by PGD-10 accuracy): clean
accuracy, white-box PGD-20 accuracy at --eps and JSTM-20 accuracy (the joint-space attack at --eps and
--eps-z). PGD-7 AT is the baseline printed beside every row. The paper's claim: IJSAT raises clean accuracy
(and corruption accuracy) over PGD-AT at comparable robustness.

The flow: --flow CKPT (a `robustops perturbation train --kind flow` checkpoint), else a stand-in fitted here:
the maximum-likelihood linear Gaussian flow of the training digits, z = Lambda^-1/2 U^T (x - mu) (PCA
whitening, an exact bijection with exact log-likelihood; eigenvalues floored at 1e-3), whose latent offsets
move along the data's principal directions in proportion to their spread.

    python benchmarks/ijsat_digits.py                       # seeds 0, 1; 30 epochs
    python benchmarks/ijsat_digits.py --quick --no-csv      # seed 0, 2 epochs, under a minute

Appends the rows to benchmarks/results/ijsat_digits.csv as they finish. CPU figures; timings are wall seconds
of the fit, inflated by whatever else runs on the machine.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from robustops import attacks, models
from robustops.cli.common import DIGITS_MODEL
from robustops.perturbation import frozen_model
from robustops.perturbation.protocol import check_flow
from common import add_digits_flags, digits_variant_runs, fit_digits, parser, pgd_accuracy

#: row -> (method, options)
VARIANTS = {"pgd": ("pgd", {}), "pgd_rmix": ("pgd", {}), "ijsat": ("ijsat", {}), "pgd_iat": ("pgd", {})}


class LinearGaussianFlow(nn.Module):
    """The maximum-likelihood linear Gaussian flow of images x [N, C, H, W] (the flow protocol)."""

    def __init__(self, x: torch.Tensor, floor: float = 1e-3):
        super().__init__()
        flat = x.flatten(1).double()
        mu = flat.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(flat.T))
        evals = evals.clamp_min(floor)
        self.register_buffer("mu", mu.float())
        self.register_buffer("enc", (evecs / evals.sqrt()).float())          # U Lambda^-1/2
        self.register_buffer("dec", (evecs * evals.sqrt()).T.float())        # Lambda^1/2 U^T
        self.register_buffer("logdet", -0.5 * evals.log().sum().float())
        self.image_shape = tuple(x.shape[1:])

    def encode(self, x):
        return (x.flatten(1) - self.mu) @ self.enc

    def decode(self, z):
        return (z @ self.dec + self.mu).view(-1, *self.image_shape)

    def log_prob(self, x):
        z = self.encode(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * torch.log(torch.tensor(2 * torch.pi)) + self.logdet


def main() -> None:
    p = parser(__doc__, "ijsat_digits.csv")
    add_digits_flags(p, VARIANTS)
    p.add_argument("--eps-z", type=float, default=0.03, help="the latent L-inf budget of ijsat and of JSTM-20")
    p.add_argument("--mix-alpha", type=float, default=0.1,
                   help="robust mixup's Beta(ALPHA, ALPHA) of pgd_rmix and ijsat, and IAT's mixup of pgd_iat")
    p.add_argument("--ijsat-clean", type=float, default=0.2,
                   help="ijsat's weight of the clean robust-mixup loss (IAT's 0.5; 0: the adversarial term alone)")
    p.add_argument("--ijsat-mix", default="clean", choices=("before", "after", "clean"),
                   help="ijsat's robust mixup: of the inputs before the attack, of the adversaries after it, or of "
                        "the clean term's inputs only (ijsat's default)")
    p.add_argument("--flow", default=None, help="a flow checkpoint (default: the linear Gaussian stand-in)")
    p.add_argument("--quick", action="store_true", help="seed 0, 2 epochs")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs = "0", 2
    flows = {}

    def flow_for(train_ds):
        key = id(train_ds)
        if key not in flows:
            if args.flow is not None:
                flows[key] = frozen_model(args.flow, args.device, check=check_flow)
            else:
                x = torch.stack([train_ds[i][0] for i in range(len(train_ds))])
                flows[key] = LinearGaussianFlow(x).to(args.device)
        return flows[key]

    def run_one(key, seed, args, train_ds, val_ds, test_loader):
        method, opts = VARIANTS[key]
        flow = flow_for(train_ds)
        if key in ("pgd_rmix", "ijsat"):
            opts = dict(opts, robust_mixup=args.mix_alpha)
        if key == "pgd_iat":
            opts = dict(opts, mixup=args.mix_alpha)
        if method == "ijsat":
            opts = dict(opts, perturbation_model=flow, eps_z=args.eps_z, ijsat_clean=args.ijsat_clean,
                        ijsat_mix=args.ijsat_mix)
        torch.manual_seed(seed)
        model = models.get_model("small_cnn", **DIGITS_MODEL).to(args.device)
        res, train_s = fit_digits(model, method, train_ds, val_ds, args, seed, **opts)
        ev = pgd_accuracy(model, test_loader, args, seed, steps=args.attack_steps)
        jstm = attacks.JSTMAttack(model, flow, eps=args.eps, eps_z=args.eps_z, steps=args.attack_steps, seed=seed)
        jev = attacks.robust_accuracy(model, test_loader, jstm, device=args.device, progress=False)
        return {"variant": key, "method": method, "mix_alpha": args.mix_alpha, "ijsat_clean": args.ijsat_clean,
                "ijsat_mix": args.ijsat_mix, "epochs": args.epochs, "seed": seed, "eps": args.eps,
                "eps_z": args.eps_z, "flow": args.flow or "linear-gaussian", "attack_steps": args.attack_steps,
                "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"], "jstm_acc": jev["robust_acc"],
                "best_epoch": res.best_epoch, "train_s": train_s}

    rows = digits_variant_runs(p, args, VARIANTS, run_one)
    for r in rows:
        print(f"{r['variant']:<9} seed {r['seed']}: JSTM-{args.attack_steps} accuracy {r['jstm_acc']:.4f}")


if __name__ == "__main__":
    main()
