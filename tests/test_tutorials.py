"""Every notebook in ``tutorials/`` runs top to bottom without an error (demo model, offline).

Each notebook is executed with nbclient in a child process (its own kernel, ``HF_HUB_OFFLINE=1``),
on a copy in memory: the committed notebooks and their outputs are left as they are. A notebook
that takes longer than :data:`TIMEOUT_S` is stopped and fails (the kernel, started with
``JPY_PARENT_PID``, exits on its own when its parent process is gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
TIMEOUT_S = 900

RUNNER = """
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

path, timeout = sys.argv[1], int(sys.argv[2])
notebook = nbformat.read(path, as_version=4)
client = NotebookClient(
    notebook,
    timeout=timeout,
    kernel_name="python3",
    resources={"metadata": {"path": str(__import__("pathlib").Path(path).parent)}},
)
try:
    client.execute()
except CellExecutionError as error:
    print(error, file=sys.stderr)
    sys.exit(1)
"""


def test_tutorials_exist() -> None:
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"


@pytest.mark.demo
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(notebook: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(notebook), str(TIMEOUT_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{notebook.name} did not finish within {TIMEOUT_S} s")
    assert process.returncode == 0, f"{notebook.name} failed:\n{stderr[-6000:]}"
