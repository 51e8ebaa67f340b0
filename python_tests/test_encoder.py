"""The encoder wrapper on tiny random CLIP and SigLIP towers (no downloads): exactness at keep_ratio 1, token
counts, eager against SDPA, the slot maps, patch/unpatch, custom steps, LLaVA-style wrappers."""

import pytest
import torch
from torch import nn

import evoprune_ext  # noqa: F401  (registers torch.ops.evoprune.*)
from evoprune_ext import kept_tokens, patch, unpatch
from evoprune_ext.pruning import evoprune_step
from evoprune_ext.schedule import default_layers, schedule_keeps

transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 56, 8  # a 7 x 7 grid of patches
PATCHES = (IMAGE // PATCH) ** 2
FAMILIES = ["clip", "siglip"]
IMPLEMENTATIONS = ["eager", "sdpa"]


def tower(family="clip", attention="sdpa", layers=4, seed=0):
    """A tiny random tower; the same seed gives the same weights whatever the attention implementation."""
    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attention,
    )
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**sizes))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes))
    return model.eval()


def pixels(batch=2, seed=1, size=IMAGE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def protect(family):
    return 1 if family == "clip" else 0


def run(model, x, **kwargs):
    with torch.inference_mode():
        return model(pixel_values=x, **kwargs)


def recording(calls):
    """The default step, remembering what it was given."""

    def step(hidden, metric, importance, sizes, **kwargs):
        calls.append(dict(hidden=hidden, metric=metric, importance=importance, sizes=sizes, **kwargs))
        return evoprune_step(hidden, metric, importance, sizes, **kwargs)

    return step


# ---------------------------------------------------------------------------------------------------------
# Schedule


def test_default_layers():
    assert default_layers(24) == [1, 2, 3, 4]
    assert default_layers(27) == [1, 2, 3, 4]
    assert default_layers(6) == [1, 2, 3, 4]
    assert default_layers(4) == [1, 2]
    assert default_layers(2) == [0]
    assert default_layers(1) == [0]


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.25, 0.111, 0.01])
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_schedule_keeps_is_geometric_and_exact(keep_ratio, steps):
    keeps = schedule_keeps(577, 1, keep_ratio, steps)
    assert len(keeps) == steps
    assert keeps[-1] == kept_tokens(576, keep_ratio, 1) == 1 + round(576 * keep_ratio)
    assert keeps == sorted(keeps, reverse=True) and keeps[0] <= 577


# ---------------------------------------------------------------------------------------------------------
# Exactness and counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_keep_ratio_one_reproduces_the_unpatched_model(family, attention):
    model, x = tower(family, attention), pixels()
    expected = run(model, x)
    patch(model, keep_ratio=1.0, layers=[0, 2])
    got = run(model, x)
    # Bit for bit: a step that would keep every token is skipped (see EvoPruneState.begin).
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep_ratio", [0.9, 0.5, 0.3, 0.25, 0.1])
@pytest.mark.parametrize("layers", [None, [0], [1, 3], [0, 1, 2, 3]])
def test_exact_token_count(family, keep_ratio, layers):
    model = patch(tower(family), keep_ratio=keep_ratio, layers=layers)
    out = run(model, pixels(), output_hidden_states=True)
    expected = kept_tokens(PATCHES, keep_ratio, protect(family))
    assert out.last_hidden_state.shape == (2, expected, 32)
    state = model.evoprune_state
    assert [step.layer for step in state.steps] == (layers or default_layers(4))
    assert [step.slot.shape[1] for step in state.steps][0] == PATCHES + protect(family)
    # hidden_states[i + 1] is layer i's output: it has the count of the last step at or before layer i.
    counts = [h.shape[1] for h in out.hidden_states[1:]]
    for step in state.steps:
        assert counts[step.layer] == step.sizes.shape[1]
    assert counts[-1] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_encoder_runs_under_autocast(family):
    # Under autocast the keys (a linear's output) are bf16 while the residual stream stays float32.
    model = patch(tower(family), keep_ratio=0.25)
    expected = run(model, pixels())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(model, pixels())
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    assert torch.isfinite(got.last_hidden_state).all()
    # bf16 keys may pick other tokens at near-ties, so the values are not compared; every step ran.
    assert [step.layer for step in model.evoprune_state.steps] == default_layers(4)


