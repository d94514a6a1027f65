"""PGD evaluation end to end: an eager torchattacks-style loop against robustops.attacks.PGD eager,
CUDA-graph replay (fp32 and bf16 autocast) and early exit, side by side in one run; APGD-CE:
torchattacks.APGD eager and with a torch.compile'd model against robustops.attacks.APGD; and the
AutoAttack suite: robustops' against torchattacks.AutoAttack on the same model and points.

Configurations (GPU defaults):
- cnn: a small MNIST-shaped CNN (robustops.models.SmallCNN, 1x28x28), L-inf PGD-40, eps 0.3,
  alpha 0.01, batch 128 and 1024. The model is trained for a few epochs on the embedded digits
  upsampled to 28x28, so the early-exit rows (samples that are fooled leave the batch) show what
  evaluating a trained, non-robust model costs; the other rows do not depend on the weights.
- rn18: PreAct-ResNet-18 on CIFAR-shaped input (3x32x32), L-inf PGD-20, eps 8/255, alpha 2/255,
  batch 256, random weights.
- autoattack: AutoAttack standard (APGD-CE, APGD-T and FAB-T with 9 target classes, Square), L-inf,
  all points in one batch, on a PGD-trained model (random weights would let APGD-CE break nearly
  every point and leave the later stages nothing to do): on a CPU the SmallCNN on the 8x8 digits (3
  epochs of Adam, then 6 of PGD-5 training at eps 0.2 with robustops.train.fit, Adam 2e-3), eps
  0.2, the 360 test points; on CUDA (--aa-model rn18) PreAct-ResNet-18 on the digits made CIFAR-shaped
  (upsampled to 32x32, the gray channel three times: no CIFAR-10 files on a lent machine; 3 + 6 epochs
  at batch 128), eps 8/255, the 360 test points. torchattacks 3.5.1's AutoAttack runs APGD, APGD-T and
  FAB at its own defaults, 10 iterations (AutoAttack's are 100), and Square with 5000 queries and the
  schedule rescaled, so two comparisons: "robustops AA equal budget" (Suite(steps=10,
  rescale_schedule=True)) against it, the speed target (at most 0.8x its time at equal or lower robust
  accuracy: PASS / MISS printed), and "robustops AA standard" (AutoAttack's real budgets, 100
  iterations, Square unrescaled) for reference. Per stage, side by side: the robust points after it
  and its seconds. The limit beside each time is its floor: the forward and forward + backward passes
  that the points surviving each stage must make there (a survivor runs the stage's whole budget;
  APGD-T and FAB-T one pass per step and target, Square one forward per query), at the per-point rate
  of a full-batch pass timed in the same run (the fastest of each round); "x floor" = time / floor.

Methods:
- eager (torchattacks-style): the loop of torchattacks.PGD re-implemented here: uniform random start,
  per step forward, cross entropy, torch.autograd.grad to the input (parameters still requiring
  gradients), adv + alpha*sign(grad), clamp to the ball, clamp to [0, 1]. fp32.
- robustops eager: PGD(...)(x, y): parameters frozen for the attack, one fused pgd_step_ per step.
- robustops graph / graph+bf16: the whole iteration replayed from a CUDA graph (CUDA only).
- robustops early-exit (eager, and graph on CUDA): evaluation mode, on the trained CNN.

    python benchmarks/bench_attack.py                      # GPU defaults
    python benchmarks/bench_attack.py --device cpu --small # CPU: small batches, few steps
    python benchmarks/bench_attack.py --device cpu --threads 1 --configs autoattack [--small]

On a small shared CPU give --threads 1: with other processes on the cores, OpenMP's spinning threads
made the suites up to 10x slower and the timings erratic (both implementations alike). The autoattack
--small preset (96 points, Square 500 queries, 3 PGD epochs, 2 timed runs) takes about 30 s on 2 cores.

Prints the median time per attack (methods timed round-robin), images/s, speedup over the eager loop
and the robust accuracy reached, and appends rows to benchmarks/results/attack.csv with the device name and date
(autoattack rows also: n_queries, rescale_schedule, clean_acc, stages = robust points after each stage,
stage_s = seconds per stage, floor_s, x_floor; speedup_vs_eager is over torchattacks' AutoAttack).
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from robustops import attacks
from robustops.data import load_digits
from robustops.models import PreActResNet18, SmallCNN
from robustops.train import fit
from common import finish, fit_classifier, parser, setup


def torchattacks_style_pgd(model, images, labels, eps, alpha, steps):
    """PGD the way torchattacks.PGD computes it (eager, several small ops per step)."""
    images = images.clone().detach()
    labels = labels.clone().detach()
    adv = images + torch.empty_like(images).uniform_(-eps, eps)
    adv = torch.clamp(adv, 0, 1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = F.cross_entropy(model(adv), labels)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def digits28(split: str, device: str):
    x, y = load_digits(split).tensors
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.to(device), y.to(device)


def train_cnn(device: str, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=10, input_size=28).to(device)
    x, y = digits28("train", device)
    return fit_classifier(model, x, y, epochs)


def batch_of(x, y, n):
    reps = (n + x.shape[0] - 1) // x.shape[0]
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_config(args, cfg, model, x, y, eps, alpha, steps, trained, rows, base):
    dev = args.device
    cuda = dev.startswith("cuda")
    B = x.shape[0]
    methods = []

    def robust_of_adv(adv):
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    def robust_of_result(res):
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        return (clean_ok & ~res.success).float().mean().item()

    methods.append(("eager (torchattacks-style)", "float32",
                    lambda: torchattacks_style_pgd(model, x, y, eps, alpha, steps), robust_of_adv))
    mk = lambda **kw: attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, seed=0, **kw)  # noqa: E731
    a_eager = mk()
    methods.append(("robustops eager", "float32", lambda: a_eager(x, y), robust_of_adv))
    if "bf16" in args.extra:
        a_eager16 = mk(dtype=torch.bfloat16)
        methods.append(("robustops eager+bf16", "bfloat16", lambda: a_eager16(x, y), robust_of_adv))
    if cuda:
        a_graph = mk(graph=True)
        methods.append(("robustops graph", "float32", lambda: a_graph(x, y), robust_of_adv))
        a_graph16 = mk(graph=True, dtype=torch.bfloat16)
        methods.append(("robustops graph+bf16", "bfloat16", lambda: a_graph16(x, y), robust_of_adv))
    if trained:
        a_es = mk(early_stop=True)
        methods.append(("robustops early-exit", "float32", lambda: a_es.perturb(x, y), robust_of_result))
        if cuda:
            a_esg = mk(early_stop=True, graph=True)
            methods.append(("robustops graph early-exit", "float32", lambda: a_esg.perturb(x, y), robust_of_result))

    print(f"\n{cfg}: batch {B}, L-inf PGD-{steps}, eps {eps:.4g}, alpha {alpha:.4g}"
          f"{' (trained model)' if trained else ' (random weights)'}")
    time_methods(args, methods, B, rows, dict(base, config=cfg, batch=B, steps=steps, eps=round(eps, 6),
                                              trained=int(trained)))


def time_methods(args, methods, B, rows, fields):
    """Warm-up, then the methods (name, dtype, fn, robust_of_output) timed round-robin; prints a table
    (the first method is the baseline of the speedup column) and appends one row per method."""
    dev = args.device
    header = f"  {'method':<28} {'dtype':>8} {'time/attack':>12} {'img/s':>10} {'vs eager':>9} {'robust acc':>10}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    # Warm-up (CUDA-graph capture happens here), then the methods timed in turn, round-robin, so that
    # a drift in the machine's load (other processes, clocks) affects them alike; medians reported.
    accs = {}
    for name, _, fn, robust in methods:
        torch.manual_seed(0)
        for _ in range(max(1, args.warmup)):  # at least one run: its output gives the robust accuracy
            out = fn()
        sync(dev)
        accs[name] = robust(out)
    times = {name: [] for name, *_ in methods}
    for _ in range(args.reps):
        for name, _, fn, _ in methods:
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    eager_t = None
    for name, dtype, _, _ in methods:
        t = statistics.median(times[name])
        if eager_t is None:
            eager_t = t
        speed = eager_t / t
        acc = accs[name]
        print(f"  {name:<28} {dtype:>8} {t * 1e3:10.2f}ms {B / t:10.0f} {speed:8.2f}x {acc:10.4f}")
        rows.append(dict(fields, method=name, dtype=dtype, time_s=f"{t:.6g}", images_per_s=f"{B / t:.6g}",
                         speedup_vs_eager=f"{speed:.4g}", robust_acc=f"{acc:.4f}", reps=args.reps))


def run_apgd(args, model, x, y, eps, steps, rows, base):
    """APGD-CE (Croce & Hein 2020) on the trained CNN: torchattacks.APGD (eager; and with the model
    under torch.compile, the compiled baseline) against robustops.attacks.APGD (early exit at the
    checkpoints, its default; fused steps)."""
    B = x.shape[0]

    def robust_of_adv(adv):
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    methods = []
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        print("  (torchattacks is not installed: no eager APGD baseline)")
    if torchattacks is not None:
        ta = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss="ce")
        methods.append(("torchattacks APGD (eager)", "float32", lambda: ta(x, y), robust_of_adv))
        if not args.no_compile:
            compiled = torch.compile(model)
            ta_c = torchattacks.APGD(compiled, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss="ce")
            methods.append(("torchattacks APGD compiled", "float32", lambda: ta_c(x, y), robust_of_adv))
    ours = attacks.APGD(model, eps=eps, steps=steps, seed=0)
    methods.append(("robustops APGD", "float32", lambda: ours(x, y), robust_of_adv))
    print(f"\nsmall_cnn_mnist: batch {B}, L-inf APGD-CE-{steps}, eps {eps:.4g} (trained model)")
    time_methods(args, methods, B, rows, dict(base, config="small_cnn_mnist_apgd", batch=B, steps=steps,
                                             eps=round(eps, 6), trained=1))


# ------------------------------------------------------------------------------------------ AutoAttack
AA_TARGETS = 9  # target classes of APGD-T and FAB-T in both implementations (C - 1 on 10 classes)
TA_STEPS = 10  # torchattacks 3.5.1's AutoAttack: APGD, APGD-T and FAB at their own default, 10 iterations


def digits_rgb32(split: str, device: str):
    """The digits as CIFAR-shaped input: upsampled to 32x32, the gray channel repeated three times."""
    x, y = load_digits(split).tensors
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    return x.to(device), y.to(device)


def digits8(split: str, device: str):
    x, y = load_digits(split).tensors
    return x.to(device), y.to(device)


def autoattack_model(args, dev):
    """The PGD-trained model the suites attack and its test points: (model, config name, eps, x, y)."""
    rn = args.aa_model == "rn18" or (args.aa_model == "auto" and dev.startswith("cuda"))
    torch.manual_seed(0)
    if rn:
        model, data, name, eps, batch = PreActResNet18().to(dev), digits_rgb32, "preact_resnet18_digits32", 8 / 255, 128
    else:
        model, data, name, eps, batch = SmallCNN().to(dev), digits8, "small_cnn_digits8", 0.2, 64
    eps = eps if args.aa_eps is None else args.aa_eps
    t0 = time.perf_counter()
    x, y = data("train", dev)
    fit_classifier(model, x, y, 3, batch=batch)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    fit(model, loader, "pgd", epochs=args.aa_train_epochs, eps=eps, steps=5, optimizer="adam", lr=2e-3,
        schedule="constant", weight_decay=0.0, seed=0, progress=False, verbose=False, threads=0, device=dev)
    model.eval()
    xt, yt = data("test", dev)
    n = min(args.aa_n, xt.shape[0]) if args.aa_n else xt.shape[0]
    xt, yt = xt[:n].contiguous(), yt[:n].contiguous()
    with torch.no_grad():
        clean = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"\n{type(model).__name__} on {name[name.index('_digits') + 1:]}: 3 epochs natural + {args.aa_train_epochs} "
          f"epochs L-inf PGD-5 training at eps {eps:.4g} ({time.perf_counter() - t0:.1f}s); clean accuracy "
          f"{clean:.4f} on the {n} test points")
    return model, name, eps, xt, yt


def stage_clock(stages, method: str, dev):
    """Wraps each stage's method (an instance attribute shadowing the class's) so that the seconds of its
    calls add up in the returned list, one entry per stage; the caller zeroes it before a run."""
    spent = [0.0] * len(stages)
    for k, obj in enumerate(stages):
        def timed(*a, _fn=getattr(obj, method), _k=k, **kw):
            sync(dev)
            t0 = time.perf_counter()
            out = _fn(*a, **kw)
            sync(dev)
            spent[_k] += time.perf_counter() - t0
            return out
        setattr(obj, method, timed)
    return spent


def robustops_autoattack(model, eps, steps, queries, rescale):
    """robustops' AutoAttack (standard): fn(x, y) -> {clean, robust, after} (point counts)."""
    from robustops.attacks.suites import Suite

    suite = Suite(model, eps, "linf", steps=steps, n_queries=queries, rescale_schedule=rescale, seed=0)
    spent = stage_clock(suite.attacks, "perturb", str(next(model.parameters()).device))

    def run(x, y):
        spent[:] = [0.0] * len(spent)
        res = suite.run([(x, y)], progress=False, model=model)
        return dict(clean=res["clean_correct"], robust=res["robust_correct"], after=list(res["robust_correct_after"]),
                    stage_s=list(spent))
    return run


