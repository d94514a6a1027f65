"""The per-input rows of `robustops attack` and `robustops evaluate`: their columns, the TSV, and the one
batched, torchrun-sharded, resumable loop that attacks the inputs and writes a row per input as it
goes (the shared results file of rows.py)."""
from __future__ import annotations

from typing import Callable, List, Sequence

from .common import CLIError, agree, exclusive, write_summary
from .rows import ResultsFile, RowWriter

__all__ = ["RESULT_COLUMNS", "result_rows", "save_results", "results_file", "batches", "grid_batches",
           "evaluate_rows", "stats", "columns_for", "describe", "suite_report", "claim", "finish", "jstm_attacks"]

#: Columns of the per-input TSV, in order (target only for targeted attacks, attack only for suites,
#: queries when Square runs, distance when FAB or the IWD attack runs).
RESULT_COLUMNS = ("index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct", "success",
                  "success_step", "restart", "linf", "l2", "latent_l2", "target", "attack", "queries", "distance")

_PARSE = {"linf": float, "l2": float, "latent_l2": float, "attack": str, "distance": float}


def result_rows(samples: dict) -> list:
    """robust_accuracy's per-sample tensors as a list of row dicts (TSV-ready values)."""
    cols = [c for c in RESULT_COLUMNS if c in samples]
    data = [samples[c].tolist() for c in cols]
    rows = []
    for vals in zip(*data):
        row = {}
        for c, v in zip(cols, vals):
            row[c] = int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)
        rows.append(row)
    return rows


def save_results(path: str, samples_or_rows) -> str:
    """Writes per-sample results (robust_accuracy's "samples" dict, or a list of row dicts) as a TSV
    sorted by index, with a header line, atomically (a robustops.cli.rows.ResultsFile). Returns path."""
    rows = result_rows(samples_or_rows) if isinstance(samples_or_rows, dict) else list(samples_or_rows)
    rows.sort(key=lambda r: int(r["index"]))
    cols = [c for c in RESULT_COLUMNS if rows and c in rows[0]] or list(RESULT_COLUMNS[:-3])
    ResultsFile(path, "\t".join(cols)).write("\t".join("" if r[c] is None else str(r[c]) for c in cols) for r in rows)
    return path


def results_file(path: str, columns) -> ResultsFile:
    """The per-input TSV at path with these columns, as the shared results file (rows, lock, resume)."""
    return ResultsFile(path, "\t".join(columns), [_PARSE.get(c, int) for c in columns[1:]])


def batches(dataset, todo: list, size: int):
    """(x, y, indices) batches of at most size inputs of dataset, each of consecutive indices (its random
    starts are then keyed by each input's global index)."""
    import torch
    from torch.utils.data import default_collate

    run: list = []
    for i in todo + [None]:
        if run and (i is None or i != run[-1] + 1 or len(run) == size):
            x, y = default_collate([dataset[j][:2] for j in run])
            yield x, torch.as_tensor(y), torch.tensor(run)
            run = []
        if i is not None:
            run.append(i)


def grid_batches(stop: int, done: set, size: int) -> List[range]:
    """The batches [k * size, (k + 1) * size) of inputs 0 .. stop - 1 that still have an input to do: a
    suite attacks each whole, so that its rows depend only on the batch's inputs (its later attacks
    draw their random numbers for the batch's survivors), never on the processes or a resume."""
    out = []
    for start in range(0, stop, size):
        r = range(start, min(start + size, stop))
        if any(i not in done for i in r):
            out.append(r)
    return out


def _gather(d, rows, seconds: float):
    """Rank 0 receives every rank's rows and the slowest rank's seconds."""
    import torch.distributed as dist

    gathered = [None] * d.world if d.rank == 0 else None
    dist.gather_object((rows, seconds), gathered, dst=0)
    if d.rank != 0:
        return rows, seconds
    return [r for part_rows, _ in gathered for r in part_rows], max(t for _, t in gathered)


