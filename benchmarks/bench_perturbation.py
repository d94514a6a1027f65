"""Learned perturbation sets (Wong and Kolter 2021): latent PGD-10 over a batch, and randomized-smoothing
certification in the latent space against pixel space, every provider timed in one run, round-robin,
medians reported.

Configurations (GPU defaults; --small: the CPU preset):
- digits_1x8x8: the digits CVAE (robustops.perturbation.CVAE(1, 8, latent_dim 8)) fitted briefly on
  DigitsPairs (3 epochs) and robustops.models.SmallCNN(8x8) trained briefly on the digits; test
  digits repeated to the batch (256; --small: 128).
- cvae_3x32x32: CVAE(3, 32, latent_dim 16) and SmallCNN(3x32x32), random weights (the CVAE's
  zero-initialised layers -- the decoder's last convolution, the prior's last linear layer -- drawn
  small and random, so that the decoder depends on z at all), uniform random images and labels
  (batch 256; --small: 32).

Latent PGD-10 (eps 1, alpha 0.2 in units of the prior's standard deviations, start at u = 0):
- eager: the loop as it is usually written, here in the benchmark: the prior (mu, sigma) once, then per
  step z = mu + sigma * u, x_hat = clamp(decode(z, x), 0, 1), loss = CE(f(x_hat), y),
  torch.autograd.grad to u (parameters still requiring gradients), u + alpha * g / ||g|| (per-sample
  L2 normalisation), projection onto ||u|| <= eps; the decoded member at the end. fp32.
- eager compiled: the same loop with its step function under torch.compile as it comes (fullgraph when
  dynamo can trace it; otherwise with graph breaks, whose reasons are printed: dynamo does not trace
  torch.autograd.grad by default, so the step runs as compiled pieces around an eager gradient).
- eager compiled traced (GPU default; --traced-grad 1 elsewhere): the step compiled fullgraph with
  torch._dynamo.config.trace_autograd_ops on, the gradient traced into one graph.
- Each compiled step is compared with the eager step from the same iterate, and the final u's; printed
  for information (the gate, "check: ok", is robustops against eager). On CPU the graph-broken compiled
  step of the random 3x32x32 models was measured 2.8e-3 from a float64 eager step where eager fp32 is
  2e-7 from it, and the iteration amplifies such differences.
- robustops: attacks.LatentPGD(random_start=False, early_stop=False).perturb(x, y, evaluate=False):
  the same iteration on the projected-gradient engine (parameters frozen, the fused L2 step); the
  final u must agree with the eager loop's ("check: ok" before anything is timed).
- robustops early-stop (trained digits models only): LatentPGD with early_stop=True, its default:
  samples that are fooled leave the batch, so it does less work than the others (and evaluates
  its result).

Certification (CERTIFY of Cohen et al., N0 / N noisy samples per input, the same inputs, classifier,
N0, N, alpha and forward batch for every provider):
- eager latent: the per-input loop as users write it: the prior of one input, then per batch
  x.repeat, randn * sigma_latent, z = mu + sigma * u, decode, clamp, classify, argmax, .cpu(), numpy
  bincount (one host sync per batch), Clopper-Pearson on the host.
- robustops latent: smoothing.LatentSmooth(...).certify (the decoder and classifier on each noisy
  latent row, rows of all inputs sharing the forward passes, votes counted on the device).
- robustops pixel: smoothing.Smooth(classifier, sigma 0.25).certify on the same images (noise in
  pixel space, the classifier alone).
- forward bounds: the decoder alone and the classifier alone on ready batches of `batch` rows, times
  (N0 + N) / batch per input: what certification costs if everything but the forward passes were
  free. The latent bound is decoder + classifier, the pixel bound the classifier; the decoder's
  share of the latent bound says where the latent certification's time goes.

Figures: every time is the median of the rounds and is printed with the device name. Speed-ups are
against the eager loop ("vs eager") and against its torch.compile ("vs compiled"); certification
also gives samples/s, the latent/pixel time ratio and "of bound" (the forward bound as a fraction
of the time; 100% = nothing but the forward passes). "traffic" is the least memory traffic at the
copy bandwidth measured in this run, as a fraction of the time (PGD: per step the input and
weights read, every layer output written and read once, and the gradient of every layer that
depends on u written and read once; certification: the forward's share of that per noisy row):
small figures say the passes are bound by compute or launch overhead, not memory.

    python benchmarks/bench_perturbation.py                       # GPU defaults
    python benchmarks/bench_perturbation.py --device cpu --small  # CPU preset (~1 minute on 2 idle cores)

Appends one row per provider to benchmarks/results/perturbation.csv (unless --no-csv).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from robustops import attacks, smoothing
from robustops.data import load_digits
from robustops.models import SmallCNN
from robustops.perturbation import CVAE, DigitsPairs, fit_perturbation
from common import copy_bandwidth, finish, fit_classifier, parser, setup

EPS, ALPHA, STEPS = 1.0, 0.2, 10  # Wong and Kolter's latent attack: radius 1, step 0.2, 10 steps
NUM_CLASSES = 10


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[:2])[:300]


# ------------------------------------------------------------------------- the eager baselines

def eager_step(classifier, cvae, x, y, mu, sigma, u, eps, alpha):
    """One latent PGD step the usual way: several small ops, autograd.grad to u."""
    u = u.detach().requires_grad_(True)
    z = mu + sigma * u
    x_hat = cvae.decode(z, x).clamp(0.0, 1.0)
    loss = F.cross_entropy(classifier(x_hat), y)
    (g,) = torch.autograd.grad(loss, u)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u = u.detach() + alpha * g
    return u * (eps / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def eager_latent_pgd(step, classifier, cvae, x, y, eps, alpha, steps):
    """(u, decoded member) of latent PGD from u = 0, with the step function given (eager or compiled)."""
    with torch.no_grad():
        mu, logvar = cvae.prior(x)
        sigma = torch.exp(0.5 * logvar)
    u = torch.zeros_like(mu)
    for _ in range(steps):
        u = step(classifier, cvae, x, y, mu, sigma, u, eps, alpha)
    with torch.no_grad():
        return u, cvae.decode(mu + sigma * u, x).clamp(0.0, 1.0)


def eager_latent_certify(classifier, cvae, x1, n0, n, alpha, batch, sigma, num_classes):
    """CERTIFY of one input x1 [C, H, W] in the latent space, the usual per-input loop."""
    with torch.no_grad():
        mu, logvar = cvae.prior(x1[None])
        s = torch.exp(0.5 * logvar)

        def votes(num):
            counts = np.zeros(num_classes, dtype=np.int64)
            remaining = num
            while remaining > 0:
                this = min(batch, remaining)
                remaining -= this
                xb = x1.repeat((this, 1, 1, 1))
                u = torch.randn(this, mu.shape[1], device=x1.device) * sigma
                pred = classifier(cvae.decode(mu + s * u, xb).clamp(0.0, 1.0)).argmax(1)
                counts += np.bincount(pred.cpu().numpy(), minlength=num_classes)
            return counts

        c_a = int(votes(n0).argmax())
        n_a = int(votes(n)[c_a])
    p_a = float(smoothing.clopper_pearson_lower(n_a, n, alpha))
    if p_a < 0.5:
        return -1, 0.0
    from scipy.stats import norm

    return c_a, sigma * float(norm.ppf(p_a))


# --------------------------------------------------------------------------------- the models

def digits_models(args, dev):
    """(classifier, cvae, x, y): SmallCNN and the digits CVAE, both trained briefly; test digits."""
    torch.manual_seed(0)
    xtr, ytr = (t.to(dev) for t in load_digits("train").tensors)
    clf = fit_classifier(SmallCNN(1, NUM_CLASSES, 8).to(dev), xtr, ytr, args.cnn_epochs)
    pairs = DigitsPairs("train", seed=0)
    xp, xt, yp = pairs.pair(list(range(len(pairs))))
    cvae = CVAE(1, 8, 8)
    fit_perturbation(cvae, DataLoader(TensorDataset(xp, xt, yp), batch_size=128, shuffle=True),
                     epochs=args.cvae_epochs, device=dev, progress=False, seed=0)
    cvae = cvae.to(dev).eval()
    xte, yte = load_digits("test").tensors
    reps = (args.batch + xte.shape[0] - 1) // xte.shape[0]
    x = xte.repeat(reps, 1, 1, 1)[:args.batch].contiguous().to(dev)
    y = yte.repeat(reps)[:args.batch].contiguous().to(dev)
    with torch.no_grad():
        clean = (clf(xte.to(dev)).argmax(1) == yte.to(dev)).float().mean().item()
    return clf, cvae, x, y, f"trained: SmallCNN {args.cnn_epochs} epochs (clean test acc {clean:.3f}), " \
                            f"CVAE {args.cvae_epochs} epochs on DigitsPairs"


def cvae32_models(args, dev):
    """(classifier, cvae, x, y): SmallCNN(3x32x32) and CVAE(3, 32, 16) with random weights."""
    torch.manual_seed(0)
    clf = SmallCNN(3, NUM_CLASSES, 32).to(dev).eval()
    cvae = CVAE(3, 32, 16)
    with torch.no_grad():
        for p in cvae.parameters():
            if not bool(p.any()):  # zero-initialised: the decoder would ignore z, the prior be N(0, I)
                p.normal_(0.0, 0.05)
    cvae = cvae.to(dev).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch32, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, NUM_CLASSES, (args.batch32,), generator=g).to(dev)
    return clf, cvae, x, y, "random weights, uniform random images"


# ------------------------------------------------------------------------------ memory traffic

def layer_outputs(modules, fn):
    """(elements of every Conv / ConvTranspose / Linear output, elements of those that require grad)
    during fn(); parameters counted once."""
    outs, grads = [], []

    def hook(mod, inp, out):
        outs.append(out.numel())
        if out.requires_grad:
            grads.append(out.numel())
    hooks = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return sum(outs), sum(grads)


def pgd_step_bytes(clf, cvae, x, y) -> int:
    """The least memory traffic of one latent PGD step (fp32): x and the weights read, each layer
    output written and read once, and each output that depends on u: its gradient written and read once
    (the parameters frozen, so that only u's dependants require grad)."""
    params = [p for m in (clf, cvae.decoder_net) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    with torch.no_grad():
        mu, logvar = cvae.prior(x)
    u = torch.zeros_like(mu, requires_grad=True)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            outs, grads = layer_outputs((clf, cvae.decoder_net), lambda: clf(
                cvae.decode(mu + torch.exp(0.5 * logvar) * u, x).clamp(0, 1)))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return 4 * (x.numel() + 2 * sum(p.numel() for p in params) + 2 * outs + 2 * grads)


def forward_row_bytes(modules, fn, rows: int) -> float:
    """The least memory traffic of fn()'s forward per row: weights read once per call, each layer
    output written and read once (fp32)."""
    with torch.no_grad():
        outs, _ = layer_outputs(modules, fn)
    params = sum(p.numel() for m in modules for p in m.parameters())
    return 4 * (params + 2 * outs) / rows


# ---------------------------------------------------------------------------------- providers

def round_robin(providers: dict, device: str, warmup: int, reps: int) -> dict:
    """Median seconds per call of each provider, after warm-up, timed in turn in every round so that a
    drift of the machine's load hits them alike."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times = {k: [] for k in providers}
    for _ in range(reps):
        for k, fn in providers.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compile_step(sample_args, traced: bool):
    """(compiled step or None, mode string, notes). traced=False: torch.compile as it comes, fullgraph
    first, else with graph breaks (dynamo does not trace torch.autograd.grad by default); traced=True:
    fullgraph with torch._dynamo.config.trace_autograd_ops on (the gradient traced into the graph)."""
    notes = []
    if not traced:
        try:
            ex = torch._dynamo.explain(eager_step)(*sample_args)
            reasons = sorted({str(b.reason).split("\n")[0].split(" / Explanation")[0][:120] for b in ex.break_reasons})
            notes.append(f"dynamo: {ex.graph_count} graph(s), {ex.graph_break_count} graph break(s)"
                         + (": " + "; ".join(reasons) if reasons else ""))
        except Exception as e:  # noqa: BLE001
            notes.append(f"torch._dynamo.explain failed: {first_line(e)}")
        torch._dynamo.reset()
    elif not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return None, "", ["this torch has no torch._dynamo.config.trace_autograd_ops"]
    for fullgraph in ((True,) if traced else (True, False)):
        fn = torch.compile(eager_step, fullgraph=fullgraph, dynamic=False)
        if traced:
            def fn(*a, _fn=fn):
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    return _fn(*a)
        t0 = time.perf_counter()
        try:
            fn(*sample_args)
        except Exception as e:  # noqa: BLE001
            notes.append(f"does not compile with fullgraph=True: {first_line(e)}" if fullgraph
                         else f"does not compile: {first_line(e)}")
            continue
        mode = ("fullgraph, traced grad" if traced else "fullgraph") if fullgraph else "graph breaks"
        notes.append(f"compiled ({mode}) in {time.perf_counter() - t0:.0f}s")
        return fn, mode, notes
    return None, "", notes


def run_pgd(args, cfg, clf, cvae, x, y, trained, bw, rows, stamp):
    dev = args.device
    B = x.shape[0]
    with torch.no_grad():
        mu0, lv0 = cvae.prior(x)
    sample_args = (clf, cvae, x, y, mu0, torch.exp(0.5 * lv0), torch.zeros_like(mu0), EPS, ALPHA)
    compiled, mode, notes = (None, "", []) if args.no_compile else compile_step(sample_args, False)
    traced, _, tnotes = (None, "", []) if args.no_compile or not args.traced_grad else compile_step(sample_args, True)
    modes = {"eager compiled": mode, "eager compiled traced": "fullgraph, traced grad"}
    out = {}

    def keep(name, fn):
        def call():
            out[name] = fn()
        return call

    providers = {"eager": keep("eager", lambda: eager_latent_pgd(eager_step, clf, cvae, x, y, EPS, ALPHA, STEPS))}
    if compiled is not None:
        providers["eager compiled"] = keep("eager compiled", lambda: eager_latent_pgd(
            compiled, clf, cvae, x, y, EPS, ALPHA, STEPS))
    if traced is not None:
        providers["eager compiled traced"] = keep("eager compiled traced", lambda: eager_latent_pgd(
            traced, clf, cvae, x, y, EPS, ALPHA, STEPS))
    atk = attacks.LatentPGD(clf, cvae, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, early_stop=False,
                            seed=0)
    providers["robustops"] = keep("robustops", lambda: (lambda r: (r.u, r.x_adv))(
        atk.perturb(x, y, evaluate=False)))
    if trained:
        atk_es = attacks.LatentPGD(clf, cvae, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False,
                                   early_stop=True, seed=0)
        providers["robustops early-stop"] = keep("robustops early-stop", lambda: (lambda r: (r.u, r.x_adv))(
            atk_es.perturb(x, y)))

    print(f"\n{cfg}: latent PGD-{STEPS}, batch {B}, eps {EPS:g}, alpha {ALPHA:g}, latent dim {cvae.latent_dim}, "
          f"input {'x'.join(str(s) for s in x.shape[1:])}")
    for n in notes:
        print(f"  note: eager step under torch.compile: {n}")
    for n in tnotes:
        print(f"  note: eager step under torch.compile with trace_autograd_ops: {n}")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the check in fp32 convolutions (timing with torch's defaults)
    for k in providers:
        if k != "robustops early-stop":
            providers[k]()
    ref = out["eager"][0]
    diff = float((out["robustops"][0] - ref).abs().max()) / EPS
    ok = diff < 1e-3
    print(f"  check: final u of robustops vs eager: max |diff| / eps = {diff:.1e} ({'ok' if ok else 'NO'})")
    for name, cfn in (("eager compiled", compiled), ("eager compiled traced", traced)):
        if cfn is None:
            continue
        # The compiled step rounds differently (fused elementwise ops, its own backward), and the iteration
        # amplifies a difference in the normalised gradient; so each compiled step is checked from the
        # eager iterate (lockstep), and the final u's difference is printed for information.
        lock = 0.0
        u = torch.zeros_like(mu0)
        for _ in range(STEPS):
            nxt = eager_step(*sample_args[:6], u, EPS, ALPHA)
            lock = max(lock, float((cfn(*sample_args[:6], u, EPS, ALPHA) - nxt).abs().max()) / EPS)
            u = nxt
        good = lock < 1e-3  # informational: the compiled step itself rounds differently (not the gate)
        final = float((out[name][0] - ref).abs().max()) / EPS
        print(f"  check: each {name} step vs the eager step from the same u: max |diff| / eps = {lock:.1e} "
              f"({'ok' if good else 'differs'}, not part of the check); final u after {STEPS} compiled steps vs eager: "
              f"{final:.1e}")
    torch.backends.cudnn.allow_tf32 = tf32
    print(f"  check: {'ok' if ok else 'MISMATCH'}")

    t_run = time.perf_counter()
    med = round_robin(providers, dev, args.warmup, args.reps)
    step_bytes = pgd_step_bytes(clf, cvae, x, y)
    t_eager, t_comp = med["eager"], med.get("eager compiled")
    print(f"  {args.reps} rounds round-robin ({time.perf_counter() - t_run:.0f}s incl. warm-up), medians; "
          f"least traffic per step {step_bytes / 1e6:.1f} MB")
    header = (f"  {'provider':<22} {'time/attack':>12} {'img/s':>9} {'vs eager':>9} {'vs compiled':>11} "
              f"{'traffic':>8} {'robust acc':>10}  notes")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for k, t in med.items():
        u, xa = out[k]
        with torch.no_grad():
            acc = (clf(xa).argmax(1) == y).float().mean().item()
        traffic = STEPS * step_bytes / bw / t
        note = dict(modes, **{"robustops early-stop": "fooled samples leave the batch: less work"}).get(k, "")
        vs_c = f"{t_comp / t:10.2f}x" if t_comp else f"{'':>11}"
        print(f"  {k:<22} {t * 1e3:10.2f}ms {B / t:9.0f} {t_eager / t:8.2f}x {vs_c} {traffic:8.2%} {acc:10.4f}  {note}")
        rows.append(dict(stamp, bench="pgd", config=cfg, provider=k, batch=B, steps=STEPS, eps=EPS, alpha=ALPHA,
                         time_s=f"{t:.6g}", images_per_s=f"{B / t:.6g}", speedup_vs_eager=f"{t_eager / t:.4g}",
                         speedup_vs_compiled=f"{t_comp / t:.4g}" if t_comp else "",
                         traffic_fraction=f"{traffic:.4g}", copy_gb_per_s=round(bw / 1e9, 2),
                         robust_acc=f"{acc:.4f}", compiled=modes.get(k, ""),
                         check="ok" if ok else "mismatch", reps=args.reps))


def run_certify(args, cfg, clf, cvae, x_all, bw, rows, stamp):
    dev = args.device
    x = x_all[:args.images].contiguous()
    K, n0, n, bs = x.shape[0], args.N0, args.N, args.cert_batch
    per_image = (n0 + n) / bs  # forward passes per input
    latent = smoothing.LatentSmooth(clf, cvae, NUM_CLASSES, args.latent_sigma)
    pixel = smoothing.Smooth(clf, NUM_CLASSES, args.sigma)
    res = {}

    def eager():
        res["eager latent"] = [eager_latent_certify(clf, cvae, x[i], n0, n, args.alpha, bs, args.latent_sigma,
                                                    NUM_CLASSES) for i in range(K)]

    def ours():
        res["robustops latent"] = latent.certify(x, n0, n, args.alpha, bs, seed=1)

    def pix():
        res["robustops pixel"] = pixel.certify(x, n0, n, args.alpha, bs, seed=1)

    # the forward passes alone, on ready batches of bs rows
    g = torch.Generator().manual_seed(2)
    xb = x[torch.arange(bs, device=dev) % K].contiguous()
    zb = torch.randn(bs, cvae.latent_dim, generator=g).to(dev)
    dec_row = forward_row_bytes((cvae.decoder_net,), lambda: cvae.decode(zb, xb), bs)
    cls_row = forward_row_bytes((clf,), lambda: clf(xb), bs)
    t_run = time.perf_counter()
    with torch.no_grad():
        # the forward bounds in the same rounds (one batch per round; its time scaled below)
        med = round_robin({"eager latent": eager, "robustops latent": ours, "robustops pixel": pix,
                           "decoder": lambda: cvae.decode(zb, xb), "classifier": lambda: clf(xb)}, dev,
                          args.cert_warmup, args.cert_reps)
    t_dec, t_cls = med.pop("decoder"), med.pop("classifier")
    bound = {"eager latent": (t_dec + t_cls) * per_image, "robustops latent": (t_dec + t_cls) * per_image,
             "robustops pixel": t_cls * per_image}
    row_bytes = {"eager latent": dec_row + cls_row, "robustops latent": dec_row + cls_row, "robustops pixel": cls_row}
    preds = [p for p, _ in res["eager latent"]]
    agree = sum(int(a == int(b)) for a, b in zip(preds, res["robustops latent"].prediction))
    print(f"\n{cfg}: certification of {K} inputs, N0 {n0}, N {n}, alpha {args.alpha:g}, batch {bs}; latent sigma "
          f"{args.latent_sigma:g}, pixel sigma {args.sigma:g}; {args.cert_reps} rounds round-robin "
          f"({time.perf_counter() - t_run:.0f}s incl. warm-up), medians")
    header = (f"  {'provider':<18} {'time/input':>11} {'samples/s':>10} {'vs eager':>9} {'vs pixel':>9} "
              f"{'of bound':>9} {'traffic':>8}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    t_eager, t_pix = med["eager latent"], med["robustops pixel"]
    for k, t_call in med.items():
        t = t_call / K
        sps = (n0 + n) / t
        traffic = row_bytes[k] * (n0 + n) / bw / t
        print(f"  {k:<18} {t * 1e3:9.2f}ms {sps:10.0f} {t_eager / t_call:8.2f}x {t_call / t_pix:8.2f}x "
              f"{bound[k] / t:9.1%} {traffic:8.2%}")
        rows.append(dict(stamp, bench="certify", config=cfg, provider=k, batch=bs, N0=n0, N=n, images=K,
                         time_s=f"{t:.6g}", samples_per_s=f"{sps:.6g}", speedup_vs_eager=f"{t_eager / t_call:.4g}",
                         time_vs_pixel=f"{t_call / t_pix:.4g}", fraction_of_bound=f"{bound[k] / t:.4g}",
                         traffic_fraction=f"{traffic:.4g}", copy_gb_per_s=round(bw / 1e9, 2), reps=args.cert_reps))
    for name, t in (("decoder", t_dec), ("classifier", t_cls)):
        print(f"  {'forward ' + name:<18} {t * per_image * 1e3:9.2f}ms {(n0 + n) / (t * per_image):10.0f}   "
              f"(alone, {t * 1e3:.2f}ms per batch of {bs})")
        rows.append(dict(stamp, bench="certify", config=cfg, provider=f"forward bound {name}", batch=bs, N0=n0, N=n,
                         images=K, time_s=f"{t * per_image:.6g}", samples_per_s=f"{(n0 + n) / (t * per_image):.6g}",
                         reps=args.cert_reps))
    share = t_dec / (t_dec + t_cls)
    print(f"  where the time goes: latent certification runs the decoder on every noisy latent row; the decoder is "
          f"{share:.0%} of the latent forward bound (decoder {t_dec * 1e3:.2f}ms + classifier {t_cls * 1e3:.2f}ms "
          f"per batch), so latent costs {med['robustops latent'] / t_pix:.2f}x pixel; eager and robustops latent "
          f"predictions agree on {agree}/{K} inputs (different noise)")


def main(argv=None):
    p = parser(__doc__, "perturbation.csv")
    p.add_argument("--configs", default="digits,cvae32", help="comma list of digits, cvae32")
    p.add_argument("--batch", type=int, default=None, help="PGD batch of the digits config (default 256; --small: 128)")
    p.add_argument("--batch32", type=int, default=None, help="PGD batch of the 3x32x32 config (default 256; "
                                                              "--small: 32)")
    p.add_argument("--reps", type=int, default=None, help="PGD timed rounds (default 10; --small: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed PGD calls per provider, after compilation "
                                                              "(default 2; --small: 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--traced-grad", type=int, default=None, help="1: also compile the eager step fullgraph with "
                   "torch._dynamo.config.trace_autograd_ops (default 1; --small: 0, its compilation takes ~30s per "
                   "config on 2 cores)")
    p.add_argument("--cnn-epochs", type=int, default=8, help="digits classifier training epochs")
    p.add_argument("--cvae-epochs", type=int, default=3, help="digits CVAE training epochs")
    p.add_argument("--images", type=int, default=None, help="inputs certified per provider (default 16; --small: 2)")
    p.add_argument("--N0", type=int, default=None, help="selection samples (default 100; --small: 20)")
    p.add_argument("--N", type=int, default=None, help="estimation samples (default 10000; --small: 400)")
    p.add_argument("--cert-batch", type=int, default=None, help="noisy rows per forward pass (default 1000; "
                                                                 "--small: 210)")
    p.add_argument("--cert-reps", type=int, default=None, help="certification timed rounds (default 5; --small: 5)")
    p.add_argument("--cert-warmup", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.001, help="certification failure probability")
    p.add_argument("--sigma", type=float, default=0.25, help="pixel-space noise of Smooth")
    p.add_argument("--latent-sigma", type=float, default=0.5, help="latent noise of LatentSmooth (prior std units)")
    p.add_argument("--no-certify", action="store_true", help="PGD only")
    p.add_argument("--small", action="store_true", help="CPU preset: PGD batches 128 (digits) and 32 (3x32x32), "
                   "5 rounds; certification of 2 inputs at N0 20, N 400, batch 210")
    args = p.parse_args(argv)
    preset = dict(batch=(256, 128), batch32=(256, 32), reps=(10, 5), warmup=(2, 1), traced_grad=(1, 0), images=(16, 2),
                  N0=(100, 20), N=(10000, 400), cert_batch=(1000, 210), cert_reps=(5, 5))
    for k, (full, small) in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, small if args.small else full)
    dev = args.device
    stamp = setup(args)
    bw = copy_bandwidth(dev)
    load = f"; load average {os.getloadavg()[0]:.1f}" if dev == "cpu" else ""
    print(f"device: {stamp['device']}; copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; "
          f"torch {torch.__version__}{load}")
    rows = []
    for cfg in args.configs.split(","):
        t0 = time.perf_counter()
        if cfg == "digits":
            name, (clf, cvae, x, y, how), trained = "digits_1x8x8", digits_models(args, dev), True
        elif cfg == "cvae32":
            name, (clf, cvae, x, y, how), trained = "cvae_3x32x32", cvae32_models(args, dev), False
        else:
            raise SystemExit(f"unknown config {cfg!r}: digits or cvae32")
        print(f"\n== {name}: {how} ({time.perf_counter() - t0:.1f}s)")
        run_pgd(args, name, clf, cvae, x, y, trained, bw, rows, stamp)
        if not args.no_certify:
            run_certify(args, name, clf, cvae, x, bw, rows, stamp)
    finish(args, rows)


if __name__ == "__main__":
    main()