def torchattacks_autoattack(model, eps, steps, queries):
    """torchattacks.AutoAttack (standard, seed 0), its budgets set to steps / queries (its own: 10 and 5000,
    Square's schedule rescaled): fn(x, y) -> {clean, robust, after}. The per-stage counts are MultiAttack's
    own record; a point counts as broken when its output is misclassified within eps."""
    import torchattacks

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    multi = aa._autoattack
    for atk in multi.attacks[:3]:
        atk.steps = steps
    multi.attacks[3].n_queries = queries
    spent = stage_clock(multi.attacks, "forward", str(next(model.parameters()).device))

    def run(x, y):
        spent[:] = [0.0] * len(spent)
        multi._accumulate_multi_atk_records = True
        multi._multi_atk_records = [0.0] * (len(multi.attacks) + 1)  # stages after an early break stay 0
        adv = aa(x, y)
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
            broken = (model(adv).argmax(1) != y) & ((adv - x).flatten(1).abs().amax(1) <= eps * (1 + 1e-6))
        return dict(clean=int(clean_ok.sum()), robust=int((clean_ok & ~broken).sum()),
                    after=[int(v) for v in multi._multi_atk_records[1:]], stage_s=list(spent))
    return run


def pass_times(model, x, y, dev, reps: int = 5):
    """Seconds per point of a batched forward (no grad) and of a forward + backward to the input, at
    x's batch size: the two kinds of model call an attack suite is made of. The fastest of reps calls
    (a floor is what the machine can do, not what a busy moment lets it)."""
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)

    def fastest(fn):
        fn()
        ts = []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        return min(ts) / x.shape[0]
    return fastest(fwd), fastest(fwd_bwd)


