"""Randomized-smoothing CERTIFY: Cohen et al.'s per-input loop against robustops.smoothing, side by side,
with the model's forward-only bound; and the two smoothing ops alone against copy bandwidth.

- cohen: the loop of Cohen et al.'s `core.Smooth`, re-implemented here: per input and per batch,
  x.repeat(batch), randn_like * sigma, forward (a Normalize layer in front of the network), argmax,
  .cpu(), numpy bincount; one host sync per batch. fp32.
- robustops fp32 / bf16+channels_last: Smooth.certify on all images in one call: gaussian_noise writes
  the normalized noisy batch, count_votes_ counts on the device, one host sync per call.
- forward bound: the network alone (no noise, no counting, no normalization) on a ready batch of
  `batch` inputs in the same dtype / layout, times (N0 + N) / batch per image: what certification
  costs if everything but the forward pass were free.
- gaussian_noise / count_votes_ alone on large tensors, in GB/s and as a fraction of the copy
  bandwidth (read + write) of a large tensor copy measured in the same run; eager PyTorch beside them.

- oracle (``--oracle``, ``--oracle-quick``: benchmarks/sequential_oracle.py, simulation only): the mean
  samples per input of each test and look schedule per pA bin (0.9, 0.95, 0.99, 0.999) against the
  oracle, the samples a one-sided Clopper-Pearson bound needs when pA is known, at r = sigma and 0.5 sigma.
- sequential (``--sequential``; part of the default run on a GPU; ``--sequential-only`` runs it alone):
  sequential certification (``Smooth.certify_radius`` at r = 0.25 and 0.5, tests "betting" and "cp";
  ``Smooth.certify_sequential``, the full-radius mode, at precision 0.05) against fixed-n CERTIFY
  (n0 = 100, n = 100,000) on the same inputs, seed and indices (so the same noise: the sequential run's
  first samples are the fixed run's). CPU default: a small digits CNN trained here in seconds with
  Gaussian noise augmentation at sigma 0.25 (``--checkpoint`` loads one instead), on the first
  ``--seq-images`` test images. GPU default: CIFAR-sized random inputs on ``--model`` (resnet110) with
  random weights, bf16 autocast + channels_last: such a network votes one class for nearly every noisy
  copy (pA ~ 1), so the figure measures mostly the easy case; ``--checkpoint`` (e.g. Cohen et al.'s
  cifar_resnet110 at noise 0.25) and ``--seq-data cifar10:DIR`` measure a real one. Reported per (r, test),
  each beside its target (the issue's): the mean samples per input, over all inputs and over those with
  pA >= 0.9 (pA estimated as nA / n from the fixed run; target >= 10x fewer than 100,100 at r = 0.25),
  the wall time against the fixed run's, the refill efficiency (t_seq / t_fixed) / (samples_seq /
  samples_fixed) (target <= 1.2: the time follows the samples because refill keeps the passes full; it
  needs many more samples than one pass holds, hence ``--seq-ref-images`` below), and the agreement of
  the decision at r with fixed CERTIFY's (radius >= r). The fixed reference runs on the first
  ``--seq-ref-images`` inputs (default: all on CPU, 16 of the 256 on a GPU: 100,100 samples an input is
  what costs), the sequential runs on all ``--seq-images``; samples-per-input figures of pA >= 0.9 and
  agreements are over the reference inputs, and the efficiency compares the time per sample of the two
  runs (the formula above when the sets are equal). That figure sets a run of seconds against one of
  minutes timed at another moment, which a shared machine's load swings (3x on a busy 2-core box) can
  make meaningless, so each sequential run is also timed in turn with a *control*: fixed-n CERTIFY of
  the same inputs with the same total of samples (full passes, as the n = 100,000 run), and the
  efficiency against it is printed beside the other. Timing: the fixed n = 100,000 run once, each
  sequential run and its control the fastest of ``--seq-repeats`` (the full-radius run and its control:
  once). Rows go to benchmarks/results/sequential.csv
  (``--seq-csv``), each input's figures to sequential_inputs_<data>.csv (rewritten each run).
  ``--sequential-plot docs/sequential_samples.png`` draws samples used against pA (the Bernoulli-oracle
  simulation of benchmarks/sequential_samples.py with this run's inputs overlaid; alone, without
  --sequential / --sequential-only, it only draws, overlaying the saved digits inputs).

    python benchmarks/bench_certify.py                                   # GPU: N0=100, N=100000, batch 400
    python benchmarks/bench_certify.py --device cpu --N 300 --images 2   # CPU at a small N
    python benchmarks/bench_certify.py --device cpu --sequential-only    # the sequential section (digits)
    python benchmarks/bench_certify.py --sequential-plot docs/sequential_samples.png   # the plot alone

Rows are appended to benchmarks/results/certify.csv with the device name and date (the sequential
section's to sequential.csv).
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import time

import numpy as np
import torch
import torch.nn as nn
from scipy import stats

import robustops as ro
from robustops import models, smoothing
from robustops.data import CIFAR10_MEAN, CIFAR10_STD
from robustops.smoothing.sequential import ABSTAINED, CERTIFIED, NOT_CERTIFIED
from common import RESULTS, bench, copy_bandwidth, finish, parser, setup


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- Cohen et al.'s loop

def cohen_sample(model, x, num, batch_size, sigma, num_classes):
    """Votes of num noisy copies of one input x [C, H, W], Cohen et al.'s way."""
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


