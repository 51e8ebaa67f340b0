"""EvoPrune for vLLM: an out-of-tree plugin (entry point `vllm.general_plugins`: evoprune = evoprune_ext.vllm:register).

    LLM(model=DIR, hf_overrides={"architectures": ["EvoPruneQwen2_5_VLForConditionalGeneration"],
                                 "evoprune": {"keep_ratio": 0.25}})

`register()` runs in every vLLM process: it registers the pruned models by name (imported lazily, when vLLM builds
one), and lets the model runner recompute M-RoPE positions for them (docs/VLLM.md says why the runner needs telling).
"""

__all__ = ["ARCHITECTURES", "register"]

ARCHITECTURES = {
    "EvoPruneQwen2_5_VLForConditionalGeneration": "evoprune_ext.vllm.qwen2_5_vl:EvoPruneQwen2_5_VLForConditionalGeneration",
    "EvoPruneQwen3VLForConditionalGeneration": "evoprune_ext.vllm.qwen3_vl:EvoPruneQwen3VLForConditionalGeneration",
    "EvoPruneQwen3VLMoeForConditionalGeneration":
        "evoprune_ext.vllm.qwen3_vl:EvoPruneQwen3VLMoeForConditionalGeneration",
    "EvoPruneLlavaOnevisionForConditionalGeneration":
        "evoprune_ext.vllm.llava_onevision:EvoPruneLlavaOnevisionForConditionalGeneration",
}


def register() -> None:
    from vllm import ModelRegistry

    for name, path in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, path)
    _let_runners_recompute_positions()


def _let_runners_recompute_positions() -> None:
    """vLLM's runners recompute M-RoPE positions from the channels a model appends to its visual embeddings
    (`SupportsMultiModalPruning`) only when `runner.is_multimodal_pruning_enabled`, which the GPU runner derives
    from `video_pruning_rate` (EVS) and the CPU runner never sets. After loading, it is turned on for a model that
    prunes in its tower (`evoprune_prunes_positions`), and on the CPU runner as the GPU runner would (so that
    vLLM's own EVS, which crashes there otherwise, runs too: bench/bench_vllm.py compares against it)."""
    import importlib

    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    def prunes(runner) -> bool:
        model, config = runner.get_model(), runner.model_config.multimodal_config
        return getattr(model, "evoprune_prunes_positions", False) or (
            supports_multimodal_pruning(model) and config is not None and config.is_multimodal_pruning_enabled())

    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            runner = getattr(importlib.import_module(module), name)
        except ImportError:  # a platform without that runner
            continue
        load_model = runner.__dict__.get("load_model")
        if load_model is None or getattr(load_model, "_evoprune", False):
            continue

        def wrapped(self, *args, _load_model=load_model, **kwargs):
            _load_model(self, *args, **kwargs)
            if prunes(self):
                self.is_multimodal_pruning_enabled = True

        wrapped._evoprune = True
        runner.load_model = wrapped