def floor_seconds(after, steps, queries, t_fwd, t_fwd_bwd):
    """The least time a suite with these budgets can take on these points: a point that survives a stage
    ran its whole budget there (APGD-CE steps, APGD-T and FAB-T 9 targets x steps forward + backward
    passes; Square queries forwards), each pass at the full batch's throughput; a broken point is
    counted free. after: robust points after each stage."""
    s_ce, s_t, s_fab, s_sq = after
    return t_fwd_bwd * steps * (s_ce + AA_TARGETS * (s_t + s_fab)) + t_fwd * queries * s_sq


def aa_methods(args, model, eps):
    """(name, steps, rescaled, build(steps, queries) -> fn): the baseline first."""
    out = []
    if importlib.util.find_spec("torchattacks") is None:
        print("  (torchattacks is not installed: no baseline)")
    else:
        out.append(("torchattacks AutoAttack", TA_STEPS, True,
                    lambda st, q: torchattacks_autoattack(model, eps, st, q)))
    out.append(("robustops AA equal budget", TA_STEPS, True,
                lambda st, q: robustops_autoattack(model, eps, st, q, True)))
    out.append(("robustops AA standard", args.aa_steps, False,
                lambda st, q: robustops_autoattack(model, eps, st, q, False)))
    return out


def time_autoattacks(args, methods, model, x, y):
    """Warm-up, then the methods timed round-robin with the floor's passes timed in each round. On a CPU
    the warm-up is one whole run of each method: it fills oneDNN's per-shape primitive cache for the
    batch sizes early exit leaves, which would otherwise favour whichever suite runs later; on CUDA a
    run at a tiny budget. Returns ({name: (median seconds, counts of its first run)}, (forward,
    forward + backward) seconds per point, the fastest over the rounds); a method's "stage_s" holds
    per stage the median seconds over the timed runs."""
    full = not args.device.startswith("cuda")
    runs = [build(steps, args.aa_queries) for _, steps, _, build in methods]
    counts = {}
    for (name, _, _, build), run in zip(methods, runs):
        if full:
            counts[name] = run(x, y)
        else:
            build(2, 10)(x[:16], y[:16])
    times, stage_s, passes = {m[0]: [] for m in methods}, {m[0]: [] for m in methods}, []
    for _ in range(args.aa_reps):
        passes.append(pass_times(model, x, y, args.device))
        for (name, *_), run in zip(methods, runs):
            sync(args.device)
            t0 = time.perf_counter()
            out = run(x, y)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
            stage_s[name].append(out["stage_s"])
            counts.setdefault(name, out)
    for name, c in counts.items():
        c["stage_s"] = [statistics.median(col) for col in zip(*stage_s[name])]
    floor = tuple(min(p[i] for p in passes) for i in (0, 1))
    return {name: (statistics.median(times[name]), counts[name]) for name in times}, floor


