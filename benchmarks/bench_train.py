"""Adversarial-training cost per iteration: natural, PGD-7, FGSM-RS and free (m=8) training steps of
robustops.train, as ratios to a natural training step; and the cost of the training options AWP and
EMA on PGD-7 AT, as ratios to a plain PGD-7 step.

Each method is timed through ``robustops.train.Trainer.train_step`` -- the code ``fit`` runs -- on one
fixed synthetic CIFAR-shaped minibatch (random images and labels; the data loader is not timed):

- natural: forward + backward + SGD step;
- PGD-7: random_init, 7 x (forward, backward to the input only, pgd_step_), then a natural step on x_adv;
- FGSM-RS: random start, one input-gradient pass, recycle_step_ (alpha = 1.25 eps), a natural step;
- free (m=8): 8 replays of the minibatch, each one forward/backward giving the weight gradient (an
  SGD step) and the input gradient (recycle_step_ of the persistent perturbation); reported per replay,
  since a free epoch replays each minibatch m times and is counted as m natural epochs;
- PGD-7 + AWP (gamma 5e-3): PGD-7 plus the weight perturbation: one more forward/backward for the
  ascent gradient (weights only), per-layer norms, a saved copy of the weights and its restore;
- PGD-7 + EMA (decay 0.999): PGD-7 plus one fused lerp of the weights and buffers per step.

With --noise-copies 2,4,8 it also times the smoothing-training methods (consistency, MACER, SmoothAdv,
SmoothMix) at each number m of noisy copies per input, twice: as shipped (one fused ``gaussian_noise``
call writes the m copies) and the same method with the noise written the usual way
(``x.repeat_interleave(m, 0) + sigma * torch.randn_like(...)``, patched in for ``ops.gaussian_noise``),
reporting the fused step's speed-up over the eager-noise step.

GPU targets (H100, PreAct-ResNet-18, batch 128, bf16 autocast, channels_last): FGSM-RS <= 1.5x natural,
free <= 1.2x natural per replay, PGD-7 <= 7.3x natural; AWP <= 1.2x PGD-7, EMA <= 1.05x PGD-7.

    python benchmarks/bench_train.py                        # GPU: the setting above
    python benchmarks/bench_train.py --device cpu --batch-size 16 --dtype fp32 --iters 3 --warmup 1
    python benchmarks/bench_train.py --device cpu --model small_cnn --image-size 8 --channels 1
    python benchmarks/bench_train.py --device cpu --model small_cnn --image-size 8 --channels 1 \
        --methods pgd,pgd+awp,pgd+ema --iters 20 --reps 5

Rows are appended to benchmarks/results/train.csv with the device name and date.
"""
from __future__ import annotations

import copy
import sys
import time

import torch

from common import finish, parser, setup
from robustops import models
from robustops import train as rt

TARGETS = {"natural": 1.0, "pgd": 7.3, "fgsm": 1.5, "free": 1.2}
LABELS = {"natural": "natural", "pgd": "PGD-{steps}", "fgsm": "FGSM-RS", "free": "free (m={m}, per replay)",
          "pgd+awp": "PGD-{steps} + AWP", "pgd+ema": "PGD-{steps} + EMA"}
# The training options, timed on PGD-k AT: (the Trainer's options, the target as a ratio to plain PGD-k).
OPTION_RUNS = {"pgd+awp": ({"awp": 5e-3}, 1.2), "pgd+ema": ({"ema": 0.999}, 1.05)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainers, x, y, iters: int, warmup: int, device: torch.device, reps: int):
    """Seconds per train_step of each trainer: the fastest over reps of the mean over `iters`
    back-to-back steps. The methods are timed in turn within every repeat (interleaved), so a change
    in the machine's load hits them alike; the minimum, since on a shared machine noise only adds time."""
    for tr in trainers.values():
        for _ in range(warmup):
            tr.train_step(x, y)
    sync(device)
    times = {k: [] for k in trainers}
    for _ in range(reps):
        for k, tr in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                tr.train_step(x, y)
            sync(device)
            times[k].append((time.perf_counter() - t0) / iters)
    return {k: (min(v), v) for k, v in times.items()}


