"""vLLM tests: they run in .venv-vllm (`make test-vllm`); each engine runs in its own subprocess (vllm_engine.py),
with site/sitecustomize.py on its PYTHONPATH. Here the same file runs first, before anything imports torchvision."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).parent / "site" / "sitecustomize.py"))
