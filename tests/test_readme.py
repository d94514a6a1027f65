"""Every ```python block of README.md runs as written.

Each block is executed on its own, in a fresh namespace (so a block that uses a name it does not
define or import fails here), in a temporary working directory (blocks may write runs/..., plots),
after ``torch.manual_seed(0)`` and with one intra-op thread (the blocks are small; more threads only
contend on a shared CPU). A block whose first lines hold ``# needs: cuda`` runs only where a GPU is
present. The README's sizes are already cut down to run in seconds on a CPU.
"""
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_NEEDS = re.compile(r"^#\s*needs:\s*(\w+)", re.M)


def python_blocks(text):
    """[(line number of the block's first code line, code)] for every ```python block of text."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def needs(code):
    """The requirements a block declares with '# needs: X' comment lines."""
    return set(_NEEDS.findall(code))


with open(README, encoding="utf-8") as f:
    BLOCKS = python_blocks(f.read())


def test_blocks_found():
    assert len(BLOCKS) >= 8, "README.md's ```python blocks were not found"
    assert python_blocks("x\n```python\na = 1\n```\n") == [(3, "a = 1\n")]
    assert needs("# needs: cuda\nimport torch\n") == {"cuda"}


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    unknown = needs(code) - {"cuda"}
    assert not unknown, f"README.md:{line}: unknown '# needs:' {sorted(unknown)} (known: cuda)"
    if "cuda" in needs(code) and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        # padded so that a traceback's line numbers are README.md's
        exec(compile("\n" * (line - 1) + code, README, "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
