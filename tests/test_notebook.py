"""The quickstart notebook is executed headless so that it never rots."""

import os

import pytest

from conftest import REPO, requires_fashion_mnist


@pytest.mark.slow
@requires_fashion_mnist
def test_quickstart_notebook_runs(tmp_path):
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  os.environ["QUICKSTART_STEPS"] = "20"
  os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
  os.environ["MPLBACKEND"] = "Agg"
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "deit3_small_patch16_224: 21.7M parameters" in outputs  # 10-class head
  assert "eval top-1 after 20 steps" in outputs
