"""vLLM 0.33's VL entry point, MiniMaxM3SparseForConditionalGeneration, on the generator's default layout
(decoder under `language_model.`, a tiny vision tower), converted --long-context: TP 1, on the CPU."""

import json

import pytest
from harness import MOE_LAYERS, load_model, moe_prefixes, read_tensors, same_bits

from mxconvert import format as fmt

GROUP = "language_model.model.layers.{}.block_sparse_moe.experts"


@pytest.fixture(scope="module")
def vl(checkpoints):
    return load_model(checkpoints["vl"])


def test_our_method_on_every_moe_layer_with_the_converted_experts(vl, checkpoints):
    model, _ = vl
    assert type(model).__name__ == "MiniMaxM3SparseForConditionalGeneration"
    layers = moe_prefixes(model)
    stored = json.loads((checkpoints["vl"] / "config.json").read_text())["quantization_config"]["experts"]["layers"]
    assert sorted(layers) == sorted(stored) == [GROUP.format(L) for L in MOE_LAYERS]
    assert stored[GROUP.format(5)] == fmt.BF16_ONLY and stored[GROUP.format(1)] == fmt.DUAL
    tensors = read_tensors(checkpoints["vl"])
    for prefix, layer in layers.items():
        method = layer.quant_method
        assert type(method).__name__ == "MxconvertMoEMethod"
        assert (method.group, method.storage) == (prefix, stored[prefix])
        held = {s for s in fmt.EXPERT_TENSORS if s in layer._parameters}
        assert held == set(fmt.STORED[method.storage]), prefix
        for suffix in held:
            assert same_bits(layer._parameters[suffix].data, tensors[f"{prefix}.{suffix}"]), f"{prefix}.{suffix}"


def test_vision_tower_is_loaded_from_the_passed_through_tensors(vl, checkpoints):
    """vLLM loads every parameter or fails; these are the checkpoint's BF16 tensors under vLLM's names."""
    model, _ = vl
    params = dict(model.named_parameters())
    tensors = read_tensors(checkpoints["vl"])
    for ours, theirs in (
        ("vision_tower.vision_model.embeddings.patch_embedding.weight",) * 2,
        ("multi_modal_projector.linear_1.weight", "vision_tower.multi_modal_projector.linear_1.weight"),
        ("patch_merge_mlp.linear_2.bias", "vision_tower.patch_merge_mlp.linear_2.bias"),
        (
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_tower.vision_model.encoder.layers.0.fc1.weight",
        ),
    ):
        assert same_bits(params[theirs].data, tensors[ours]), ours
