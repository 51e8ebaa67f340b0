"""What vLLM's Qwen2.5-VL and Qwen3-VL plugins share (`qwen2_5_vl.py`, `qwen3_vl.py`): the options, a tower block
with a pruning step after its attention (both towers' blocks use vLLM's `Qwen2_5_VisionAttention`), the M-RoPE
positions of a prompt whose visual blocks hold the kept counts, and the model side (`EvoPruneQwenVL`): the tower's
output split per image or video with each kept unit's position appended (t, h, w relative to its block, and the
block's extent), which `recompute_mrope_positions` strips off again.

The positions travel in the embeddings' dtype, and bfloat16 holds integers exactly only up to 256 (EVS's channels
round above it: a 5-minute video at 2 fps puts the text after it one position off). So each value goes as two
digits in base 256, `value // 256` and `value % 256`, exact in bfloat16 and float16 up to 65535: 8 channels."""

import itertools

import numpy as np
import torch
from torch import Tensor, nn
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.vision import get_load_balance_assignment

from evoprune_ext.schedule import MERGE, check_budget, item_units
from evoprune_ext.towers.packed import PackedTower, Units, prune_after_attention

__all__ = ["EvoPruneQwenVL", "encode_positions", "evoprune_options", "split_positions"]

POSITION_BASE = 256  # every integer below it is exact in bfloat16
POSITION_VALUES = 4  # per kept unit: t, h, w relative to its block, the block's extent
POSITION_CHANNELS = 2 * POSITION_VALUES  # appended to each kept unit's features: the values' two digits


def evoprune_options(config) -> dict:
    """The "evoprune" entry of the model's hf_overrides: keep_ratio (required), layers, alpha, budget ("frame", the
    default, or "clip": `evoprune_ext.patch`'s options)."""
    options = dict(getattr(config, "evoprune", None) or {})
    if "keep_ratio" not in options:
        raise ValueError('EvoPrune models need hf_overrides={"evoprune": {"keep_ratio": ...}}')
    unknown = set(options) - {"keep_ratio", "layers", "alpha", "budget"}
    if unknown:
        raise ValueError(f'hf_overrides["evoprune"]: unknown options {sorted(unknown)}; expected keep_ratio, layers, '
                         'alpha, budget')
    options.setdefault("budget", "frame")
    check_budget(options["budget"])
    return options


def _rotary(block):
    """vLLM's vision rotary embedding (neox style on half-width cos, sin) as `apply_rotary(q, k, cos, sin)`."""
    def apply(queries, keys, cos, sin):
        rotated = block.attn.apply_rotary_emb(torch.stack([queries, keys]).contiguous(), cos, sin)
        return rotated.unbind(0)
    return apply


def _all_heads(ranks: int):
    """Under tensor parallelism each of `ranks` ranks holds as many of the tower's heads (the qkv projection is
    split by heads; the hidden states are whole on every rank, after the row-parallel projection's all-reduce): the
    mean over all heads is the mean of the ranks' means over theirs. One all-reduce of [units, head_dim + 1]
    float32 per pruning step, and every rank holds the same values, so the deterministic selection keeps the same
    units everywhere. None on one rank (or a tower run whole per rank, mm_encoder_tp_mode="data")."""
    if ranks == 1:
        return None
    return lambda mean: tensor_model_parallel_all_reduce(mean) / ranks


def _block_then_prune(block, hidden: Tensor, units: Units, keep: list[int], alpha: float, carried: list[Tensor],
                      **attention) -> tuple[Tensor, Units, list[Tensor]]:
    """A vLLM vision block (`attn(norm1(x))`, then `mlp(norm2(x))`, each added to the residual) with a pruning step
    between its attention and its MLP; hidden is [tokens, 1, D]. `carried`: earlier hidden states of the same
    units (Qwen3-VL's deepstack inputs), pruned the same way. Returns (hidden, the units left, carried)."""
    captured = []
    hook = block.attn.qkv.register_forward_hook(lambda module, args, output: captured.append(output[0].detach()))
    cos, sin = units.position_embeddings
    try:
        attended = block.attn(block.norm1(hidden), rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)
    finally:
        hook.remove()
    heads, head_dim = block.attn.num_attention_heads_per_partition, block.attn.hidden_size_per_attention_head
    queries, keys, _ = captured[0].reshape(hidden.shape[0], 3, heads, head_dim).unbind(1)
    hidden, units, carried = prune_after_attention(
        (hidden + attended)[:, 0], queries, keys, units, keep, alpha, _rotary(block), head_dim**-0.5, carried,
        all_heads=_all_heads(block.attn.tp_size),
    )
    hidden = hidden[:, None]
    return hidden + block.mlp(block.norm2(hidden)), units, carried


