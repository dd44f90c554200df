"""Every notebook in notebooks/ is stored with the outputs of a full run of its code (`make notebooks`), and runs top
to bottom (nbclient + ipykernel) in quick mode, in a temporary working folder shared by the session (01 trains the
model that 02-04 reuse), every figure cell drawing a figure."""
from __future__ import annotations

import json
from pathlib import Path

import nbclient  # the test extra (pip install -e '.[test]'), as are nbformat and ipykernel
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))



@pytest.fixture(scope="session")
def notebook_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_are_stored_with_the_outputs_of_a_full_run_of_their_code():
    """Opened without running them (on a code host), the notebooks show their outputs and figures: each was
    executed in full mode by `make notebooks` (notebooks/refresh.py stamps it), no code cell was edited after
    (the stamped hash of the code cells' sources), every code cell ran and every figure cell holds a PNG."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh", NOTEBOOKS / "refresh.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    names = [p.stem for p in PATHS]
    assert names == ["01_train_quickstart", "02_zero_shot", "03_captioning", "04_embeddings_and_search",
                     "05_moe_routing", "06_open_clip_interop", "07_siglip2_grounding", "08_retrieval_captioning"]
    for p in PATHS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        stamp = nb.metadata.get("mm", {})
        assert stamp.get("mode") == "full", f"{p.name}: not stored from a full run (make notebooks)"
        raw = json.loads(p.read_text())
        assert stamp["sources_sha256"] == refresh.sources_sha256(raw), f"{p.name}: code edited after its run"
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{p.name}: not run top to bottom in one kernel: {counts}"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{p.name}: an error output"
        figures = [c for c in code if "figure" in c.metadata.get("tags", [])]
        assert figures, f"{p.name}: no cell tagged figure"
        for c in figures:
            pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
            assert pngs, f"{p.name}: figure cell without its picture:\n{c.source}"
        assert p.stat().st_size < 1_500_000, f"{p.name}: {p.stat().st_size / 1e6:.1f} MB; keep figures small"


@pytest.mark.slow  # long end-to-end runs: `make test-slow`
@pytest.mark.xdist_group("notebooks")  # one process runs them in order: 01's model serves 02-04 and 08
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
