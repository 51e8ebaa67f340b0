"""Serving on several ranks (vLLM's CPU build, 2 ranks, float32, greedy): for Qwen2.5-VL and Qwen3-VL, image
and video requests give the same prompt, the same tokens and the same top-3 logprobs (within 1e-4) with two ranks
as with one (both under the clip budget), whether the tower is split by heads (tensor_parallel_size=2) or
runs whole on each rank on its share of the items (mm_encoder_tp_mode="data"); vLLM's own model is the control,
held to the same bar (opt-in: vllm_engine.control). Pipeline parallelism is refused. One engine at a time, each
in a subprocess (vllm_engine.py); the one-rank runs are shared by a family's tests."""

import subprocess

import pytest
from vllm_engine import (IMAGE, TWO_RANKS, VIDEO, assert_same, control, request, run_engine, save_tiny_model,
                         visual_blocks)

from evoprune_ext import random_models

# (builder, architecture, budget): both run the clip budget here, at no extra engine: its towers run the frame
# budget's collectives, and Qwen3-VL's model writes each video's whole span (timestamps, frames) after the tower,
# on every rank, from the units gathered (mm_encoder_tp_mode="data"). The frame budget is served on one rank in
# test_vllm_qwen2_5_vl.py and test_vllm_qwen3_vl.py.
FAMILIES = {
    "qwen2_5_vl": (random_models.qwen2_5_vl, "EvoPruneQwen2_5_VLForConditionalGeneration", "clip"),
    "qwen3_vl": (random_models.qwen3_vl, "EvoPruneQwen3VLForConditionalGeneration", "clip"),
}
# Several items per request, of different sizes, so that the data-parallel tower shares them out over both ranks.
REQUESTS = [
    request(f"USER : {IMAGE} what is in this image ASSISTANT :", images=1),
    request(f"USER : {IMAGE} {IMAGE} what is in this image ASSISTANT :", images=2, seed=1),
    request(f"USER : {VIDEO} {VIDEO} what is in this video ASSISTANT :", videos=2, seed=2),
]
KEEP_RATIO = 0.5


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple:
    builder, architecture, budget = FAMILIES[request.param]
    return save_tiny_model(tmp_path_factory, builder), architecture, budget


def generate(tmp_path_factory, family, *, pruned: bool, **engine) -> list[dict]:
    model_dir, architecture, budget = family
    return run_engine(tmp_path_factory.mktemp("run"), model=model_dir, requests=REQUESTS, dtype="float32",
                      architecture=architecture if pruned else None, keep_ratio=KEEP_RATIO if pruned else None,
                      max_tokens=6, logprobs=3, engine=engine, budget=budget)


@pytest.fixture(scope="module")
def one_rank(family, tmp_path_factory) -> dict:
    """{pruned: results on one rank}: vLLM's own model (False) and EvoPrune's (True)."""
    return {pruned: generate(tmp_path_factory, family, pruned=pruned) for pruned in (False, True)}


@control
def test_vllm_own_model_two_ranks_as_one(family, one_rank, tmp_path_factory):
    assert_same(generate(tmp_path_factory, family, pruned=False, **TWO_RANKS), one_rank[False])


def test_evoprune_tensor_parallel_as_one_rank(family, one_rank, tmp_path_factory):
    """Each rank holds half the tower's heads; the step sums importance and keys over all of them, so both ranks
    keep the same units (otherwise the row-parallel projection after the step adds rows of different units)."""
    one = one_rank[True]
    assert [visual_blocks(r["prompt"]) for r in one] != [visual_blocks(r["prompt"]) for r in one_rank[False]]
    assert_same(generate(tmp_path_factory, family, pruned=True, **TWO_RANKS), one)


def test_evoprune_data_parallel_encoder_as_one_rank(family, one_rank, tmp_path_factory):
    """Each rank runs the whole tower on its share of the items (a rank may get none: a lone image) and the kept
    units are gathered, positions with them."""
    data = generate(tmp_path_factory, family, pruned=True, mm_encoder_tp_mode="data", **TWO_RANKS)
    assert_same(data, one_rank[True])


def test_pipeline_parallelism_is_refused(tmp_path_factory, capfd):
    """The later pipeline stages never see the kept units' positions (vLLM recomputes them on the first stage
    only): the model refuses to load, saying what to use instead."""
    model_dir, architecture = save_tiny_model(tmp_path_factory, random_models.qwen2_5_vl), FAMILIES["qwen2_5_vl"][1]
    with pytest.raises(subprocess.CalledProcessError):
        run_engine(tmp_path_factory.mktemp("run"), model=model_dir, requests=REQUESTS[:1], architecture=architecture,
                   keep_ratio=KEEP_RATIO, engine=dict(pipeline_parallel_size=2, distributed_executor_backend="mp"))
    assert "EvoPrune does not run with pipeline_parallel_size > 1" in "".join(capfd.readouterr())