def _attention_metadata(tower, cu_seqlens: Tensor) -> dict:
    """What vLLM's encoder attention needs of segments `cu_seqlens` (as prepare_encoder_metadata builds it)."""
    offsets = cu_seqlens.cpu().numpy()
    return dict(
        cu_seqlens=MMEncoderAttention.maybe_recompute_cu_seqlens(
            tower.attn_backend, offsets, tower.hidden_size, tower.tp_size, tower.device,
            fp8_padded_hidden_size=tower.fp8_padded_hidden_size,
        ),
        max_seqlen=torch.tensor(MMEncoderAttention.compute_max_seqlen(tower.attn_backend, offsets), dtype=torch.int32),
        sequence_lengths=MMEncoderAttention.maybe_compute_seq_lens(tower.attn_backend, offsets, tower.device),
    )


def _grid_positions(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """[3, t*h*w]: (t, h, w) of each unit of a grid of merge units, t scaled as get_mrope_input_positions does."""
    positions = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        positions[0] = (positions[0] * t_factor).astype(np.int64)
    return positions


def _kept_positions(grid: list[int], kept: Tensor, t_factor: float) -> Tensor:
    """[kept, 4]: the M-RoPE (t, h, w) of each kept unit relative to its block's start, as vLLM's
    get_mrope_input_positions gives it unpruned, and the full grid's extent (where the text after it resumes)."""
    t, h, w = grid
    positions = _grid_positions(t, h // MERGE, w // MERGE, t_factor)
    extent = positions.max() + 1
    positions = torch.from_numpy(positions)[:, kept.cpu()]
    return torch.cat([positions, torch.full_like(positions[:1], extent)]).T


def encode_positions(positions: Tensor, dtype: torch.dtype) -> Tensor:
    """[units, 4] integer positions -> [units, 8] channels of `dtype`: the high digits, then the low ones."""
    if positions.numel() and int(positions.max()) >= POSITION_BASE**2:
        raise ValueError(f"M-RoPE positions within a visual block must stay below {POSITION_BASE**2}, "
                         f"got {int(positions.max())}")
    return torch.cat([positions // POSITION_BASE, positions % POSITION_BASE], dim=1).to(dtype)


def split_positions(embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """An item's rows with positions appended -> (the features, [units, 4] int64 positions)."""
    digits = embeddings[:, -POSITION_CHANNELS:].long()
    return embeddings[:, :-POSITION_CHANNELS], digits[:, :POSITION_VALUES] * POSITION_BASE + digits[:, POSITION_VALUES:]


def _mrope_positions(length: int, blocks, keep_ratio: float, budget: str,
                     counts: list[int] | None = None) -> tuple[Tensor, int]:
    """vLLM's M-RoPE positions of a prompt of `length` tokens whose visual blocks hold the pruned counts, and the
    delta of the tokens after it. `blocks`: (offset of the first placeholder, t, h, w in merge units, t_factor) of
    each block in prompt order; a block holds `schedule.item_units(t, h * w, keep_ratio, budget)` placeholders,
    or `counts[i]` where given (Qwen3-VL's frames under the clip budget, before the tower).
    The first units of each frame (of the block, under the clip budget) stand in until the runner recomputes the
    kept ones; text resumes after the full grid, as unpruned."""
    pieces, start, position = [], 0, 0
    for i, (offset, t, h, w, t_factor) in enumerate(blocks):
        text = offset - start
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + position)
        count = item_units(t, h * w, keep_ratio, budget) if counts is None else counts[i]
        grid = _grid_positions(t, h, w, t_factor)
        frames = 1 if budget == "clip" else t
        pieces.append(grid.reshape(3, frames, -1)[:, :, : count // frames].reshape(3, -1) + position + text)
        position += text + grid.max() + 1
        start = offset + count
    text = length - start
    pieces.append(np.broadcast_to(np.arange(text), (3, text)) + position)
    positions = np.concatenate(pieces, axis=1)
    return torch.from_numpy(positions), int(positions.max() + 1 - length)


class EvoPruneQwenVL:
    """Mixed into vLLM's Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration: the tower's output
    per image or video, each kept unit with its position appended (`_evoprune_embeds`, from the family's
    `_process_*_input`)."""

    evoprune_prunes_positions = True  # the runner must recompute M-RoPE positions (evoprune_ext.vllm)

    def _evoprune_patch(self, tower: PackedTower) -> None:
        """Patch the tower (vLLM's, described by `tower`) with the options of hf_overrides["evoprune"]."""
        options = evoprune_options(self.config)
        if get_pp_group().world_size > 1:
            raise ValueError(
                "EvoPrune does not run with pipeline_parallel_size > 1: vLLM recomputes the kept units' M-RoPE "
                "positions on the first pipeline stage only (where the encoder runs), so the later stages would "
                "attend with stand-in positions. Use tensor_parallel_size (with mm_encoder_tp_mode='data' for the "
                "tower, if you like) instead"
            )
        tower.patch(self.visual, keep_ratio=options["keep_ratio"], layers=options.get("layers"),
                    alpha=options.get("alpha"), budget=options["budget"])
        # embed_multimodal appends positions (our _process_*_input) and recompute_mrope_positions strips them.
        self.is_multimodal_pruning_enabled = True

    def _postprocess_image_embeds_evs(self, embeds, image_input):
        return embeds  # positions were appended by _process_image_input

    def _postprocess_video_embeds_evs(self, embeds, video_input):
        return embeds

    def _evoprune_embeds(self, modality: str, inputs, t_factors: list[float]) -> tuple[Tensor, ...]:
        if inputs["type"] != f"pixel_values{'_videos' if modality == 'video' else ''}":
            raise NotImplementedError(f"EvoPrune prunes inside the tower: {modality} embeddings cannot be pruned")
        grid = inputs[f"{modality}_grid_thw"].tolist()
        pixels = inputs["pixel_values_videos" if modality == "video" else "pixel_values"]
        if self.use_data_parallel:
            return self._evoprune_sharded(pixels, grid, t_factors)
        return self._evoprune_items(pixels, grid, t_factors)

    def _evoprune_items(self, pixels: Tensor, grid: list[list[int]], t_factors: list[float]) -> tuple[Tensor, ...]:
        """The tower on these items: each item's kept units, their positions appended."""
        embeds = self.visual(pixels, grid_thw=grid)
        kept = self.visual.evoprune_state.kept
        return tuple(
            torch.cat([rows, encode_positions(_kept_positions(size, units, factor), rows.dtype)], dim=1)
            for rows, size, units, factor in zip(embeds.split([len(u) for u in kept]), grid, kept, t_factors)
        )

    def _evoprune_sharded(self, pixels: Tensor, grid: list[list[int]], t_factors: list[float]) -> tuple[Tensor, ...]:
        """mm_encoder_tp_mode="data": `_evoprune_items` on each rank for its share of the items (vLLM's assignment,
        balanced by patches), then gathered. vLLM's `run_dp_sharded_mrope_vision_model` does the same but cuts the
        gathered rows by unpruned counts; an item's kept count is as static (`schedule.item_units`),
        so every rank knows where each item's rows lie, and the positions travel with them."""
        ranks, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        patches = [t * h * w for t, h, w in grid]
        order, counts, _ = get_load_balance_assignment(patches, ranks)
        bounds = [0, *itertools.accumulate(counts)]
        shares = [order[start:end] for start, end in zip(bounds, bounds[1:])]
        state = self.visual.evoprune_state
        rows = [item_units(t, (h // MERGE) * (w // MERGE), state.keep_ratio, state.budget) for t, h, w in grid]
        first = [0, *itertools.accumulate(patches)]
        mine = shares[rank]
        if mine:
            local = torch.cat(self._evoprune_items(torch.cat([pixels[first[i] : first[i + 1]] for i in mine]),
                                                   [grid[i] for i in mine], [t_factors[i] for i in mine]))
        else:  # more ranks than items
            local = pixels.new_empty((0, self.visual.out_hidden_size + POSITION_CHANNELS), dtype=self.visual.dtype)
        # all_gather takes equal shapes: every rank pads to the longest share.
        longest = max(sum(rows[i] for i in share) for share in shares)
        gathered = tensor_model_parallel_all_gather(nn.functional.pad(local, (0, 0, 0, longest - len(local))), dim=0)
        items = [None] * len(grid)
        for share, block in zip(shares, gathered.split(longest)):
            offsets = [0, *itertools.accumulate(rows[i] for i in share)]
            for i, start, end in zip(share, offsets, offsets[1:]):
                items[i] = block[start:end]
        return tuple(items)
