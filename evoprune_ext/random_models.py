"""Random-weight multimodal LLMs with working processors, built locally (nothing is downloaded): LLaVA-1.5
(CLIP tower), LLaVA-OneVision (SigLIP tower), Qwen2.5-VL and Qwen3-VL (and its MoE), at tiny shapes for tests or
at real shapes for the demo and the benchmarks. Their tokenizer is a word-level vocabulary made here, with the
image and video placeholders as special tokens; the generated text is meaningless, the token counts and timings
are real.
"""

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
QWEN_SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
WORDS = "USER ASSISTANT : what is in this image video describe the scene count objects left right how many".split()

# Layer sizes (transformers config arguments). The real ones are those of the published checkpoints.
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=8)
TINY_SIGLIP = TINY_CLIP
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_TEXT.update(num_key_value_heads=2, vocab_size=64)
# Qwen2.5-VL: 2-pixel patches, 2 frames per temporal patch, 2x2 merge units, windows of 2x2 units.
TINY_QWEN_VISION = dict(depth=6, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2)
TINY_QWEN_VISION.update(temporal_patch_size=2, window_size=8, fullatt_block_indexes=[2, 5])
# Qwen3-VL: no windows; learned positions on a 4 x 4 grid; deepstack after layer 0 (before every pruning step of
# the default schedule 1, 2, 3, 4) and after layer 3 (between steps), one for each layer of the tiny LM.
TINY_QWEN3_VISION = {key: value for key, value in TINY_QWEN_VISION.items()
                     if key not in ("window_size", "fullatt_block_indexes")}
TINY_QWEN3_VISION.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 3])
TINY_IMAGE = 56  # a 7 x 7 grid of 8-pixel patches
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
SIGLIP_SO400M.update(patch_size=14)
QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
QWEN2_0_5B.update(num_key_value_heads=2, vocab_size=151936)
# Qwen2.5-VL-3B / 7B's tower (depth 32, width 1280, 14-pixel patches, 112-pixel windows).
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14)
QWEN2_5_VL_VISION.update(temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, with the placeholders as special tokens (left padding, for generate)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + QWEN_SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>", "<video>", *QWEN_SPECIAL],
        padding_side="left",
    )
    return fast


def llava(*, tiny: bool = True, text: dict | None = None, attention: str = "sdpa", seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor): a CLIP tower (CLIP-L/336 unless tiny) and a Llama-shaped
    language model (`text`, default TINY_TEXT or QWEN2_0_5B's sizes), "default" strategy (CLS dropped), layer -2."""
    import torch

    image = TINY_IMAGE if tiny else 336
    vision = transformers.CLIPVisionConfig(**(TINY_CLIP if tiny else CLIP_L_336), image_size=image)
    words = tokenizer()
    language = transformers.LlamaConfig(**(text or (TINY_TEXT if tiny else QWEN2_0_5B)))
    language.pad_token_id, language.eos_token_id = words.pad_token_id, words.eos_token_id
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=language,
        image_token_id=words.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = words.pad_token_id
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
        ),
        tokenizer=words,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def llava_onevision(*, tiny: bool = True, text: dict | None = None, attention: str = "sdpa", seed: int = 0):
    """(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor or None): a SigLIP tower (so400m at 384
    unless tiny), a Qwen2-shaped language model, anyres grids up to 2 x 2 crops. The processor is None where
    torchvision does not import: transformers' video processors need it, and the processor needs one."""
    import torch

    image = TINY_IMAGE if tiny else 384
    vision = transformers.SiglipVisionConfig(**(TINY_SIGLIP if tiny else SIGLIP_SO400M), image_size=image)
    pinpoints = [[image * rows, image * columns] for rows in (1, 2) for columns in (1, 2)]
    words = tokenizer()
    language = transformers.Qwen2Config(**(text or (TINY_TEXT if tiny else QWEN2_0_5B)))
    language.pad_token_id, language.eos_token_id = words.pad_token_id, words.eos_token_id
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=language,
        image_token_index=words.convert_tokens_to_ids("<image>"),
        video_token_index=words.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = words.pad_token_id
    return model, _onevision_processor(image, vision.patch_size, pinpoints, words)


