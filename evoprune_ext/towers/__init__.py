"""Tower plumbing, above the counts and the pruning step and below the family adapters (docs/ARCHITECTURE.md):
`vit.py` for towers with a batch of images (CLIP, SigLIP), `packed.py` for towers that pack every image and video
frame into one sequence (Qwen2.5-VL, Qwen3-VL, in transformers and in vLLM). Each defines its state and a tower
description (`ViTTower`, `PackedTower`) that an adapter fills in and `evoprune_ext.patch` drives the same way:
`recognizes(module)`, `depth(tower)`, `patch(tower, keep_ratio=, layers=, alpha=, **options) -> state`."""
