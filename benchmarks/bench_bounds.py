"""Interval bound propagation (IBP) and the bisection radius on CNN-7 (robustops.models.CNN7, the IBP
benchmark network) at batch 256 on CIFAR-sized input (3x32x32), against the plain forward pass of the
same model, with every provider timed in one run, round-robin, medians reported.

Providers (all in eval mode, without gradients; random weights, BatchNorm running statistics
accumulated from random batches and random affine parameters, so that no BatchNorm is the identity):
- forward: ``model(x)``, the reference cost; forward compiled: torch.compile of the model, for
  reading the compiled providers against (it fuses BatchNorm and ReLU into fewer passes over memory,
  which the eager forward does not).
- eager IBP: the straightforward implementation written here, in lower/upper form layer by layer as
  Gowal et al.'s reference code does: for each affine layer the midpoint and radius of the interval,
  then two separate products (W mid + b and |W| rad), then lower = mid - rad, upper = mid + rad;
  BatchNorm as a per-channel affine map (min / max of the mapped ends); ReLU on both ends; the logits'
  bounds at the end and the margin bound z_y - z_j >= lower_y - upper_j by subtraction.
- eager IBP compiled: torch.compile of that function (fullgraph).
- robustops stacked / robustops two convs: ``bounds.margin_bounds`` (centre/radius, last layer elided
  into the margin specification) with ``bounds.STACKED_CONV[device type]`` set to True (W c and |W| r
  as one grouped convolution over the stacked pair) and to False (two convolutions).
- robustops compiled: torch.compile of ``bounds.margin_bounds`` with the configured STACKED_CONV;
  fullgraph first, and when that fails the reason is printed and it is compiled without fullgraph.
- robustops radius: ``bounds.certified_radius(eps_max=8/255, tol=1e-3)`` of the predicted class (with
  random weights the labels would mostly be mispredicted, and a mispredicted sample leaves the search
  at once; certifying the prediction keeps every sample in every pass). Its bound passes and its time
  as a multiple of one robustops bound pass (configured STACKED_CONV) are printed too.

Figures: the median time, its ratio to the plain forward (the target of the issue: IBP at most 2.5x the
forward; 2x is the floor, since every affine layer does two products of the forward's size), and
"of floor", the 2x-forward floor as a fraction of the time (100% = at the floor). That is the
limit-relative figure here: the convolutions and the 32768x512 linear layer are compute-bound, so the
copy bandwidth is not the limit of a bound pass. For information the table also prints the time the
least memory traffic of the pass would take at the copy bandwidth measured in this run (input, weights,
and each affine layer's output written once and read once: one tensor for the forward, two for IBP)
as a fraction of the measured time; it is a few percent, which says the same.

    python benchmarks/bench_bounds.py                       # GPU if present, batch 256
    python benchmarks/bench_bounds.py --device cpu --small  # CPU: batch 32, fewer repetitions

Appends one row per provider to benchmarks/results/bounds.csv (unless --no-csv).
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustops import bounds
from robustops.models import CNN7
from common import copy_bandwidth, finish, parser, setup

EPS_MAX = 8 / 255  # CIFAR-10's usual L-inf radius
TOL = 1e-3


def make_model(device: str, input_size: int = 32, seed: int = 0) -> nn.Module:
    """CNN-7 with random weights and non-trivial BatchNorm: running statistics accumulated over a few
    random batches (train mode), affine parameters drawn at random; returned in eval mode."""
    torch.manual_seed(seed)
    model = CNN7(in_channels=3, num_classes=10, input_size=input_size).to(device)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, input_size, input_size, device=device))
        for m in bns:
            m.momentum = 0.1
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def eager_ibp_margins(layers, x, y, eps, lo=0.0, hi=1.0):
    """Lower bounds of z_y - z_j over the L-inf box, the straightforward way: lower/upper bounds layer
    by layer, two separate products per affine layer (W mid + b, |W| rad), the logits' bounds, then
    the margin by subtraction (no elision)."""
    lower = (x - eps).clamp(lo, hi)
    upper = (x + eps).clamp(lo, hi)
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            mid = (upper + lower) / 2
            rad = (upper - lower) / 2
            if isinstance(m, nn.Conv2d):
                mid = F.conv2d(mid, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
                rad = F.conv2d(rad, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups)
            else:
                mid = F.linear(mid, m.weight, m.bias)
                rad = F.linear(rad, m.weight.abs())
            lower, upper = mid - rad, mid + rad
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale = m.weight / torch.sqrt(m.running_var + m.eps)
            shift = m.bias - m.running_mean * scale
            shape = (1, -1) + (1,) * (lower.dim() - 2)
            a = lower * scale.view(shape) + shift.view(shape)
            b = upper * scale.view(shape) + shift.view(shape)
            lower, upper = torch.minimum(a, b), torch.maximum(a, b)
        elif isinstance(m, nn.ReLU):
            lower, upper = F.relu(lower), F.relu(upper)
        elif isinstance(m, nn.Flatten):
            lower, upper = lower.flatten(1), upper.flatten(1)
        else:
            raise TypeError(f"eager IBP: no rule for {type(m).__name__}")
    margin = lower.gather(1, y.view(-1, 1)) - upper
    return margin.scatter(1, y.view(-1, 1), 0.0)


def pass_bytes(model: nn.Module, x: torch.Tensor, tensors: int) -> int:
    """The least memory traffic of one pass: the input and the parameters read once, and each affine
    layer's output (``tensors`` of them: 1 for the forward, 2 for IBP's centre and radius) written once
    and read once (BatchNorm and ReLU fused into the producer)."""
    outs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out.numel()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return x.element_size() * (x.numel() + params + 2 * tensors * sum(outs))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_now(device_type: str) -> str:
    """The 1-minute load average on CPU (other processes share the cores the figures are timed on)."""
    return f"; load average {os.getloadavg()[0]:.1f}" if device_type == "cpu" else ""


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[:3])[:400]


def main(argv=None):
    p = parser(__doc__, "bounds.csv")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 256; --small: 32)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 10; --small: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per provider (compilation happens here)")
    p.add_argument("--small", action="store_true", help="CPU-sized preset: batch 32, 5 rounds")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 32 if args.small else 256
    if args.reps is None:
        args.reps = 5 if args.small else 10
    dev = args.device
    dtype_key = torch.device(dev).type
    base = setup(args)
    configured = bool(bounds.STACKED_CONV.get(dtype_key, False))
    bw = copy_bandwidth(dev)
    print(f"device: {base['device']}; copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; "
          f"torch {torch.__version__}{load_now(dtype_key)}")
    print(f"configured bounds.STACKED_CONV[{dtype_key!r}] = {configured}")

    model = make_model(dev)
    B = args.batch
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.rand(B, 3, 32, 32, device=dev, generator=gen)
    y = torch.randint(0, 10, (B,), device=dev, generator=gen)
    eps = EPS_MAX
    layers = list(model.net)

    def ours(stacked):
        def fn():
            bounds.STACKED_CONV[dtype_key] = stacked
            return bounds.margin_bounds(model, x, y, eps, num_classes=10)
        return fn

    radius_out = {}

    def radius():
        bounds.STACKED_CONV[dtype_key] = configured
        radius_out["res"] = bounds.certified_radius(model, x, None, eps_max=EPS_MAX, tol=TOL)
        return radius_out["res"].radius

    providers = {
        "forward": lambda: model(x),
        "eager IBP": lambda: eager_ibp_margins(layers, x, y, eps),
        "robustops stacked": ours(True),
        "robustops two convs": ours(False),
        "robustops radius": radius,
    }
    compiled_mode = {}
    notes = []
    with torch.no_grad():
        if not args.no_compile:
            model_c = torch.compile(model, fullgraph=True, dynamic=False)
            model_c(x)
            providers["forward compiled"] = lambda: model_c(x)
            compiled_mode["forward compiled"] = "fullgraph"
            base_c = torch.compile(eager_ibp_margins, fullgraph=True, dynamic=False)
            try:
                base_c(layers, x, y, eps)
                providers["eager IBP compiled"] = lambda: base_c(layers, x, y, eps)
                compiled_mode["eager IBP compiled"] = "fullgraph"
            except Exception as e:  # noqa: BLE001
                notes.append(f"eager IBP does not compile: {first_line(e)}")
            for fullgraph in (True, False):
                ours_c = torch.compile(bounds.margin_bounds, fullgraph=fullgraph, dynamic=False)

                def call(fn=ours_c):
                    bounds.STACKED_CONV[dtype_key] = configured
                    return fn(model, x, y, eps, num_classes=10)
                try:
                    call()
                except Exception as e:  # noqa: BLE001
                    what = "with fullgraph=True" if fullgraph else "without fullgraph"
                    notes.append(f"robustops margin_bounds does not compile {what}: {first_line(e)}")
                    continue
                providers["robustops compiled"] = call
                compiled_mode["robustops compiled"] = "fullgraph" if fullgraph else "graph breaks"
                break
        for n in notes:
            print(f"note: {n}")

        # agreement: the elided margins are never looser than the eager ones (same interval arithmetic)
        ref = eager_ibp_margins(layers, x, y, eps)
        for name in ("robustops stacked", "robustops two convs", "robustops compiled"):
            if name in providers:
                got = providers[name]()
                slack = float((ref - got).clamp(min=0).max()) / (1 + float(ref.abs().max()))
                print(f"check: {name} margins >= eager IBP's: {'ok' if slack < 1e-4 else 'NO'} "
                      f"(largest excess of eager over it, relative: {slack:.1e})")

        # warm-up (compilation), then round-robin timing so that drifts of the load hit all alike
        order = ["forward", "forward compiled", "eager IBP", "eager IBP compiled", "robustops stacked",
                 "robustops two convs", "robustops compiled", "robustops radius"]
        order = [k for k in order if k in providers]
        for k in order:
            for _ in range(args.warmup):
                providers[k]()
            sync(dev)
        times = {k: [] for k in order}
        t_start = time.perf_counter()
        for _ in range(args.reps):
            for k in order:
                sync(dev)
                t0 = time.perf_counter()
                providers[k]()
                sync(dev)
                times[k].append(time.perf_counter() - t0)
        bounds.STACKED_CONV[dtype_key] = configured
    med = {k: statistics.median(v) for k, v in times.items()}
    passes = radius_out["res"].passes
    step = radius_out["res"].step  # the grid: at most ceil(log2(ceil(eps_max / step) + 1)) passes
    max_passes = math.ceil(math.log2(math.ceil(EPS_MAX / step) + 1))
    proven = float((radius_out["res"].radius > 0).float().mean())
    t_fwd = med["forward"]
    one_pass = med["robustops stacked" if configured else "robustops two convs"]
    fwd_bytes, ibp_bytes = pass_bytes(model, x, 1), pass_bytes(model, x, 2)

    print(f"\nCNN-7, batch {B}, 3x32x32, eps {eps:.4g}; {args.reps} rounds round-robin "
          f"({time.perf_counter() - t_start:.0f}s), medians{load_now(dtype_key)}")
    header = (f"  {'provider':<22} {'time':>11} {'x forward':>9} {'of floor':>8} {'traffic':>8}  notes")
    print(header)
    print("  " + "-" * (len(header) - 2))
    rows = []
    for k in order:
        t = med[k]
        ratio = t / t_fwd
        row = dict(base, bench="bounds", model="cnn7", batch=B, shape="3x32x32", eps=round(eps, 6), provider=k,
                   time_ms=round(t * 1e3, 4), ratio_vs_forward=round(ratio, 4), reps=args.reps,
                   copy_gb_per_s=round(bw / 1e9, 2))
        note = ""
        if k.startswith("forward"):
            traffic = fwd_bytes / bw / t
            row.update(traffic_fraction=round(traffic, 4))
            cols = f"{'':>8} {traffic:>8.1%}"
            note = compiled_mode.get(k, "")
        elif k == "robustops radius":
            row.update(passes=passes, max_passes=max_passes, vs_one_pass=round(t / one_pass, 3), tol=TOL,
                       eps_max=round(EPS_MAX, 6), stacked_conv=int(configured))
            cols = f"{'':>8} {'':>8}"
            note = f"{passes} bound passes (at most {max_passes}), {t / one_pass:.2f}x one robustops pass"
        else:
            floor = 2 * t_fwd / t
            traffic = ibp_bytes / bw / t
            row.update(fraction_of_floor=round(floor, 4), traffic_fraction=round(traffic, 4))
            cols = f"{floor:>8.1%} {traffic:>8.1%}"
            if k.startswith("robustops"):
                st = {"robustops stacked": True, "robustops two convs": False}.get(k, configured)
                row.update(stacked_conv=int(st))
            if k in compiled_mode:
                row.update(compiled=compiled_mode[k])
                note = compiled_mode[k]
            if k == "robustops compiled":
                note += f", STACKED_CONV={configured}"
        print(f"  {k:<22} {t * 1e3:>9.2f}ms {ratio:>8.2f}x {cols}  {note}")
        rows.append(row)
    print("  (of floor: 2x the forward as a fraction of the time; traffic: the least memory traffic at the copy "
          "bandwidth as a fraction of the time -- small: the passes are compute-bound)")

    t_st, t_two = med["robustops stacked"], med["robustops two convs"]
    faster = "stacked" if t_st < t_two else "two convs"
    print(f"\nSTACKED_CONV[{dtype_key!r}]: stacked {t_st * 1e3:.2f}ms, two convs {t_two * 1e3:.2f}ms: {faster} is "
          f"faster by {abs(t_st - t_two) / max(t_st, t_two):.1%} (configured: {configured})")
    best = min(t_st, t_two, med.get("robustops compiled", float("inf")))
    print(f"target IBP <= 2.5x forward: robustops eager {min(t_st, t_two) / t_fwd:.2f}x, best {best / t_fwd:.2f}x "
          f"({'met' if best / t_fwd <= 2.5 else 'not met'}); eager IBP {med['eager IBP'] / t_fwd:.2f}x")
    print(f"target radius to {TOL:g} in <= 12 bound passes: {passes}, at most {max_passes} on the grid of step "
          f"{step:g} up to {EPS_MAX:.4g} ({'met' if max_passes <= 12 else 'not met'}; {proven:.0%} of the samples "
          f"have a positive radius with these random weights)")
    finish(args, rows)


if __name__ == "__main__":
    main()
