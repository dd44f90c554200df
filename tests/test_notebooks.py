"""Every notebook in notebooks/ runs top to bottom (nbclient + ipykernel) in quick mode, in a temporary working
folder shared by the session (01 trains the model that 02-04 reuse), and every figure cell draws a figure."""
from __future__ import annotations

import json
from pathlib import Path

import nbclient  # the test extra (pip install -e '.[test]'), as are nbformat and ipykernel
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

pytestmark = pytest.mark.slow  # long end-to-end runs: `make test-slow`


@pytest.fixture(scope="session")
def notebook_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_exist_and_are_stored_without_outputs():
    names = [p.stem for p in PATHS]
    assert names == ["01_train_quickstart", "02_zero_shot", "03_captioning", "04_embeddings_and_search",
                     "05_moe_routing", "06_open_clip_interop"]
    for p in PATHS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{p.name}: clear its outputs"
        assert any("figure" in c.metadata.get("tags", []) for c in code), f"{p.name}: no cell tagged figure"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, notebook_dir, monkeypatch):
    # the kernel inherits this environment: a temporary working folder, quick settings, CPU
    monkeypatch.setenv("MM_NOTEBOOK_DIR", str(notebook_dir))
    monkeypatch.setenv("MM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into PNG outputs
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    (notebook_dir / f"{path.stem}.executed.ipynb").write_text(json.dumps(nb))  # for a look after a failure
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"], f"{path.name} cell {i}"
        if "figure" in cell.metadata.get("tags", []):
            pngs = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")
                    and "image/png" in o.get("data", {})]
            assert pngs, f"{path.name} cell {i} is tagged figure but drew none:\n{cell.source}"