def _share(d, dataset, stop: int, done: set, size: int, grid: bool):
    """(this rank's batches, its number of new rows): a contiguous share of what is left to do."""
    if grid:
        todo = grid_batches(stop, done, size)
        share = -(-len(todo) // d.world)
        mine = todo[d.rank * share:(d.rank + 1) * share]
        return batches(dataset, [i for r in mine for i in r], size), sum(i not in done for r in mine for i in r)
    todo = [i for i in range(stop) if i not in done]
    share = -(-len(todo) // d.world)
    mine = todo[d.rank * share:(d.rank + 1) * share]
    return batches(dataset, mine, size), len(mine)


def evaluate_rows(d, dataset, stop: int, make_attacks: Callable[[], list], names: Sequence[str], *, batch_size: int,
                  progress: bool, command: str, results=None, grid: bool = False):
    """(rows, [n, clean, robust, seconds, robust after each attack...]) on rank 0, over inputs 0 .. stop - 1:
    this rank's contiguous share of the inputs still to do is attacked a batch at a time with the attacks
    make_attacks() returns (a suite when several, each on what the earlier ones left robust), its rows
    appended to its part file of results (when given, else gathered), rank 0 merging them. grid: the
    batches lie on a fixed grid of indices (suites: see grid_batches)."""
    import time

    from .. import attacks
    from .. import data as rodata

    done = results.done() if results is not None else set()
    d.barrier()  # everyone has read the part files before any is truncated
    mine, total = _share(d, rodata.IndexedDataset(dataset), stop, done, batch_size, grid)
    try:
        chosen = make_attacks()
        attacks.suites.refuse_videos(names, dataset, "+".join(names))
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    out = results.open_part(d.rank) if results is not None else None
    writer = RowWriter(out, total, "+".join(names), progress and d.rank == 0, lines=command if d.rank == 0 else None)
    rows, t0 = [], time.perf_counter()
    try:
        for batch in mine:
            res = attacks.robust_accuracy(None, [batch], chosen if len(chosen) > 1 else chosen[0], device=d.device,
                                          progress=False)
            part = [row for row in result_rows(res["samples"]) if int(row["index"]) not in done]
            for row in part:
                if len(names) > 1:
                    row["attack"] = names[int(row["attack"])]
                if out is not None:
                    writer.write("\t".join(str(row[c]) for c in results.header.split("\t")))
            rows += part
            writer.tick(len(part))
    finally:
        writer.close()
        if out is not None:
            out.close()
    seconds = time.perf_counter() - t0
    if d.distributed:
        rows, seconds = _gather(d, rows, seconds)
    d.barrier()
    if d.rank == 0 and results is not None:
        header = results.header.split("\t")
        rows = [dict(zip(header, line.split("\t"))) for line in results.merge()]
    return rows, stats(rows, names, seconds)


def stats(rows, names, seconds: float) -> list:
    """[n, clean, robust, seconds, robust after each attack of a suite...] of rows (TSV fields or values)."""
    out = [len(rows), sum(int(r["clean_correct"]) for r in rows), sum(int(r["robust_correct"]) for r in rows),
           seconds]
    if len(names) > 1:  # robust after attack k: robust in the end, or broken only by a later attack
        pos = {name: k for k, name in enumerate(names)}
        out += [sum(int(r["robust_correct"]) or int(int(r["clean_correct"]) and pos[r["attack"]] > k) for r in rows)
                for k in range(len(names))]
    return out


def columns_for(names: Sequence[str], latent: bool = False) -> list:
    """The TSV's columns for these attacks (one, or a suite's in order)."""
    extra = {"latent_l2": latent, "target": False, "attack": len(names) > 1,  # targets: chosen inside the attacks
             "queries": "square" in names, "distance": any(n.startswith("fab") or n == "iwd" for n in names)}
    return [c for c in RESULT_COLUMNS if extra.get(c, True)]


def describe(names: Sequence[str], steps: Callable[[str], int], n_queries: int) -> str:
    """The attacks and their budgets in one line ("APGD-CE-100 + APGD-T-100 + FAB-T-100 + Square-5000q")."""
    from ..attacks.suites import LABELS

    label = {**LABELS, "fgsm": "FGSM"}
    return " + ".join("FGSM" if n == "fgsm" else f"Square-{n_queries}q" if n == "square" else f"{label[n]}-{steps(n)}"
                      for n in names)


def suite_report(names: Sequence[str], run_stats: list, threshold: float = 0.05) -> tuple:
    """(stages, warnings) of a suite's stats (evaluate_rows'), printed as AutoAttack's log: the robust
    accuracy after each attack and the masking check (robustops.attacks.suites). ([], []) for one attack."""
    from ..attacks.suites import masking_warnings, stages

    if len(names) < 2:
        return [], []
    n, clean = run_stats[0], run_stats[1]
    after = run_stats[4:4 + len(names)]
    rows, warnings = stages(names, n, clean, after), masking_warnings(names, clean, after, threshold)
    print("robust accuracy after each attack: " + ", ".join(f"{r['label']} {r['robust_acc']:.4f} (-{r['broken']})"
                                                          for r in rows))
    for w in warnings:
        print(f"warning: {w}")
    return rows, warnings


def claim(d, stack, out, final, settings: dict, command: str, *, resume: bool, force: bool) -> None:
    """Rank 0 takes out's lock (held until stack closes) and prepares the results file final for a fresh,
    resumed or forced run (ResultsFile.prepare); every rank then fails together on its error."""
    import os

    error = None
    if d.rank == 0 and out:
        try:
            stack.enter_context(exclusive(out + ".lock", f"--out {out}"))
            if final is not None:
                final.prepare(settings, resume=resume, force=force, command=command, other_kind=lambda old, new: None)
            elif os.path.exists(out) and not force:
                raise CLIError(f"--out {out} already exists; --force replaces it")
        except CLIError as e:
            error = str(e)
    agree(d, error)


def finish(results, final, record: dict) -> str:
    """The run's summary (record, and the settings a --resume checks) written beside the rows; a --force
    run's files then replace the old result. Returns the summary's path."""
    import json

    with open(results.settings_path) as fh:
        stored = json.load(fh)
    write_summary(results.settings_path, {**record, **stored})
    if results is not final:
        results.replace(final)
    return final.settings_path


def jstm_attacks(model, flow: str, eps: float, eps_z: float, *, steps: int = 20, restarts: int = 1, seed: int = 0,
                 mean=None, std=None, dtype=None, device="cpu") -> list:
    """[the joint-space attack] for ``evaluate --threat jstm --flow CKPT --eps-z E --eps E`` (a
    ``make_attacks`` of :func:`evaluate_rows`, names ["jstm"]): ``attacks.JSTMAttack`` on model with the
    flow of checkpoint ``flow`` (``perturbation train --kind flow``), the pixel budget eps and the latent
    budget eps_z (L-inf both); CLIError naming --flow / --eps-z when they do not fit."""
    from ..attacks import JSTMAttack
    from .. import perturbation
    from ..perturbation.protocol import check_flow

    if not (eps_z >= 0.0 and eps_z < float("inf")):
        raise CLIError(f"--eps-z must be a finite number >= 0, got {eps_z}")
    try:
        net = perturbation.frozen_model(flow, device, check=check_flow)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise CLIError(f"--flow {flow!r}: {e}") from None
    return [JSTMAttack(model, net, eps=eps, eps_z=eps_z, steps=steps, restarts=restarts, seed=seed, mean=mean,
                       std=std, dtype=dtype)]