SMOOTHING_METHODS = ("consistency", "macer", "smoothadv", "smoothmix")


def eager_gaussian_noise(x, num, sigma, seed=None, offset=0, mean=None, std=None, out_dtype=None,
                         channels_last=False):
    """ops.gaussian_noise written the usual way: repeat each input num times, add sigma * randn_like,
    normalise, cast and lay out (torch's generator; seed / offset unused)."""
    noisy = x.repeat_interleave(num, 0)
    noisy = noisy + sigma * torch.randn_like(noisy)
    if mean is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        noisy = (noisy - torch.as_tensor(mean, device=x.device).view(shape)) / torch.as_tensor(
            std, device=x.device).view(shape)
    noisy = noisy.to(out_dtype or x.dtype)
    return noisy.contiguous(memory_format=torch.channels_last) if channels_last else noisy


def noise_rows(args, base, x, y, dev, amp, cl, iters, warmup, base_row) -> list:
    """Per-iteration time of each smoothing-training method at each m, with the fused noise op and with
    eager_gaussian_noise patched in for it; rows for the CSV."""
    from robustops import ops

    fused = ops.gaussian_noise
    rows = []
    print(f"\n{'method':<14} {'m':>3} {'fused ms':>10} {'eager ms':>10} {'speed-up':>9}")
    for m in [int(v) for v in args.noise_copies.split(",")]:
        trainers = {}
        for method in SMOOTHING_METHODS:
            model = copy.deepcopy(base).to(dev)
            trainers[method] = rt.Trainer(model, method=method, noise_copies=m, amp=amp, channels_last=cl,
                                          schedule="constant", lr=0.01, device=dev, ddp=False, seed=0)
        t_fused = time_steps(trainers, x, y, iters, warmup, dev, args.reps)
        ops.gaussian_noise = eager_gaussian_noise
        try:
            t_eager = time_steps(trainers, x, y, iters, warmup, dev, args.reps)
        finally:
            ops.gaussian_noise = fused
        for method in SMOOTHING_METHODS:
            tf, te = t_fused[method][0], t_eager[method][0]
            print(f"{method:<14} {m:>3} {1e3 * tf:>10.2f} {1e3 * te:>10.2f} {te / tf:>8.2f}x")
            for prov, t in (("fused noise", tf), ("eager noise", te)):
                rows.append(dict(**base_row, model=args.model, batch=args.batch_size,
                                 shape=f"{args.channels}x{args.image_size}x{args.image_size}", dtype=args.dtype,
                                 channels_last=int(cl), method=f"{method} m={m} ({prov})",
                                 ms_per_iter=round(1e3 * t, 3), ms_per_unit=round(1e3 * t, 3),
                                 images_per_s=round(args.batch_size / t, 1),
                                 speedup_vs_eager=round(te / t, 3), iters=iters, reps=args.reps))
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "train.csv")
    p.add_argument("--model", default="preact_resnet18", help="robustops.models name (default preact_resnet18)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype (default bf16)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the contiguous (NCHW) layout")
    p.add_argument("--methods", default="natural,pgd,fgsm,free,pgd+awp,pgd+ema",
                   help="natural, pgd, fgsm, free and the options on pgd: pgd+awp, pgd+ema")
    p.add_argument("--steps", type=int, default=7, help="PGD steps (default 7)")
    p.add_argument("--m", type=int, default=8, help="free replays (default 8)")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--iters", type=int, default=None, help="steps per timed repeat (default 20 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=3, help="timed repeats, the fastest counts (default 3)")
    p.add_argument("--noise-copies", default=None, metavar="2,4,8",
                   help="also time consistency / macer / smoothadv / smoothmix at these m, fused vs eager noise")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    base_row = setup(args)
    gpu = dev.type == "cuda"
    iters = args.iters or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in TARGETS and m not in OPTION_RUNS:
            p.error(f"--methods: unknown method {m!r} (natural, pgd, fgsm, free, {', '.join(OPTION_RUNS)})")
    if "natural" in methods:
        methods.remove("natural")
    methods.insert(0, "natural")  # the baseline of every ratio
    if any(m in OPTION_RUNS for m in methods) and "pgd" not in methods:
        methods.insert(1, "pgd")  # the baseline of the options' ratios
    amp = None if args.dtype == "fp32" else args.dtype
    cl = not args.no_channels_last

    torch.manual_seed(0)
    kw = {"num_classes": args.classes, "in_channels": args.channels}
    if args.model == "small_cnn":
        kw["input_size"] = args.image_size
    base = models.get_model(args.model, **kw)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)
    print(f"device: {base_row['device']}; torch {torch.__version__}")
    print(f"{args.model}, batch {args.batch_size} x {args.channels}x{args.image_size}x{args.image_size}, "
          f"{args.dtype}{', channels_last' if cl else ''}, eps {args.eps:.4g}; {iters} steps x {args.reps} repeats "
          f"after {warmup} warm-up")

    trainers = {}
    for method in methods:
        model = copy.deepcopy(base).to(dev)
        options = OPTION_RUNS[method][0] if method in OPTION_RUNS else {}
        trainers[method] = rt.Trainer(model, method=method.split("+")[0], eps=args.eps, steps=args.steps, m=args.m,
                                      amp=amp, channels_last=cl, schedule="constant", lr=0.01, weight_decay=5e-4,
                                      device=dev, ddp=False, seed=0, **options)
    timed = time_steps(trainers, x, y, iters, warmup, dev, args.reps)
    results = {}
    for method, (t, all_t) in timed.items():
        results[method] = (t, t / args.m if method == "free" else t, all_t)  # free: per replay

    nat = results["natural"][1]
    pgd = results["pgd"][1] if "pgd" in results else None
    rows = []
    print(f"\n{'method':<24} {'ms/iter':>10} {'ms/unit':>10} {'img/s':>9} {'x natural':>10} {'x PGD':>7} "
          f"{'target':>12}")
    for method in methods:
        t, per_unit, all_t = results[method]
        ratio = per_unit / nat
        ratio_pgd = per_unit / pgd if pgd is not None and method.startswith("pgd") else None
        label = LABELS[method].format(steps=args.steps, m=args.m)
        option = method in OPTION_RUNS
        target = OPTION_RUNS[method][1] if option else TARGETS[method]
        meets = (ratio_pgd if option else ratio) <= target
        mark = ("ok" if meets else "MISS") if gpu and method != "natural" else ""
        imgs = args.batch_size * (args.m if method == "free" else 1) / t
        shown = "" if method == "natural" else ("<= %.2f PGD" % target if option else "<= %.1f" % target)
        print(f"{label:<24} {1e3 * t:>10.2f} {1e3 * per_unit:>10.2f} {imgs:>9.0f} {ratio:>10.2f} "
              f"{'' if ratio_pgd is None else '%.3f' % ratio_pgd:>7} {shown:>12} {mark}")
        rows.append(dict(**base_row, model=args.model, batch=args.batch_size,
                         shape=f"{args.channels}x{args.image_size}x{args.image_size}", dtype=args.dtype,
                         channels_last=int(cl), method=label, steps=args.steps if method.startswith("pgd") else "",
                         m=args.m if method == "free" else "", ms_per_iter=round(1e3 * t, 3),
                         ms_per_unit=round(1e3 * per_unit, 3), images_per_s=round(imgs, 1),
                         ratio_vs_natural=round(ratio, 3), target="" if option or method == "natural" else target,
                         meets_target=(int(meets) if gpu and method != "natural" else ""), iters=iters, reps=args.reps,
                         spread=round(max(all_t) / min(all_t), 3),
                         ratio_vs_pgd="" if ratio_pgd is None else round(ratio_pgd, 3),
                         target_vs_pgd=target if option else ""))
    print("(ms/unit: per minibatch, per replay for free; x PGD: the options' cost over a plain PGD step; targets "
          "apply to an H100 with the default setting)")
    if args.noise_copies:
        rows += noise_rows(args, base, x, y, dev, amp, cl, iters, warmup, base_row)
    finish(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
