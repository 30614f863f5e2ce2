"""vLLM 0.33's get_model() on converted tiny MiniMax-M3 checkpoints, one process (TP 1), on the CPU.

The MoE forward runs the runtime's MoELayer on its torch reference path (Triton kernels need a GPU or
TRITON_INTERPRET=1); test_forward_with_triton_interpreter runs the same forwards on the Triton kernels
under the interpreter, in a fresh process (TRITON_INTERPRET is read when the kernels are defined).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from harness import MOE_LAYERS, load_model, moe_prefixes, read_tensors, same_bits, use_vllm_grouped_routing

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError

GROUP = "model.layers.{}.block_sparse_moe.experts"


@pytest.fixture(scope="module")
def dual(checkpoints):
    return load_model(checkpoints["dual"])


def test_our_method_on_every_moe_layer(dual, checkpoints):
    model, _ = dual
    layers = moe_prefixes(model)
    config = json.loads((checkpoints["dual"] / "config.json").read_text())["quantization_config"]
    assert sorted(layers) == sorted(config["experts"]["layers"]) == [GROUP.format(L) for L in MOE_LAYERS]
    for prefix, layer in layers.items():
        method = layer.quant_method
        assert type(method).__name__ == "MxconvertMoEMethod"
        assert (method.group, method.storage) == (prefix, config["experts"]["layers"][prefix])
    assert config["experts"]["layers"][GROUP.format(5)] == fmt.BF16_ONLY  # --long-context: layer 5


@pytest.mark.parametrize("name", ["dual", "derive"])
def test_parameters_equal_converted_tensors(name, checkpoints, dual, request):
    """Every stored expert tensor, bit for bit; native_only layers' BF16 copies equal `--bf16 materialize`'s."""
    model, _ = dual if name == "dual" else load_model(checkpoints[name])
    stored = read_tensors(checkpoints[name])
    materialized = read_tensors(checkpoints["dual"])
    for prefix, layer in moe_prefixes(model).items():
        storage = layer.quant_method.storage
        assert storage == {"dual": fmt.DUAL, "derive": fmt.NATIVE_ONLY}[name] or prefix.endswith(
            ".5.block_sparse_moe.experts"
        )
        held = {s for s in fmt.EXPERT_TENSORS if s in layer._parameters}
        want = set(fmt.EXPERT_TENSORS) if storage != fmt.BF16_ONLY else set(fmt.BF16_TENSORS)
        assert held == want, prefix
        for suffix in held:
            source = stored.get(f"{prefix}.{suffix}", materialized[f"{prefix}.{suffix}"])  # derived: dual's
            assert same_bits(layer._parameters[suffix].data, source), f"{prefix}.{suffix}"


def test_other_parameters_equal_stock_mxfp8(checkpoints, dual):
    """Linear layers, norms, router: vLLM's own mxfp8 handling gives the same parameters from the source;
    its experts, dequantized to BF16 at load, equal our BF16 copies value for value: bit for bit except
    the sign of zero (FN's -0 byte 0x80 becomes FNUZ's +0, docs/FORMAT.md)."""
    ours, _ = dual
    stock, _ = load_model(checkpoints["src"])
    assert type(moe_prefixes(stock)[GROUP.format(1)].quant_method).__name__ == "ModelOptMxFp8FusedMoE"
    mine = dict(ours.named_parameters())
    theirs = dict(stock.named_parameters())
    plain = [n for n in theirs if ".routed_experts." not in n]
    assert plain and all(same_bits(mine[n].data, theirs[n].data) for n in plain)
    for prefix, layer in moe_prefixes(stock).items():
        for ours_name, theirs_name in (("w13_weight_bf16", "w13_weight"), ("w2_weight_bf16", "w2_weight")):
            a, b = (
                mine[f"{prefix}.routed_experts.{ours_name}"].data,
                theirs[f"{prefix}.routed_experts.{theirs_name}"].data,
            )
            assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
            differ = a.view(torch.int16) != b.view(torch.int16)
            assert (a[differ] == 0).all() and (b[differ] == 0).all(), f"{prefix}.{ours_name}"


@pytest.mark.parametrize("tokens", [3, 20, 1024])
def test_forward_through_vllm_runner(dual, checkpoints, tokens):
    """vLLM's MoE runner (router, shared expert, our apply) equals shared expert + the runtime's MoELayer."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer
    from mxconvert.runtime.router import route

    model, config = dual
    block = model.model.layers[2].block_sparse_moe  # a layer without the generator's planted edge bytes
    use_vllm_grouped_routing(block.experts)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    with set_current_vllm_config(config), set_forward_context(None, config):
        logits, _ = block.gate(x)
        out = block.experts(hidden_states=x, router_logits=logits)
        shared = block.shared_experts(x)
    runtime = load_moe_layer(ConvertedCheckpoint(checkpoints["dual"]), GROUP.format(2))
    weights, ids = route(logits, block.e_score_correction_bias, top_k=2, routed_scaling_factor=2.0)
    expected = shared + runtime.forward(x, weights, ids)
    method = block.experts.routed_experts.quant_method
    assert method.moe_layer.triton == runtime.triton == (os.environ.get("TRITON_INTERPRET") == "1")
    assert method.moe_layer.last_path == runtime.last_path == ("bf16" if tokens in (3, 1024) else "w8a8")
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)