def budget_of(steps, queries, rescaled):
    return (f"APGD-CE-{steps} + APGD-T-{steps}x{AA_TARGETS} + FAB-T-{steps}x{AA_TARGETS} + Square-{queries}q"
            + (" resc." if rescaled else ""))


def run_autoattack(args, rows, base):
    """robustops' AutoAttack against torchattacks' on the same PGD-trained model and points (see the
    module docstring): times, the floor beside each, robust accuracy and per-stage counts side by side,
    and the speed target at equal budgets."""
    dev = args.device
    model, name, eps, x, y = autoattack_model(args, dev)
    n = x.shape[0]
    methods = aa_methods(args, model, eps)
    res, (t_fwd, t_fb) = time_autoattacks(args, methods, model, x, y)
    warm = "a tiny-budget run" if dev.startswith("cuda") else "one whole untimed run"
    print(f"AutoAttack standard, L-inf eps {eps:.4g}, {n} points in one batch; warm-up {warm}, then "
          f"{args.aa_reps} timed run(s) each, round-robin.\nfloor: a forward {t_fwd * 1e6:.1f} us, a forward + "
          f"backward {t_fb * 1e6:.1f} us per point (batch {n}, fastest over the rounds): a suite's floor is the "
          f"passes its surviving points must make, at that rate")
    base_t = res[methods[0][0]][0]
    header = f"  {'method':<26} {'time':>9} {'vs TA':>9} {'floor':>9} {'x floor':>8} {'robust acc':>10}  budget"
    print(header + "\n  " + "-" * (len(header) + 40))
    for mname, steps, resc, _ in methods:
        t, c = res[mname]
        floor = floor_seconds(c["after"], steps, args.aa_queries, t_fwd, t_fb)
        acc, x_floor = c["robust"] / n, t / floor if floor > 0 else float("nan")  # no survivor: no floor
        print(f"  {mname:<26} {t:8.2f}s {base_t / t:8.2f}x {floor:8.2f}s {x_floor:7.1f}x {acc:10.4f}  "
              f"{budget_of(steps, args.aa_queries, resc)}")
        rows.append(dict(base, config=f"autoattack_{name}", batch=n, steps=steps, eps=round(eps, 6), method=mname,
                         dtype="float32", time_s=f"{t:.6g}", images_per_s=f"{n / t:.6g}",
                         speedup_vs_eager=f"{base_t / t:.4g}", robust_acc=f"{acc:.4f}", trained=1, reps=args.aa_reps,
                         n_queries=args.aa_queries, rescale_schedule=int(resc), clean_acc=f"{c['clean'] / n:.4f}",
                         stages="/".join(str(v) for v in c["after"]), floor_s=f"{floor:.6g}",
                         x_floor=f"{x_floor:.4g}", stage_s="/".join(f"{v:.4g}" for v in c["stage_s"])))
    print_stages(methods, res, n)
    print_target(methods, res, n)


