"""SigLIP (LLaVA-OneVision's tower): no CLS, so no protected token, and importance is the attention each token
receives from all the others. Its attention-pooling head gets the tokens' sizes like the encoder layers do."""

from transformers.models.siglip import modeling_siglip

from evoprune_ext.towers.vit import ViTTower


class SizeAwarePoolingHead:
    """Mixed into SiglipMultiheadAttentionPoolingHead: the probe attends to merged tokens in proportion to the
    patches they stand for (log(size) added to the logits), as the patched encoder layers do."""

    def forward(self, hidden_state):
        bias = self._evoprune.attention_bias(hidden_state.dtype)
        if bias is None:
            return super().forward(hidden_state)
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        # [B,1,1,N] -> [B*heads,1,N], batch-major as nn.MultiheadAttention expects.
        mask = bias[:, 0].repeat_interleave(self.attention.num_heads, dim=0)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask, need_weights=False)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


TOWER = ViTTower(
    family="SigLIP",
    embeddings=modeling_siglip.SiglipVisionEmbeddings,
    protect=0,
    cls_importance=False,
    eager_attention=modeling_siglip.eager_attention_forward,
    head="head",
    head_mixin=SizeAwarePoolingHead,
)