def test_default_conversion_holds_fp8_alone_and_runs_native(checkpoints):
    """The converter's defaults (--bf16 derive, no BF16 band): every MoE layer holds FP8 experts and scales
    only, and every batch size runs the native path, as the runtime's MoELayer does."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer
    from mxconvert.runtime.router import route

    model, config = load_model(checkpoints["defaults"])
    for prefix, layer in moe_prefixes(model).items():
        assert layer.quant_method.storage == fmt.NATIVE_ONLY
        assert {s for s in fmt.EXPERT_TENSORS if s in layer._parameters} == set(fmt.NATIVE_TENSORS), prefix
    block = model.model.layers[2].block_sparse_moe
    use_vllm_grouped_routing(block.experts)
    runtime = load_moe_layer(ConvertedCheckpoint(checkpoints["defaults"]), GROUP.format(2))
    for tokens in (1, 1024):
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
        with set_current_vllm_config(config), set_forward_context(None, config):
            logits, _ = block.gate(x)
            out = block.experts(hidden_states=x, router_logits=logits)
            shared = block.shared_experts(x)
        weights, ids = route(logits, block.e_score_correction_bias, top_k=2, routed_scaling_factor=2.0)
        assert torch.equal(out, shared + runtime.forward(x, weights, ids))
        assert block.experts.routed_experts.quant_method.moe_layer.last_path == runtime.last_path == "w8a8"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreted run")
def test_forward_with_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test = f"{__file__}::test_forward_through_vllm_runner"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env, text=True,
                         capture_output=True)  # fmt: skip
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-3000:]


def test_missing_expert_tensor_fails_clearly(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["dual"], broken)
    gone = f"{GROUP.format(3)}.w2_weight_scale"
    index = json.loads((broken / fmt.INDEX_NAME).read_text())
    shard = broken / index["weight_map"].pop(gone)
    tensors = load_file(shard)
    del tensors[gone]
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / fmt.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MxconvertError, match=rf"{gone}: is not in the checkpoint .*mxconvert verify"):
        load_model(broken)


def test_specialized_decode_is_refused(checkpoints):
    """vLLM's ROCm monokernel decode reads expert weights in its own layout: refused, not served wrong."""

    def monokernel(config):
        config.kernel_config.monokernel = True

    with pytest.raises(MxconvertError, match=r"specialized decode \(monokernel\) reads expert weights"):
        load_model(checkpoints["dual"], edit=monokernel)