def print_stages(methods, res, n):
    """AutoAttack's log side by side: per stage and method, the robust points after it and the median
    seconds the stage took."""
    names = [m[0] for m in methods]
    print(f"  robust points after each stage (of {n}) / seconds in the stage:")
    print("  " + f"{'stage':<10}" + "".join(f"{m:>28}" for m in names))
    print("  " + f"{'clean':<10}" + "".join(f"{res[m][1]['clean']:>28}" for m in names))
    for k, stage in enumerate(("APGD-CE", "APGD-T", "FAB-T", "Square")):
        cells = [f"{res[m][1]['after'][k]} / {res[m][1]['stage_s'][k]:.2f}s" for m in names]
        print("  " + f"{stage:<10}" + "".join(f"{c:>28}" for c in cells))


def print_target(methods, res, n):
    """The speed target of issue 23: robustops at equal budgets in at most 0.8x torchattacks' time, at
    equal or lower robust accuracy."""
    if methods[0][0] != "torchattacks AutoAttack":
        return
    (t_ta, c_ta), (t_ro, c_ro) = res[methods[0][0]], res[methods[1][0]]
    ratio, fast, strong = t_ro / t_ta, t_ro / t_ta <= 0.8, c_ro["robust"] <= c_ta["robust"]
    print(f"  target (equal budgets): robustops {ratio:.2f}x torchattacks' time (<= 0.8x: {'yes' if fast else 'no'}), "
          f"robust acc {c_ro['robust'] / n:.4f} vs {c_ta['robust'] / n:.4f} (equal or lower: "
          f"{'yes' if strong else 'no'}): {'PASS' if fast and strong else 'MISS'}")