def test_token_count_follows_the_input_resolution():
    model = patch(tower("clip"), keep_ratio=0.25)
    x = pixels(size=IMAGE + 2 * PATCH)  # a 9 x 9 grid
    out = run(model, x, interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape[1] == kept_tokens(81, 0.25, 1)


def test_keep_ratio_that_keeps_nothing_is_rejected():
    model = patch(tower("siglip"), keep_ratio=0.001)
    with pytest.raises(ValueError, match="keeps no patch"):
        run(model, pixels())


# ---------------------------------------------------------------------------------------------------------
# Eager against SDPA; importance inside the model


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_select_the_same_tokens(family):
    outputs, states, importances = [], [], []
    for attention in IMPLEMENTATIONS:
        calls = []
        model = patch(tower(family, attention), keep_ratio=0.3, layers=[0, 2], step=recording(calls))
        outputs.append(run(model, pixels(batch=3)))
        states.append(model.evoprune_state)
        importances.append([call["importance"] for call in calls])
    eager, sdpa = states
    for a, b in zip(eager.steps, sdpa.steps, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.slot, b.slot)
    # Layer 2 attends with log(size): the SDPA path's importance_from_qk must carry that bias as eager does.
    for a, b in zip(*importances, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outputs[0].last_hidden_state, outputs[1].last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs[0].pooler_output, outputs[1].pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_is_the_layers_attention(family):
    """The importance handed to the step is the CLS row (CLIP) or the mean of all rows (SigLIP) of the
    attention probabilities the layer outputs."""
    calls = []
    model = patch(tower(family, "eager"), keep_ratio=0.5, layers=[1], step=recording(calls))
    out = run(model, pixels(), output_attentions=True)
    attn = out.attentions[1].float()  # [B,H,N,N]
    rows = attn[:, :, :1] if family == "clip" else attn
    torch.testing.assert_close(calls[0]["importance"], rows.mean(dim=(1, 2)))
    assert calls[0]["metric"].shape == (2, PATCHES + protect(family), 8)  # keys averaged over 4 heads of 8


def test_proportional_attention_adds_log_size():
    """With proportional attention the probabilities after a merge differ; without it, they are softmax(q.k)."""
    x = pixels()
    attentions = {}
    for proportional in (True, False):
        model = patch(tower("clip", "eager"), keep_ratio=0.3, layers=[0], proportional_attention=proportional)
        attentions[proportional] = run(model, x, output_attentions=True).attentions[1]
    sizes = model.evoprune_state.sizes
    assert (sizes > 1).any()
    # Adding log(s) to every logit of a row multiplies each probability by s and renormalizes.
    reweighted = attentions[False] * sizes[:, None, None, :]
    torch.testing.assert_close(attentions[True], reweighted / reweighted.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_hidden_metric():
    calls = []
    model = patch(tower("clip"), keep_ratio=0.5, layers=[1], metric="hidden", step=recording(calls))
    run(model, pixels())
    assert calls[0]["metric"] is calls[0]["hidden"]


# ---------------------------------------------------------------------------------------------------------
# Where the tokens went


def check_slot_maps(state, batch, tokens, protect):
    composed_sizes = None
    for step in state.steps:
        keep = step.sizes.shape[1]
        slot, index = step.original_slot, step.original_index
        assert slot.shape == (batch, tokens) and index.shape == (batch, keep)
        assert ((slot >= -1) & (slot < keep)).all()
        # Kept tokens map to their own output positions; protected tokens stay first.
        assert torch.equal(slot.gather(1, index), torch.arange(keep).expand(batch, keep))
        assert torch.equal(index[:, :protect], torch.arange(protect).expand(batch, protect))
        assert (index[:, 1:] > index[:, :-1]).all()
        # With merging, each output token stands for exactly the original tokens mapped to it.
        composed_sizes = torch.zeros(batch, keep).scatter_add_(1, slot.clamp(min=0), (slot >= 0).float())
        torch.testing.assert_close(step.sizes, composed_sizes)
    assert state.slot is state.steps[-1].original_slot and state.index is state.steps[-1].original_index


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [[0], [0, 1, 2, 3], [1, 2]])
def test_composed_slot_map(family, layers):
    model = patch(tower(family), keep_ratio=0.2, layers=layers)
    run(model, pixels(batch=3))
    check_slot_maps(model.evoprune_state, 3, PATCHES + protect(family), protect(family))


def test_merge_false_drops_tokens():
    """Pure pruning: every output token is one original token; slot still names each token's most similar kept one."""
    model = patch(tower("clip"), keep_ratio=0.25, layers=[0, 2], merge=False)
    run(model, pixels())
    state = model.evoprune_state
    assert torch.equal(state.sizes, torch.ones_like(state.sizes))
    keep = state.sizes.shape[1]
    assert torch.equal(state.slot.gather(1, state.index), torch.arange(keep).expand(2, keep))


# ---------------------------------------------------------------------------------------------------------
# Batches, dtypes, modes


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_samples_one_by_one(family):
    model = patch(tower(family), keep_ratio=0.3, layers=[0, 2])
    x = pixels(batch=3)
    together = run(model, x).last_hidden_state
    slots = model.evoprune_state.slot
    for b in range(3):
        alone = run(model, x[b : b + 1]).last_hidden_state
        assert torch.equal(model.evoprune_state.slot[0], slots[b])
        torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_bfloat16(family, attention):
    model = patch(tower(family, attention).to(torch.bfloat16), keep_ratio=0.25, layers=[0, 2])
    out = run(model, pixels().to(torch.bfloat16))
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert out.last_hidden_state.shape[1] == kept_tokens(PATCHES, 0.25, protect(family))
    assert out.last_hidden_state.isfinite().all()
    check_slot_maps(model.evoprune_state, 2, PATCHES + protect(family), protect(family))


def test_works_with_autograd():
    model = patch(tower("clip"), keep_ratio=0.25, layers=[1])
    model(pixel_values=pixels()).pooler_output.sum().backward()
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------
# patch / unpatch


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_model(family):
    model, x = tower(family), pixels()
    before = {name: (type(module), set(vars(module))) for name, module in model.named_modules()}
    expected = run(model, x)
    patch(model, keep_ratio=0.25)
    assert run(model, x).last_hidden_state.shape[1] < expected.last_hidden_state.shape[1]
    assert unpatch(model) is model
    assert {name: (type(module), set(vars(module))) for name, module in model.named_modules()} == before
    got = run(model, x)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)
    unpatch(model)  # a no-op on an unpatched model


def test_patching_twice_replaces_the_first_patch():
    model = tower("clip")
    layer_class = type(model.encoder.layers[0])
    patch(model, keep_ratio=0.5, layers=[0])
    patch(model, keep_ratio=0.25, layers=[1, 2])
    assert type(model.encoder.layers[0]).__bases__[1] is layer_class  # wrapped once, not twice
    assert run(model, pixels()).last_hidden_state.shape[1] == kept_tokens(PATCHES, 0.25, 1)
    assert [step.layer for step in model.evoprune_state.steps] == [1, 2]
    unpatch(model)
    assert type(model.encoder.layers[0]) is layer_class


class LlavaLike(nn.Module):
    """A vision tower and a projector, as LLaVA wires them."""

    def __init__(self):
        super().__init__()
        self.vision_tower = tower("clip")
        self.projector = nn.Linear(32, 16)

    def forward(self, x):
        hidden = self.vision_tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        return self.projector(hidden[:, 1:])


def test_model_wrapping_a_tower():
    model = LlavaLike()
    patch(model, keep_ratio=0.25)
    assert model.evoprune_state is model.vision_tower.evoprune_state
    with torch.inference_mode():
        assert model(pixels()).shape == (2, round(PATCHES * 0.25), 16)
    unpatch(model)
    assert not hasattr(model, "evoprune_state") and not hasattr(model.vision_tower, "evoprune_state")


def test_llava():
    vision = tower("clip").config
    text = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=99)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    patch(model, keep_ratio=0.25)
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=pixels()).pooler_output
    assert [f.shape for f in features] == [(round(PATCHES * 0.25), 32)] * 2


