"""vLLM tests: they run in .venv-vllm (`make test-vllm`); each engine runs in its own subprocess (vllm_engine.py),
with .ci/vllm-site/sitecustomize.py on its PYTHONPATH. Here the same file runs first, before anything imports
torchvision."""

import runpy

from vllm_engine import SITE

runpy.run_path(str(SITE / "sitecustomize.py"))
