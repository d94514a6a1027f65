"""PGD evaluation end to end: an eager torchattacks-style loop against robustops.attacks.PGD eager,
CUDA-graph replay (fp32 and bf16 autocast) and early exit, side by side in one run; and APGD-CE:
torchattacks.APGD eager and with a torch.compile'd model against robustops.attacks.APGD.

Configurations (GPU defaults):
- cnn: a small MNIST-shaped CNN (robustops.models.SmallCNN, 1x28x28), L-inf PGD-40, eps 0.3,
  alpha 0.01, batch 128 and 1024. The model is trained for a few epochs on the embedded digits
  upsampled to 28x28, so the early-exit rows (samples that are fooled leave the batch) show what
  evaluating a trained, non-robust model costs; the other rows do not depend on the weights.
- rn18: PreAct-ResNet-18 on CIFAR-shaped input (3x32x32), L-inf PGD-20, eps 8/255, alpha 2/255,
  batch 256, random weights.

Methods:
- eager (torchattacks-style): the loop of torchattacks.PGD re-implemented here: uniform random start,
  per step forward, cross entropy, torch.autograd.grad to the input (parameters still requiring
  gradients), adv + alpha*sign(grad), clamp to the ball, clamp to [0, 1]. fp32.
- robustops eager: PGD(...)(x, y): parameters frozen for the attack, one fused pgd_step_ per step.
- robustops graph / graph+bf16: the whole iteration replayed from a CUDA graph (CUDA only).
- robustops early-exit (eager, and graph on CUDA): evaluation mode, on the trained CNN.

    python benchmarks/bench_attack.py                      # GPU defaults
    python benchmarks/bench_attack.py --device cpu --small # CPU: small batches, few steps

Prints the median time per attack (methods timed round-robin), images/s, speedup over the eager loop
and the robust accuracy reached, and appends rows to benchmarks/results/attack.csv with the device name and date.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from robustops import attacks
from robustops.data import load_digits
from robustops.models import PreActResNet18, SmallCNN
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


def main(argv=None):
    p = parser(__doc__, "attack.csv")
    p.add_argument("--configs", default="cnn,rn18,apgd", help="comma list of cnn, rn18, apgd (APGD-CE on the CNN)")
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
    args = p.parse_args(argv)
    preset = dict(cnn_batches=("128,1024", "32,128"), cnn_steps=(40, 10), rn_batch=(256, 8), rn_steps=(20, 2),
                  reps=(10, 3), apgd_steps=(100, 20))
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
    finish(args, rows)


if __name__ == "__main__":
    main()
