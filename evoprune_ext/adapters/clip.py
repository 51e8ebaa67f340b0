"""CLIP (LLaVA-1.5's tower): the CLS token is protected and its attention row measures importance."""

from transformers.models.clip import modeling_clip

from evoprune_ext.towers.vit import ViTTower

TOWER = ViTTower(
    family="CLIP",
    embeddings=modeling_clip.CLIPVisionEmbeddings,
    protect=1,
    cls_importance=True,
    eager_attention=modeling_clip.eager_attention_forward,
)