def test_unsupported_models():
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        patch(nn.Linear(3, 3), keep_ratio=0.5)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        patch(text, keep_ratio=0.5)
    two = nn.ModuleDict({"a": tower("clip"), "b": tower("siglip")})
    with pytest.raises(TypeError, match="2 vision towers"):
        patch(two, keep_ratio=0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(keep_ratio=0.5, layers=[4]), "layers"),
        (dict(keep_ratio=0.5, layers=[]), "layers"),
        (dict(keep_ratio=0.5, alpha=2.0), "alpha"),
        (dict(keep_ratio=0.5, metric="values"), "metric"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        patch(tower("clip"), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Custom steps (how the benchmarks run other methods at the same layers)


def test_custom_step():
    seen = []

    def first_tokens(hidden, metric, importance, sizes, *, keep, protect, alpha, merge):
        seen.append((hidden.shape, metric.shape, importance.shape, sizes.shape, keep, protect, alpha, merge))
        slot = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
        return hidden[:, :keep], sizes[:, :keep], torch.where(slot < keep, slot, -1)

    model = patch(tower("siglip"), keep_ratio=0.5, layers=[0, 1], alpha=0.3, merge=False, step=first_tokens)
    out = run(model, pixels())
    keeps = schedule_keeps(PATCHES, 0, 0.5, 2)
    assert out.last_hidden_state.shape[1] == keeps[-1]
    assert seen[0] == ((2, PATCHES, 32), (2, PATCHES, 8), (2, PATCHES), (2, PATCHES), keeps[0], 0, 0.3, False)
    state = model.evoprune_state
    assert state.index is None and state.steps[0].index is None
    assert torch.equal(state.slot[0], torch.where(torch.arange(PATCHES) < keeps[-1], torch.arange(PATCHES), -1))


def test_a_step_returning_the_wrong_count_is_caught():
    def wrong(hidden, metric, importance, sizes, **kwargs):
        return hidden, sizes, torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)

    model = patch(tower("clip"), keep_ratio=0.5, layers=[0], step=wrong)
    with pytest.raises(RuntimeError, match="layer 0"):
        run(model, pixels())