def main(argv=None):
    p = parser(__doc__, "attack.csv")
    p.add_argument("--configs", default="cnn,rn18,apgd", help="comma list of cnn, rn18, apgd (APGD-CE on the CNN), "
                   "autoattack (the AutoAttack suites)")
    p.add_argument("--apgd-steps", type=int, default=None, help="APGD-CE steps (default 100; --small: 20)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline of APGD")
    p.add_argument("--cnn-batches", default=None, help="default 128,1024 (--small: 32,128)")
    p.add_argument("--cnn-steps", type=int, default=None, help="default 40 (--small: 10)")
    p.add_argument("--rn-batch", type=int, default=None, help="default 256 (--small: 8)")
    p.add_argument("--rn-steps", type=int, default=None, help="default 20 (--small: 2)")
    p.add_argument("--train-epochs", type=int, default=4, help="epochs of digits training for the CNN")
    p.add_argument("--small", action="store_true", help="CPU-sized preset: cnn batches 32,128, PGD-10; "
                   "rn18 batch 8, PGD-2")
    p.add_argument("--extra", default="", help="comma list: bf16 (also time robustops eager with bf16 autocast)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per method (default 10; 3 with --small)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--aa-model", default="auto", choices=("auto", "smallcnn", "rn18"),
                   help="autoattack: the PGD-trained model (auto: rn18 on CUDA, else the 8x8 digits SmallCNN)")
    p.add_argument("--aa-n", type=int, default=None, help="autoattack: test points (default all 360; --small: 96)")
    p.add_argument("--aa-queries", type=int, default=None, help="autoattack: Square's queries (default 5000; "
                   "--small: 500)")
    p.add_argument("--aa-steps", type=int, default=100, help="autoattack: iterations of robustops' standard suite")
    p.add_argument("--aa-eps", type=float, default=None, help="autoattack: L-inf radius (default 0.2; rn18 8/255)")
    p.add_argument("--aa-train-epochs", type=int, default=None, help="autoattack: PGD training epochs (default 6; "
                   "--small: 3)")
    p.add_argument("--aa-reps", type=int, default=None, help="autoattack: timed runs per suite (default 2 on CPU, "
                   "1 on CUDA; --small: 2)")
    args = p.parse_args(argv)
    preset = dict(cnn_batches=("128,1024", "32,128"), cnn_steps=(40, 10), rn_batch=(256, 8), rn_steps=(20, 2),
                  reps=(10, 3), apgd_steps=(100, 20), aa_n=(0, 96), aa_queries=(5000, 500),
                  aa_train_epochs=(6, 3), aa_reps=(1 if args.device.startswith("cuda") else 2, 2))
    for k, (full, small) in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, small if args.small else full)
    dev = args.device
    base = setup(args)
    print(f"device: {base['device']}; torch {torch.__version__}")
    rows = []
    configs = args.configs.split(",")
    if "cnn" in configs or "apgd" in configs:
        t0 = time.perf_counter()
        model = train_cnn(dev, args.train_epochs)
        xt, yt = digits28("test", dev)
        with torch.no_grad():
            clean = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"SmallCNN(28x28) trained on upsampled digits: {args.train_epochs} epochs, "
              f"{time.perf_counter() - t0:.1f}s, clean test accuracy {clean:.4f}")
        batches = [int(v) for v in args.cnn_batches.split(",")]
        for b in batches if "cnn" in configs else []:
            x, y = batch_of(xt, yt, b)
            run_config(args, "small_cnn_mnist", model, x, y, 0.3, 0.01, args.cnn_steps, True, rows, base)
        if "apgd" in configs:
            x, y = batch_of(xt, yt, batches[-1])
            run_apgd(args, model, x, y, 0.3, args.apgd_steps, rows, base)
    if "rn18" in configs:
        torch.manual_seed(0)
        model = PreActResNet18().to(dev).eval()
        x = torch.rand(args.rn_batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (args.rn_batch,), device=dev)
        run_config(args, "preact_resnet18_cifar", model, x, y, 8 / 255, 2 / 255, args.rn_steps, False, rows, base)
    if "autoattack" in configs:
        run_autoattack(args, rows, base)
    finish(args, rows)


if __name__ == "__main__":
    main()
