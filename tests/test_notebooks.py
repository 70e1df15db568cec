"""The teaching notebooks run top to bottom on a fresh kernel without error.

Each notebook is executed with nbclient on the ``python3`` kernel of this
interpreter (jupyter_client starts ``sys.executable -m ipykernel_launcher`` for a
kernelspec whose argv starts with ``python``, and ipykernel is installed in the
venv). The shared `small_cohort` fixture is handed to the notebooks through
``NHB_NB_COHORT`` so that they do not synthesise it again. Notebooks are
committed without outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def test_notebooks_present_and_clean():
    import nbformat

    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_"):
        assert any(n.startswith(prefix) for n in names), f"missing notebook {prefix}*"
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{p.name} is committed with outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, small_cohort, tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    ksm = KernelSpecManager()
    spec = ksm.get_kernel_spec("python3")
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.skip(f"the python3 kernel does not run this interpreter ({spec.argv[0]}): register it with "
                    f"`{sys.executable} -m ipykernel install --sys-prefix`")
    monkeypatch.setenv("NHB_NB_COHORT", str(Path(small_cohort).parent))
    monkeypatch.setenv("NHB_NB_THREADS", os.environ.get("NHB_NB_THREADS", "2"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