def cohen_certify(model, x, n0, n, alpha, batch_size, sigma, num_classes):
    """Cohen et al.'s CERTIFY of one input: (prediction, radius)."""
    c_a = int(cohen_sample(model, x, n0, batch_size, sigma, num_classes).argmax())
    n_a = int(cohen_sample(model, x, n, batch_size, sigma, num_classes)[c_a])
    p_a = float(smoothing.clopper_pearson_lower(n_a, n, alpha))
    if p_a < 0.5:
        return -1, 0.0
    from scipy.stats import norm

    return c_a, sigma * float(norm.ppf(p_a))


# ---------------------------------------------------------------------------------- helpers

def timed(fn, device: str, repeats: int) -> float:
    """Fastest wall seconds of fn() over repeats runs (each run is long: no event timing needed). The
    minimum, not the median: on a shared machine the noise only ever adds time."""
    return timed_call(fn, device, repeats)[0]


def timed_call(fn, device: str, repeats: int):
    """(fastest wall seconds of fn() over repeats runs, the result of the last run; the runs are seeded, so
    every run gives the same one)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def row(stamp, args, **kw):
    base = dict(**stamp, bench="", provider="", model=args.model, N0=args.N0, N=args.N,
                batch=args.batch, images=args.images, s_per_image="", vs_cohen="", vs_forward_bound="",
                gb_per_s="", fraction_of_copy="", copy_gb_per_s="")
    base.update(kw)
    return base


def main(argv=None):
    p = parser(__doc__, "certify.csv")
    p.add_argument("--model", default="resnet110", help="a robustops.models name (random weights; default resnet110)")
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--images", type=int, default=2, help="CIFAR-sized inputs certified per provider (default 2)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per certify figure, interleaved across "
                                                           "providers (the fastest counts; default 3)")
    p.add_argument("--modes", default="fp32,bf16_cl", help="robustops modes: fp32, bf16_cl (bf16 autocast + "
                                                          "channels_last)")
    p.add_argument("--no-cohen", action="store_true", help="skip the (slow) Cohen baseline")
    p.add_argument("--no-ops", action="store_true", help="skip the op bandwidth figures")
    p.add_argument("--op-elems", type=int, default=None,
                   help="elements of the noisy output in the op benchmark (default 2^26 GPU, 2^23 CPU)")
    g = p.add_argument_group("sequential certification (see the module docstring)")
    g.add_argument("--sequential", action="store_true", help="run the sequential section too (default on a GPU)")
    g.add_argument("--sequential-only", action="store_true", help="run the sequential section alone")
    g.add_argument("--no-sequential", action="store_true", help="skip the sequential section on a GPU")
    g.add_argument("--sequential-plot", metavar="PNG", default=None,
                   help="draw samples used against pA there (+ a PDF beside it), e.g. docs/sequential_samples.png")
    g.add_argument("--seq-data", default=None,
                   help="digits (default on CPU: a small CNN trained here unless --checkpoint), random (default on a "
                        "GPU: CIFAR-sized random images, --model with random weights unless --checkpoint), or a "
                        "robustops.data spec (cifar10:DIR, a .npz, ...; needs --checkpoint)")
    g.add_argument("--checkpoint", default=None,
                   help="the sequential section's model: a robustops checkpoint or Cohen et al.'s (their "
                        "cifar_resnet110); its normalization is read from it")
    g.add_argument("--seq-images", type=int, default=None,
                   help="inputs of the sequential runs (default 32 on CPU, 256 on a GPU)")
    g.add_argument("--seq-ref-images", type=int, default=None,
                   help="the first inputs also certified by fixed-n CERTIFY (default: all on CPU, 16 on a GPU)")
    g.add_argument("--seq-batch", type=int, default=None,
                   help="noisy samples per forward pass (default 2000 on CPU, 4000 on a GPU)")
    g.add_argument("--seq-mode", choices=("fp32", "bf16_cl"), default=None,
                   help="Smooth's mode in the section (default fp32 on CPU, bf16_cl on a GPU)")
    g.add_argument("--seq-radii", default="0.25,0.5")
    g.add_argument("--seq-tests", default="betting,cp")
    g.add_argument("--seq-precision", type=float, default=0.05,
                   help="certify_sequential's precision (full-radius mode; 0: skip that mode)")
    g.add_argument("--seq-full-test", default="cp", help="the full-radius mode's test (default cp, its default)")
    g.add_argument("--seq-repeats", type=int, default=3,
                   help="timed runs of each certify_radius figure and of its control, in turn, the fastest counts "
                        "(the fixed n = N run and the full-radius one: once; default 3)")
    g.add_argument("--seq-epochs", type=int, default=30, help="epochs of the digits model trained here")
    g.add_argument("--seq-seed", type=int, default=1, help="the noise seed of the fixed and sequential runs")
    g.add_argument("--seq-plot-trials", type=int, default=2000, help="simulated inputs per pA of the plot")
    g.add_argument("--seq-csv", default="sequential.csv", help="file under benchmarks/results (default sequential.csv)")
    g.add_argument("--oracle", action="store_true", help="the simulated samples per pA bin against the oracle "
                   "(benchmarks/sequential_oracle.py; alone, no network) and stop")
    g.add_argument("--oracle-quick", action="store_true", help="--oracle with 1000 trials (under a minute)")
    args = p.parse_args(argv)
    if args.oracle or args.oracle_quick:
        import sequential_oracle
        sequential_oracle.main(["--quick"] if args.oracle_quick else [])
        return
    dev = args.device
    stamp = setup(args)
    seq = args.sequential or args.sequential_only
    if args.sequential_plot and not seq:
        sequential_plot(args, None, None)
        return
    if not args.sequential_only:
        finish(args, classic(args, stamp))
    if seq or (dev.startswith("cuda") and not args.no_sequential):
        sequential(args, stamp)


def classic(args, stamp):
    """Cohen's loop, Smooth.certify in each mode, the forward bound and the ops alone: the CSV rows."""
    dev = args.device
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"device: {stamp['device']}; copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; torch {torch.__version__}")
    print(f"model {args.model} (random weights), N0 {args.N0}, N {args.N}, batch {args.batch}, "
          f"{args.images} images, sigma {args.sigma}")
    rows = []
    C = 10
    net = models.get_model(args.model, num_classes=C).to(dev).eval()
    full = nn.Sequential(models.Normalize(CIFAR10_MEAN, CIFAR10_STD), net).to(dev).eval()
    x = torch.rand(args.images, 3, 32, 32, device=dev)
    per_image = (args.N0 + args.N) / args.batch  # forward passes per image

    # Providers of a figure in seconds per image, timed in turn in every repeat (interleaved, so that a
    # change in the machine's load hits them alike); the fastest repeat counts.
    modes = args.modes.split(",")
    providers = {}
    for mode in modes:
        cl = mode == "bf16_cl"
        m = copy.deepcopy(net)
        xb = torch.rand(args.batch, 3, 32, 32, device=dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
            xb = xb.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def fwd(m=m, xb=xb, cl=cl):
            with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=cl):
                m(xb)
        fwd()
        # One forward pass of a full batch, scaled to the passes an image needs.
        providers[f"forward_bound_{mode}"] = (lambda fwd=fwd: timed(fwd, dev, 3) * per_image)
    if not args.no_cohen:
        cohen_certify(full, x[0], 2, args.batch, args.alpha, args.batch, args.sigma, C)  # warm-up

        def cohen():
            for i in range(args.images):
                cohen_certify(full, x[i], args.N0, args.N, args.alpha, args.batch, args.sigma, C)
        providers["cohen_fp32"] = lambda: timed(cohen, dev, 1) / args.images
    for mode in modes:
        cl = mode == "bf16_cl"
        smooth = smoothing.Smooth(copy.deepcopy(net), C, args.sigma, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                  autocast="bf16" if cl else None, channels_last=cl)
        smooth.certify(x, 2, args.batch, args.alpha, args.batch, seed=0)  # warm-up
        providers[f"robustops_{mode}"] = (lambda smooth=smooth: timed(
            lambda: smooth.certify(x, args.N0, args.N, args.alpha, args.batch, seed=1), dev, 1) / args.images)
    best = {k: float("inf") for k in providers}
    for _ in range(args.repeats):
        for k, fn in providers.items():
            best[k] = min(best[k], fn())
    t_cohen = best.get("cohen_fp32")
    for k, t in best.items():
        mode = k.split("_", 1)[1] if k.startswith("robustops_") else None
        bound = best.get(f"forward_bound_{mode}") if mode else (best.get("forward_bound_fp32")
                                                                 if k == "cohen_fp32" else None)
        notes = []
        if bound and not k.startswith("forward_bound"):
            notes.append(f"{t / bound:.3f}x its forward bound")
        if t_cohen and k.startswith("robustops"):
            notes.append(f"{t_cohen / t:.2f}x faster than Cohen")
        print(f"{k:>26}: {t:9.3f} s/image" + (f"  ({', '.join(notes)})" if notes else ""))
        rows.append(row(stamp, args, bench="certify", provider=k, s_per_image=round(t, 5),
                        vs_cohen=round(t_cohen / t, 3) if t_cohen and not k.startswith("forward_bound") else "",
                        vs_forward_bound=round(t / bound, 4) if bound and not k.startswith("forward_bound") else ""))

    # the ops alone
    if not args.no_ops:
        elems = args.op_elems or (1 << 26 if dev.startswith("cuda") else 1 << 23)
        D = 3 * 32 * 32
        num = max(1, elems // D)
        xs = torch.rand(1, 3, 32, 32, device=dev)
        mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)
        mean_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        R = elems // C
        counts = torch.zeros(1, C, dtype=torch.int64, device=dev)
        print(f"{'op':>26} {'provider':>10} {'time':>11} {'GB/s':>8} {'of copy':>8}")

        def time_op(op, dtype, providers, nbytes, rows_per_call):
            for prov, fn in providers.items():
                t = bench(fn, dev, min_time=0.5)
                dt = str(dtype).split(".")[-1]
                print(f"{op + ' ' + dt:>26} {prov:>10} {t * 1e3:9.3f}ms {nbytes / t / 1e9:8.1f} {nbytes / t / bw:8.1%}")
                rows.append(row(stamp, args, bench="op", provider=f"{op.rstrip('_')}_{dt}_{prov}",
                                N0="", N="", batch=rows_per_call, images=1, gb_per_s=round(nbytes / t / 1e9, 2),
                                fraction_of_copy=round(nbytes / t / bw, 4), copy_gb_per_s=round(bw / 1e9, 2)))

        for out_dtype in (torch.float32, torch.bfloat16):
            def eager_noise(out_dtype=out_dtype):
                b = xs.repeat((num, 1, 1, 1))
                return ((b + torch.randn_like(b) * args.sigma - mean_t) / std_t).to(out_dtype)
            # Bytes: the noisy output written plus the (tiny) input read.
            time_op("gaussian_noise", out_dtype, {
                "eager": eager_noise,
                "robustops": lambda out_dtype=out_dtype: ro.gaussian_noise(xs, num, args.sigma, seed=0, mean=mean,
                                                                            std=std, out_dtype=out_dtype),
            }, num * D * torch.finfo(out_dtype).bits // 8 + xs.numel() * 4, num)
            logits = torch.randn(R, C, device=dev).to(out_dtype)
            # Bytes: the logits read (the counts are tiny).
            time_op("count_votes_", out_dtype, {
                "eager": lambda logits=logits: counts.add_(torch.bincount(logits.argmax(1), minlength=C)),
                "robustops": lambda logits=logits: ro.count_votes_(logits, counts),
            }, logits.numel() * logits.element_size(), R)
    return rows



# ---------------------------------------------------------------------- sequential certification

SEQ_TARGET_RATIO = 10.0  # >= 10x fewer samples than fixed n at r = 0.25 (sigma 0.25) for inputs with pA >= 0.9
SEQ_TARGET_EFFICIENCY = 1.2  # (t_seq / t_fixed) / (samples_seq / samples_fixed) <= 1.2
DECISION_NAMES = {CERTIFIED: "certified", NOT_CERTIFIED: "not_certified", ABSTAINED: "abstained"}


def train_digits(args, dev: str):
    """A SmallCNN trained on the digits with Gaussian noise augmentation at args.sigma (seconds on a CPU)."""
    from torch.utils.data import DataLoader

    from robustops import train
    from robustops.data import get_dataset

    train_ds, _ = get_dataset("digits", "train")
    torch.manual_seed(0)
    net = models.get_model("small_cnn", num_classes=10, in_channels=1, input_size=8)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    train.fit(net, loader, "gaussian", sigma=args.sigma, epochs=args.seq_epochs, lr=0.05, seed=0, progress=False,
              verbose=False, device=dev)
    t = time.perf_counter() - t0
    return net, (f"small_cnn trained here with Gaussian noise at sigma {args.sigma:g} ({args.seq_epochs} epochs, "
                 f"{t:.1f}s)")


def seq_setup(args, dev: str):
    """The section's (base classifier, mean, std, inputs x [M, ...], labels or None, classes, data tag, model
    tag, description)."""
    from robustops.data import get_dataset

    cuda = dev.startswith("cuda")
    data = args.seq_data or ("random" if cuda else "digits")
    M = args.seq_images or (256 if cuda else 32)
    mean = std = y = None
    C = 10
    if data == "random":
        x = torch.rand(M, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:
        ds, info = get_dataset(data, "test")
        C = int(info["num_classes"])
        items = [ds[i] for i in range(min(M, len(ds)))]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    if args.checkpoint:
        from robustops.cli.common import checkpoint_meta

        net = models.load_model(args.checkpoint)
        meta = checkpoint_meta(args.checkpoint, net)
        if meta.get("mean") is not None and meta.get("std") is not None:
            mean, std = list(meta["mean"]), list(meta["std"])
        else:
            net, mean, std = models.split_normalize(net)
        tag = os.path.splitext(os.path.basename(args.checkpoint))[0]
        desc = f"checkpoint {args.checkpoint}"
    elif data == "random":
        net = models.get_model(args.model, num_classes=C)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        tag = f"{args.model}_random_weights"
        desc = (f"{args.model} with random weights on CIFAR-sized random images: such a network votes one class for "
                f"nearly every noisy copy (pA ~ 1), so this measures mostly the easy case")
    elif data == "digits":
        net, desc = train_digits(args, dev)
        tag = f"digits_small_cnn_gaussian{args.sigma:g}"
    else:
        raise SystemExit(f"--seq-data {data}: give its model with --checkpoint")
    data_tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in data.split(":")[0])
    return net.to(dev).eval(), mean, std, x.to(dev), y, C, data_tag, tag, desc


def seq_row(stamp, args, **kw):
    base = dict(**stamp, bench="sequential", model="", radius="", provider="", s_per_image="", data="", mode="",
                inputs="", ref_inputs="", inputs_pa09="", N0=args.N0, N=args.N, batch="", alpha=args.alpha,
                sigma=args.sigma, seed=args.seq_seed, repeats="", wall_s="", mean_samples="", mean_samples_pa09="",
                sample_ratio="", sample_ratio_pa09="", wall_ratio="", samples_fraction="", refill_efficiency="",
                control_s="", refill_efficiency_control="", agreement="", seq_only="", fixed_only="", certified="",
                not_certified="", abstained="",
                radius_absdiff_mean="", radius_absdiff_max="", radius_diff_mean="", within_precision="")
    base.update(kw)
    return base


def _r(v, digits=5):
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else round(float(v), digits)


def timed_with_control(fn, control_for, device: str, repeats: int):
    """The sequential run fn() and its control, timed in turn in every repeat (so that a change in the machine's
    load hits both alike; the fastest of each counts): (t_seq, result, t_control, control samples). The control
    is fixed-n CERTIFY of the same inputs with the same total of samples (control_for(result) gives its function
    and sample count): its passes are full, so t_seq / t_control is the refill efficiency at equal load."""
    best, best_c, res, ctrl = float("inf"), float("inf"), None, None
    for _ in range(max(1, repeats)):
        t, res = timed_call(fn, device, 1)
        best = min(best, t)
        if ctrl is None:
            ctrl = control_for(res)
        t, _ = timed_call(ctrl[0], device, 1)
        best_c = min(best_c, t)
    return best, res, best_c, ctrl[1]


def sequential(args, stamp) -> None:
    """The sequential section: prints the figures beside their targets, appends the rows to --seq-csv,
    rewrites the per-input CSV and draws --sequential-plot."""
    dev = args.device
    cuda = dev.startswith("cuda")
    radii = [float(r) for r in args.seq_radii.split(",")]
    tests = [t.strip() for t in args.seq_tests.split(",") if t.strip()]
    net, mean, std, x, y, C, data, tag, desc = seq_setup(args, dev)
    M = x.shape[0]
    M_ref = max(1, min(M, args.seq_ref_images or (16 if cuda else M)))
    batch = args.seq_batch or (4000 if cuda else 2000)
    mode = args.seq_mode or ("bf16_cl" if cuda else "fp32")
    cl = mode == "bf16_cl"
    smooth = smoothing.Smooth(net, C, args.sigma, mean=mean, std=std, autocast="bf16" if cl else None,
                              channels_last=cl)
    N0, N, alpha, seed = args.N0, args.N, args.alpha, args.seq_seed
    fixed_n = N0 + N
    print(f"\n== sequential certification vs fixed-n CERTIFY (n0 {N0} + n {N:,} = {fixed_n:,} samples per input)")
    print(f"device: {stamp['device']}; torch {torch.__version__}")
    print(f"model: {desc}")
    if y is not None:
        with torch.inference_mode():
            xr = x[:M_ref].contiguous(memory_format=torch.channels_last) if cl else x[:M_ref]
            acc = float((net(xr).argmax(1).cpu() == y[:M_ref]).float().mean())
        print(f"base classifier's clean accuracy on the {M_ref} reference inputs: {acc:.1%}")
    print(f"data {data}: {M} inputs (fixed-n reference on the first {M_ref}), sigma {args.sigma:g}, alpha {alpha:g}, "
          f"batch {batch}, mode {mode}, seed {seed}, radii {radii}, tests {tests}")

    def control_for(inputs):
        """A fixed-n CERTIFY of `inputs` inputs with about the samples of a sequential result."""
        def make(res):
            n = max(1, int(round(float(res.samples.sum()) / inputs)) - N0)
            return (lambda: smooth.certify(x[:inputs], N0, n, alpha, batch, seed=seed + 1)), inputs * (N0 + n)
        return make

    smooth.certify(x[:2], 2, batch, alpha, batch, seed=0)  # warm-up
    smooth.certify_radius(x[:2], radii[0], alpha, batch, n0=N0, n_max=N, seed=0)
    t_fixed, ref = timed_call(lambda: smooth.certify(x[:M_ref], N0, N, alpha, batch, seed=seed), dev, 1)
    c_a = ref.selection_counts.argmax(1)
    n_a = ref.counts.gather(1, c_a[:, None])[:, 0]
    pa_hat = (n_a.double() / N).numpy()
    p_lower = ref.pA_lower.numpy()
    hi = pa_hat >= 0.9
    t_fixed_M = t_fixed * M / M_ref  # the fixed run on all M inputs, at its time per sample
    print(f"fixed-n CERTIFY: {t_fixed:.2f}s for {M_ref} inputs ({t_fixed / M_ref:.3f} s/input, "
          f"{M_ref * fixed_n / t_fixed:,.0f} samples/s); pA estimate nA/n: {int(hi.sum())} of {M_ref} inputs >= 0.9, "
          f"median {np.median(pa_hat):.4f}; certified at "
          + ", ".join(f"r={r:g}: {int((p_lower >= stats.norm.cdf(r / args.sigma)).sum())}" for r in radii))
    rows, per_input, points, summary = [], [], {}, []
    common = dict(model=tag, data=data, mode=mode, batch=batch, inputs=M, ref_inputs=M_ref, inputs_pa09=int(hi.sum()))
    for r in radii:
        rows.append(seq_row(stamp, args, radius=r, provider="fixed_n", s_per_image=_r(t_fixed / M_ref),
                            wall_s=_r(t_fixed, 3), mean_samples=fixed_n, mean_samples_pa09=fixed_n, repeats=1,
                            **common))
    for i in range(M_ref):
        per_input.append(dict(mode="fixed", test="", radius="", samples=fixed_n, decision="", index=i,
                              seq_prediction=int(ref.prediction[i]), seq_radius=_r(ref.radius[i], 6),
                              pA_lower=_r(p_lower[i], 6), pA_upper=""))

    for r in radii:
        p0 = float(stats.norm.cdf(r / args.sigma))
        fixed_cert = p_lower >= p0
        for test in tests:
            t, res, t_ctrl, n_ctrl = timed_with_control(lambda r=r, test=test: smooth.certify_radius(
                x, r, alpha, batch, test=test, n0=N0, n_max=N, seed=seed), control_for(M), dev, args.seq_repeats)
            S = res.samples.numpy().astype(np.float64)
            dec = res.decisions[:, 0].numpy()
            seq_cert = dec[:M_ref] == CERTIFIED
            mismatch = int((seq_cert & fixed_cert & (res.prediction[:M_ref] != ref.prediction).numpy()).sum())
            f = dict(r=r, test=test, t=t, mean_all=float(S.mean()),
                     mean_hi=float(S[:M_ref][hi].mean()) if hi.any() else float("nan"),
                     wall_ratio=t / t_fixed_M, n_ratio=float(S.sum()) / (M * fixed_n), t_ctrl=t_ctrl,
                     eff_ctrl=(t / float(S.sum())) / (t_ctrl / n_ctrl), agree=float(np.mean(seq_cert == fixed_cert)),
                     seq_only=int((seq_cert & ~fixed_cert).sum()), fixed_only=int((fixed_cert & ~seq_cert).sum()),
                     fixed_cert=int(fixed_cert.sum()), seq_cert=int(seq_cert.sum()), mismatch=mismatch,
                     counts=[int((dec == d).sum()) for d in (CERTIFIED, NOT_CERTIFIED, ABSTAINED)])
            f.update(eff=f["wall_ratio"] / f["n_ratio"], ratio_all=fixed_n / f["mean_all"],
                     ratio_hi=fixed_n / f["mean_hi"] if hi.any() else float("nan"))
            summary.append(f)
            rows.append(seq_row(stamp, args, radius=r, provider=test, s_per_image=_r(t / M), wall_s=_r(t, 4),
                                repeats=args.seq_repeats, mean_samples=_r(f["mean_all"], 1),
                                mean_samples_pa09=_r(f["mean_hi"], 1), sample_ratio=_r(f["ratio_all"], 2),
                                sample_ratio_pa09=_r(f["ratio_hi"], 2), wall_ratio=_r(f["wall_ratio"], 5),
                                samples_fraction=_r(f["n_ratio"], 5), refill_efficiency=_r(f["eff"], 3),
                                control_s=_r(t_ctrl, 4), refill_efficiency_control=_r(f["eff_ctrl"], 3),
                                agreement=_r(f["agree"], 4), seq_only=f["seq_only"], fixed_only=f["fixed_only"],
                                certified=f["counts"][0], not_certified=f["counts"][1], abstained=f["counts"][2],
                                **common))
            for i in range(M):
                per_input.append(dict(mode="radius", test=test, radius=r, samples=int(S[i]),
                                      decision=DECISION_NAMES.get(int(dec[i]), str(int(dec[i]))), index=i,
                                      seq_prediction=int(res.prediction[i]), seq_radius=_r(res.radius[i], 6),
                                      pA_lower=_r(res.pA_lower[i], 6), pA_upper=_r(res.pA_upper[i], 6)))
            points[(test, r)] = (pa_hat.tolist(), S[:M_ref].tolist())

    target_on = args.sigma == 0.25 and N == 100_000  # the issue's setting
    print(f"\nsamples and decisions (certify_radius; n0 + estimation samples per input; pA >= 0.9: the {int(hi.sum())} "
          f"of {M_ref} reference inputs with nA / n >= 0.9; agree: the decision at r equals fixed CERTIFY's, "
          f"radius >= r, on the reference inputs)")
    print(f"{'r':>5} {'test':>7} | {'samples/input':>13} {'pA>=0.9':>8} | {'fixed/seq':>9} {'pA>=0.9':>9} "
          f"{'target >=10x':>12} | {'agree':>6} {'seq-only':>8} {'fixed-only':>10} | {'certified/not/abstained':>23}")
    for f in summary:
        mark = ("met" if f["ratio_hi"] >= SEQ_TARGET_RATIO else "MISSED") if (f["r"] == 0.25 and target_on) else "-"
        print(f"{f['r']:5g} {f['test']:>7} | {f['mean_all']:13,.0f} {f['mean_hi']:8,.0f} | {f['ratio_all']:8.1f}x "
              f"{f['ratio_hi']:8.1f}x {mark:>12} | {f['agree']:6.1%} {f['seq_only']:8d} {f['fixed_only']:10d} | "
              f"{'/'.join(map(str, f['counts'])):>23}"
              + (f"  ({f['mismatch']} certified with another class than fixed-n!)" if f["mismatch"] else ""))
    print(f"\nwall time (target: refill efficiency = (t_seq / t_fixed) / (samples_seq / samples_fixed) <= "
          f"{SEQ_TARGET_EFFICIENCY}); t_seq: the fastest of {args.seq_repeats}; vs fixed: against the fixed n = {N:,} "
          f"run (timed once, scaled to {M} inputs); vs control: against fixed-n CERTIFY of the same inputs with the "
          f"same total samples, timed in turn with the sequential run (equal load: the figure to trust on a shared "
          f"machine)")
    print(f"{'r':>5} {'test':>7} | {'t_seq s':>8} {'t_fixed s':>9} {'t ratio':>8} {'n ratio':>8} | "
          f"{'eff. vs fixed':>13} {'control s':>9} {'eff. vs control':>15} {'target <=1.2':>12}")
    for f in summary:
        mark = "met" if f["eff_ctrl"] <= SEQ_TARGET_EFFICIENCY else "MISSED"
        print(f"{f['r']:5g} {f['test']:>7} | {f['t']:8.2f} {t_fixed_M:9.2f} {f['wall_ratio']:8.4f} "
              f"{f['n_ratio']:8.4f} | "
              f"{f['eff']:13.2f} {f['t_ctrl']:9.2f} {f['eff_ctrl']:15.2f} {mark:>12}")

    if args.seq_precision > 0:
        prec = args.seq_precision
        t_full, full, t_ctrl, n_ctrl = timed_with_control(lambda: smooth.certify_sequential(
            x[:M_ref], alpha, batch, precision=prec, test=args.seq_full_test, n0=N0, n_max=N, seed=seed),
            control_for(M_ref), dev, 1)
        S = full.samples.numpy().astype(np.float64)
        diff = full.radius.numpy() - ref.radius.numpy()
        wall_ratio = t_full / t_fixed
        n_ratio = float(S.sum()) / (M_ref * fixed_n)
        eff = wall_ratio / n_ratio
        eff_ctrl = (t_full / float(S.sum())) / (t_ctrl / n_ctrl)
        mean_hi = float(S[hi].mean()) if hi.any() else float("nan")
        same = float(np.mean((full.radius.numpy() > 0) == (ref.radius.numpy() > 0)))
        print(f"\nfull-radius mode certify_sequential(precision={prec:g}, test={args.seq_full_test}) on the {M_ref} "
              f"reference inputs: {S.mean():,.0f} samples/input ({fixed_n / S.mean():.2f}x fewer than {fixed_n:,}; "
              f"pA >= 0.9: {mean_hi:,.0f}, {fixed_n / mean_hi:.2f}x); {t_full:.2f}s: t ratio {wall_ratio:.3f}, n ratio "
              f"{n_ratio:.3f}, refill eff. {eff:.2f} vs fixed-n, {eff_ctrl:.2f} vs control (target <= "
              f"{SEQ_TARGET_EFFICIENCY}); radius - fixed radius: mean {diff.mean():+.4f}, mean |.| "
              f"{np.abs(diff).mean():.4f}, max |.| {np.abs(diff).max():.4f}, within {prec:g} for "
              f"{np.mean(np.abs(diff) <= prec + 1e-9):.1%}; certifies (radius > 0) the same inputs as fixed-n for "
              f"{same:.1%}. (pA near 1: the fixed-n radius needs nearly all of n_max, little is saved there)")
        full_common = dict(common, inputs=M_ref)
        rows.append(seq_row(stamp, args, radius="full", provider="fixed_n", s_per_image=_r(t_fixed / M_ref),
                            wall_s=_r(t_fixed, 3), mean_samples=fixed_n, mean_samples_pa09=fixed_n, repeats=1,
                            **full_common))
        rows.append(seq_row(stamp, args, radius="full", provider=f"full_{args.seq_full_test}",
                            s_per_image=_r(t_full / M_ref), wall_s=_r(t_full, 3), repeats=1,
                            mean_samples=_r(S.mean(), 1), mean_samples_pa09=_r(mean_hi, 1),
                            sample_ratio=_r(fixed_n / S.mean(), 3), sample_ratio_pa09=_r(fixed_n / mean_hi, 3),
                            wall_ratio=_r(wall_ratio, 5), samples_fraction=_r(n_ratio, 5), refill_efficiency=_r(eff, 3),
                            control_s=_r(t_ctrl, 4), refill_efficiency_control=_r(eff_ctrl, 3),
                            agreement=_r(same, 4), radius_absdiff_mean=_r(np.abs(diff).mean(), 5),
                            radius_absdiff_max=_r(np.abs(diff).max(), 5), radius_diff_mean=_r(diff.mean(), 5),
                            within_precision=_r(np.mean(np.abs(diff) <= prec + 1e-9), 4), **full_common))
        for i in range(M_ref):
            per_input.append(dict(mode="full", test=args.seq_full_test, radius="", samples=int(S[i]), decision="",
                                  index=i, seq_prediction=int(full.prediction[i]), seq_radius=_r(full.radius[i], 6),
                                  pA_lower=_r(full.pA_lower[i], 6), pA_upper=_r(full.pA_upper[i], 6)))

    print("\nsamples saved (README table):")
    print(f"| r | test | mean samples / input (all) | pA >= 0.9 | fixed {fixed_n:,} / seq (all) | pA >= 0.9 "
          "| wall ratio | refill efficiency vs fixed-n (vs control) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for f in summary:
        print(f"| {f['r']:g} | {f['test']} | {f['mean_all']:,.0f} | {f['mean_hi']:,.0f} | {f['ratio_all']:.1f}x | "
              f"{f['ratio_hi']:.1f}x | {f['wall_ratio']:.4f} | {f['eff']:.2f} ({f['eff_ctrl']:.2f}) |")

    seq_args = argparse.Namespace(**dict(vars(args), csv=args.seq_csv))
    finish(seq_args, rows)
    if not args.no_csv:
        path = os.path.join(RESULTS, f"sequential_inputs_{data}.csv")
        fields = ["date", "device", "model", "data", "index", "pa_hat", "fixed_pA_lower", "fixed_radius", "mode",
                  "test", "radius", "samples", "decision", "seq_prediction", "seq_radius", "pA_lower", "pA_upper"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for rec in per_input:
                i = rec["index"]
                w.writerow(dict(rec, date=stamp["date"], device=stamp["device"], model=tag, data=data,
                                pa_hat=_r(pa_hat[i], 6) if i < M_ref else "",
                                fixed_pA_lower=_r(p_lower[i], 6) if i < M_ref else "",
                                fixed_radius=_r(ref.radius[i], 6) if i < M_ref else ""))
        print(f"wrote {len(per_input)} per-input rows to {path}")
    if args.sequential_plot:
        import sequential_samples

        sequential_plot(args, points, sequential_samples.points_label(tag, M_ref))


def sequential_plot(args, points, label) -> None:
    """Samples used against pA (benchmarks/sequential_samples.py) at args.sequential_plot, with points (or,
    when None, the saved digits inputs) overlaid."""
    import sequential_samples

    sequential_samples.make_plot(
        args.sequential_plot, inputs=os.path.join(RESULTS, "sequential_inputs_digits.csv"), points=points,
        points_label=label, trials=args.seq_plot_trials, sigma=args.sigma, n0=args.N0, n_max=args.N,
        alpha=args.alpha, sim_csv=None if args.no_csv else os.path.join(RESULTS, "sequential_sim.csv"))

if __name__ == "__main__":
    main()
