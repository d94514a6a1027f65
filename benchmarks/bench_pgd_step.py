"""pgd_step_ and langevin_step_ against eager PyTorch and torch.compile, side by side.

Eager is the torchattacks-style sequence of small ops (robustops.reference.pgd_step); torch.compile
compiles that same function. For langevin_step_ (DALE's noisy step, Laplace form, noise scale 0.01)
eager is the form written here the usual way: a Laplace draw from torch's generator (log of a uniform
times a random sign), then sign(g + c l), add, and the two clamps; torch.compile compiles it.
Every figure is printed with the achieved bandwidth as a fraction of
the device's copy bandwidth measured in this run, for a copy moving as many bytes as the step
(so that cache-resident sizes are compared with a cache-resident copy). The useful bytes of a step are 3 reads + 1 write
(x_adv, x, grad in; x_adv out) for both norms: the least any implementation must move.

    python benchmarks/bench_pgd_step.py                 # GPU if present, else CPU
    python benchmarks/bench_pgd_step.py --device cpu --sizes cifar
"""
from __future__ import annotations


import torch

import robustops as ro
from robustops import reference as ref
from common import bench, copy_bandwidth, finish, parser, setup

# The L2 step's three CUDA paths: "tiny" (D = 32) one sample per group of 4 or 8 lanes, "mnist" (D = 784) and
# "cifar" (D = 3072) one sample per block, both in one pass; "imagenet" (D = 150528) two passes.
SIZES = {"cifar": (512, 3, 32, 32), "imagenet": (256, 3, 224, 224), "mnist": (2048, 1, 28, 28),
         "tiny": (65536, 1, 4, 8)}


def eager_langevin(x_adv, x, grad, eps, alpha, c, lo=0.0, hi=1.0):
    """DALE's Laplace-form step in plain PyTorch ops: l ~ Laplace(0, 1) from torch's generator,
    x_adv + alpha * sign(grad + c * l), projected on the eps-ball around x and the box."""
    u = torch.rand_like(x_adv, dtype=torch.float32).clamp_min_(1e-12)
    lap = -torch.log(u) * (torch.randint_like(u, 0, 2) * 2 - 1)
    v = x_adv + alpha * torch.sign(grad + c * lap.to(grad.dtype))
    return torch.clamp(x + torch.clamp(v - x, -eps, eps), lo, hi)


def main(argv=None):
    p = parser(__doc__, "pgd_step.csv")
    p.add_argument("--sizes", default="cifar,imagenet,mnist,tiny")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--norms", default="linf,l2")
    p.add_argument("--ops", default="pgd_step_,langevin_step_", help="ops to time (langevin_step_: L-inf only)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per figure")
    args = p.parse_args(argv)
    dev = args.device
    base = setup(args)
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"device: {base['device']}; copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; torch {torch.__version__}")
    compiled = None if args.no_compile else torch.compile(ref.pgd_step, dynamic=False)
    compiled_lv = None if args.no_compile else torch.compile(eager_langevin, dynamic=False)
    ops_wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    rows = []
    header = (f"{'size':>18} {'dtype':>8} {'norm':>4} | {'provider':>13} {'time':>10} {'GB/s':>7} {'of copy':>7} "
              f"{'vs eager':>8}")
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        shape = SIZES[size]
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            x = torch.rand(shape, device=dev).to(dtype)
            grad = torch.randn(shape, device=dev).to(dtype)
            x_adv = ro.random_init(x, 8 / 255, "linf", seed=0)
            nbytes = 4 * x.numel() * x.element_size()
            # Copy speed at this working set too: at CIFAR size all four tensors fit in a CPU's
            # caches (or an H100's L2), where a copy runs faster than from memory.
            bw_here = copy_bandwidth(dev, nbytes // 2)
            cases = [("pgd_step_", n) for n in args.norms.split(",") if "pgd_step_" in ops_wanted]
            cases += [("langevin_step_", "linf")] if "langevin_step_" in ops_wanted else []
            for op, norm in cases:
                eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
                if op == "pgd_step_":
                    providers = {
                        "eager": lambda: ref.pgd_step(x_adv, x, grad, eps, alpha, norm, 0.0, 1.0),
                        "robustops": lambda: ro.pgd_step_(x_adv, x, grad, eps, alpha, norm, 0.0, 1.0),
                    }
                    if compiled is not None:
                        providers["torch_compile"] = lambda: compiled(x_adv, x, grad, eps, alpha, norm, 0.0, 1.0)
                else:
                    providers = {
                        "eager": lambda: eager_langevin(x_adv, x, grad, eps, alpha, 0.01),
                        "robustops": lambda: ro.langevin_step_(x_adv, x, grad, eps, alpha, 0.01, "laplace", 0.0, 1.0,
                                                               seed=1),
                    }
                    if compiled_lv is not None:
                        providers["torch_compile"] = lambda: compiled_lv(x_adv, x, grad, eps, alpha, 0.01)
                times = {k: bench(f, dev, min_time=args.min_time) for k, f in providers.items()}
                for k in ("eager", "torch_compile", "robustops"):
                    if k not in times:
                        continue
                    t = times[k]
                    gbs = nbytes / t / 1e9
                    frac = nbytes / t / bw_here
                    print(f"{str(shape):>18} {dt:>8} {norm:>4} | {k:>13} {t * 1e3:>8.3f}ms {gbs:>7.1f} "
                          f"{frac:>7.1%} {times['eager'] / t:>7.2f}x  {op}")
                    rows.append(dict(**base, op=op, shape="x".join(map(str, shape)),
                                     dtype=dt, norm=norm, provider=k, time_ms=round(t * 1e3, 5),
                                     gb_per_s=round(gbs, 2), fraction_of_copy=round(frac, 4),
                                     speedup_vs_eager=round(times["eager"] / t, 3),
                                     copy_gb_per_s_same_size=round(bw_here / 1e9, 2),
                                     copy_gb_per_s_large=round(bw / 1e9, 2)))
    finish(args, rows)


if __name__ == "__main__":
    main()
