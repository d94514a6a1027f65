"""Strict host-sync budgets for the CUDA tests: torch's sync debug mode set to "error" around the code
that must not synchronize, and counted ("warn") where a budget allows some."""
import contextlib
import warnings

import torch


@contextlib.contextmanager
def sync_mode(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def forbid_syncs_in(monkeypatch, owner, name: str) -> None:
    """Every call of owner.name runs under set_sync_debug_mode("error"): a sync there raises."""
    original = getattr(owner, name)

    def strict(*args, **kwargs):
        with sync_mode("error"):
            return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, strict)


@contextlib.contextmanager
def counted_syncs():
    """Yields a list that collects the messages of the syncs (sync debug mode "warn") in the block."""
    found = []
    with warnings.catch_warnings(record=True) as caught, sync_mode("warn"):
        warnings.simplefilter("always")
        yield found
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
