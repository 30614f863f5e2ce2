"""The plugin's registration: entry point, idempotence, the off switch, the version pin, names vLLM dispatches on."""

from importlib.metadata import entry_points

import pytest
from vllm.model_executor.layers import quantization as q

import mxconvert.runtime.vllm_plugin as plugin
from mxconvert.errors import MxconvertError

CONVERTED = {
    "quant_method": "mxconvert",
    "format_version": 1,
    "source_quantization_config": {
        "quant_method": "mxfp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [1, 32],
        "ignored_layers": ["lm_head"],
    },
    "experts": {
        "layers": {"model.layers.1.block_sparse_moe.experts": "dual"},
        "dispatch": {"bf16_max_tokens": 8, "bf16_min_tokens": 1024},
        "activation": {"kind": "swigluoai", "alpha": 1.702, "beta": 1.0, "limit": 7.0},
    },
}


@pytest.fixture
def fresh_registry(monkeypatch):
    """register() as in a new process; vLLM's registry restored afterwards."""
    monkeypatch.setattr(plugin, "_registered", None)
    monkeypatch.setattr(q, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", dict(q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG))
    q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG.pop("mxconvert", None)


def test_entry_point_is_register():
    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "mxconvert"]
    assert ep.load() is plugin.register


def test_register_is_idempotent(fresh_registry):
    plugin.register()
    cls = q.get_quantization_config("mxconvert")
    plugin.register()
    assert q.get_quantization_config("mxconvert") is cls
    assert q.QUANTIZATION_METHODS.count("mxconvert") == 1
    config = cls.from_config(CONVERTED)
    assert config.get_name() == "mxconvert"
    assert type(config.source).__name__ == "ModelOptMxFp8Config"  # vLLM's own handling of "mxfp8"


def test_env_turns_it_off(fresh_registry, monkeypatch):
    monkeypatch.setenv("MXCONVERT_VLLM_PLUGIN", "0")
    plugin.register()
    assert "mxconvert" not in q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG


def test_other_vllm_versions_are_refused(fresh_registry, monkeypatch):
    monkeypatch.setattr(plugin, "vllm_version", lambda: "0.32.1")
    plugin.register()
    with pytest.raises(MxconvertError, match=r"vLLM 0\.32\.1: .*supports vLLM 0\.33\.0 only\. Install vllm==0\.33\.0"):
        q.get_quantization_config("mxconvert").from_config(CONVERTED)


def test_unknown_format_version_is_refused(fresh_registry):
    plugin.register()
    with pytest.raises(MxconvertError, match="format_version 2, not 'mxconvert' 1"):
        q.get_quantization_config("mxconvert").from_config({**CONVERTED, "format_version": 2})


def test_names_vllm_dispatches_on():
    """vLLM's MoE weight loader special-cases class names with "ModelOpt" / "compressed"."""
    from mxconvert.runtime.vllm_plugin import config, moe_method

    for cls in (config.MxconvertQuantConfig, moe_method.MxconvertMoEMethod):
        assert "ModelOpt" not in cls.__name__ and "compressed" not in cls.__name__.lower()
    assert not config.MxconvertQuantConfig.from_config(CONVERTED).get_name().startswith("modelopt")


def test_names_reach_routed_experts_under_both_model_classes():
    """The weight mapper and the group lookup, for the text model's names and the VL model's
    (language_model.-prefixed, with vLLM's own mapper for that class applied too)."""
    from vllm.models.minimax_m3 import MiniMaxM3SparseForConditionalGeneration as VL

    from mxconvert.runtime.vllm_plugin.config import MxconvertQuantConfig

    vl_group = "language_model.model.layers.3.block_sparse_moe.experts"
    config = MxconvertQuantConfig.from_config(
        {**CONVERTED, "experts": {**CONVERTED["experts"], "layers": {vl_group: "dual"}}}
    )
    mapper = VL.hf_to_vllm_mapper | config.get_checkpoint_weight_mapper()
    for suffix in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "w13_weight_bf16"):
        routed = f"{vl_group}.routed_experts.{suffix}"
        assert mapper.map_name(f"{vl_group}.{suffix}") == routed
        assert mapper.map_name(routed) == routed  # applied twice (VL, then its language model): unchanged
    assert mapper.map_name(f"{vl_group}.0.w1.weight") == f"{vl_group}.0.w1.weight"  # per-expert names untouched
    assert config.group_for(vl_group) == vl_group
    assert config.group_for("model.layers.3.block_sparse_moe.experts") == vl_group  # by suffix
    with pytest.raises(MxconvertError, match="matches 0 expert groups"):
        config.group_for("model.layers.4.block_sparse_moe.experts")