def _onevision_processor(image, patch_size, pinpoints, words):
    """transformers builds a LlavaOnevisionProcessor only where torchvision imports (for its video processor)."""
    try:
        video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": image, "width": image})
    except ImportError:
        return None
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessorPil(
            size={"height": image, "width": image}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=words,
        video_processor=video_processor,
        num_image_tokens=(image // patch_size) ** 2,
        vision_feature_select_strategy="full",
    )


def qwen2_5_vl(*, tiny: bool = True, attention: str = "sdpa", seed: int = 0, text: dict | None = None):
    """(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor or None). Tiny: a 6-block tower of 2-pixel
    patches (images of 16 to 64 pixels a side give 8 to 32 patches) and a 2-layer M-RoPE LM; otherwise
    Qwen2.5-VL-3B's tower and an LM with Qwen2-0.5B's sizes. The processor is None where torchvision does not
    import (transformers' Qwen2-VL video processor needs it). `text`: LM config arguments that replace the tiny
    or real ones (vLLM's CPU attention needs a head_dim of 32, 64, 80, ...)."""
    vision, sizes = (TINY_QWEN_VISION, TINY_TEXT) if tiny else (QWEN2_5_VL_VISION, QWEN2_0_5B)
    text = dict(sizes, **(text or {}))
    model, words = _qwen_vl(transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                            vision, text, attention=attention, seed=seed)
    return model, _qwen_vl_processor(transformers.Qwen2_5_VLProcessor, "Qwen2VLVideoProcessor", words,
                                     vision["patch_size"])


def qwen3_vl(*, attention: str = "sdpa", seed: int = 0, text: dict | None = None):
    """(Qwen3VLForConditionalGeneration, Qwen3VLProcessor or None) at a tiny shape: as `qwen2_5_vl`, with a
    6-block Qwen3-VL tower with two deepstack mergers (TINY_QWEN3_VISION). The processor is None where
    torchvision does not import (transformers' Qwen3-VL video processor needs it). `text`: LM config arguments
    that replace the tiny ones (as `qwen2_5_vl`'s)."""
    model, words = _qwen_vl(transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
                            TINY_QWEN3_VISION, dict(TINY_TEXT, **(text or {})), attention=attention, seed=seed,
                            interleaved=True)
    return model, _qwen_vl_processor(transformers.Qwen3VLProcessor, "Qwen3VLVideoProcessor", words, 2)


def qwen3_vl_moe(*, attention: str = "sdpa", seed: int = 0, text: dict | None = None):
    """(Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor or None): `qwen3_vl` with a mixture-of-experts LM
    (4 experts of width 96, 2 per token, in every layer; `norm_topk_prob`, which vLLM reads, as transformers'
    Qwen3-VL-MoE always does). The experts' widths differ from the LM's: no expert weight is square, so
    transformers' loader can tell the checkpoints' layout from its own (it transposes only non-square ones)."""
    moe = dict(TINY_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1,
               norm_topk_prob=True)
    model, words = _qwen_vl(transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration,
                            TINY_QWEN3_VISION, dict(moe, **(text or {})), attention=attention, seed=seed,
                            interleaved=True)
    return model, _qwen_vl_processor(transformers.Qwen3VLProcessor, "Qwen3VLVideoProcessor", words, 2)


def _qwen_vl(config_class, model_class, vision: dict, text: dict, *, attention: str, seed: int,
             interleaved: bool = False):
    """A Qwen-VL model of `model_class` (an M-RoPE LM of `text` sizes) and its tokenizer. `interleaved`: the
    M-RoPE layout is interleaved (Qwen3-VL's configs say so; transformers' Qwen3-VL always is, vLLM reads the key)."""
    import torch

    words = tokenizer()
    head_dim = text["hidden_size"] // text["num_attention_heads"]  # Qwen3-VL's text config defaults to 128
    pairs = head_dim // 2  # M-RoPE splits the rotary pairs over (t, h, w)
    sections = [pairs // 4, 3 * pairs // 8, pairs - pairs // 4 - 3 * pairs // 8]
    rope = {"rope_type": "default", "mrope_section": sections, "rope_theta": 1e6}
    if interleaved:
        rope["mrope_interleaved"] = True
    text = dict(text, head_dim=head_dim, rope_parameters=rope, pad_token_id=words.pad_token_id,
                eos_token_id=words.eos_token_id, bos_token_id=words.bos_token_id)
    ids = {name: words.convert_tokens_to_ids(token) for name, token in zip(
        ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), QWEN_SPECIAL)}
    config = config_class(vision_config=dict(vision, out_hidden_size=text["hidden_size"]), text_config=text, **ids)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = words.pad_token_id
    return model, words


def _qwen_vl_processor(processor_class, video_processor: str, words, patch: int):
    """Images of 8 to 32 patches a side, 2 frames per temporal patch, 2x2 units; None without torchvision."""
    pixels = dict(patch_size=patch, temporal_patch_size=2, merge_size=2,
                  size={"shortest_edge": (8 * patch) ** 2, "longest_edge": (32 * patch) ** 2})
    try:
        videos = getattr(transformers, video_processor)(**pixels)
    except ImportError:
        return None
    return processor_class(image_processor=transformers.Qwen2VLImageProcessorPil(**pixels), tokenizer=words,
                           video_processor=videos)
