import os

import pytest
import torch

# Under pytest-xdist (`make test` runs `-n $(PYTEST_WORKERS)`) each worker is a process of its own: the
# cores are shared among the workers, so each worker's torch gets its share of them as its default
# thread count (tests that need another count set it themselves). Two workers on two cores with two
# torch threads each would oversubscribe the cores, and the OpenMP threads of one would spin-wait on
# the other's.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if os.environ.get("PYTEST_XDIST_WORKER") and _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA as a parameter marked `cuda`, skipped where no GPU is present."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="session")
def digits_flow():
    """A small normalising flow (robustops.perturbation.Flow: depth 2, hidden 16) trained for 2 epochs on
    512 training digits, in eval mode: for the tests of what uses a flow (the joint-space attack). Skipped
    where normflows is missing. About a second on a CPU."""
    pytest.importorskip("normflows")
    from torch.utils.data import DataLoader, TensorDataset

    import robustops.perturbation as P
    from robustops.data import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin-wait on shared cores
    try:
        torch.manual_seed(0)
        flow = P.Flow(depth=2, hidden=16, bins=17)
        x = load_digits("train").tensors[0][:512]
        P.fit_perturbation(flow, DataLoader(TensorDataset(x), batch_size=64, shuffle=True), epochs=2, lr=5e-3,
                           progress=False, seed=0)
    finally:
        torch.set_num_threads(threads)
    return flow.eval()


@pytest.fixture(scope="session")
def digits_flow_path(digits_flow, tmp_path_factory):
    """digits_flow saved as a checkpoint (``save_perturbation_model``; ``load_perturbation_model`` or a CLI
    flag that takes a flow checkpoint reads it back)."""
    import robustops.perturbation as P

    return P.save_perturbation_model(str(tmp_path_factory.mktemp("flow") / "flow.pt"), digits_flow, data="digits")
