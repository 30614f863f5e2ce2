"""Build vLLM 0.33's MiniMax-M3 on the CPU, through vLLM's own config, loader and get_model().

Shape of the tiny model: H 128, expert I 128 (64 per rank at TP 2), E 4, top-2, 6 layers (layer 0
dense, 1-5 MoE with shared expert and routing bias; with --long-context layer 5 is bf16_only),
sparse attention off; text only (MiniMaxM3SparseForCausalLM), or with a tiny vision tower (TINY_VL).
Two things vLLM 0.33 lacks on its CPU platform are supplied here, in the test process only: an MXFP8
linear kernel (its own EmulationMxfp8LinearKernel, which it lists for CUDA, ROCm and XPU) and
sigmoid-with-bias top-k routing (its CPURouter's grouped path, with one group).
"""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

TINY = dict(
    text_only=True,
    mtp=False,
    hidden_size=128,
    intermediate_size=128,
    num_experts=4,
    top_k=2,
    num_hidden_layers=6,
    num_dense_layers=1,
    num_shards=3,
)
TINY_VL = {**TINY, "text_only": False}  # the generator's default: the VL model, decoder under language_model.
MOE_LAYERS = range(1, 6)
_distributed = False


def setup_vllm() -> None:
    """What a test process needs before building a config: plugins, the text config, a CPU MXFP8 linear."""
    from transformers import AutoConfig
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum
    from vllm.plugins import load_general_plugins
    from vllm.transformers_utils.configs.minimax_m3 import MiniMaxM3TextConfig

    load_general_plugins()
    AutoConfig.register("minimax_m3_text", MiniMaxM3TextConfig, exist_ok=True)
    try:  # a CUDA wheel on the CPU has no vllm._C: on a CPU with AMX, vLLM would call its packed-GEMM ops
        import vllm._C  # noqa: F401
    except ImportError:
        from vllm.model_executor.layers import utils as layer_utils

        layer_utils.check_cpu_sgl_kernel = lambda *args, **kwargs: False
    cpu = linear._POSSIBLE_MXFP8_KERNELS.setdefault(PlatformEnum.CPU, [])
    if linear.EmulationMxfp8LinearKernel not in cpu:
        cpu.append(linear.EmulationMxfp8LinearKernel)


def engine_config(model_dir, *, tp: int = 1, ep: bool = False):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model_dir),
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        enable_expert_parallel=ep,
        distributed_executor_backend="uni" if tp == 1 else "mp",
    )
    return args.create_engine_config()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, world_size: int = 1, rank: int = 0, port: int | None = None) -> None:
    global _distributed
    if _distributed:
        return
    port = port or free_port()  # one process: any free port; ranks of several: the one they share
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    init_distributed_environment(
        world_size=world_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    ensure_model_parallel_initialized(world_size, 1)
    _distributed = True


def load_model(model_dir, *, tp: int = 1, ep: bool = False, rank: int = 0, port: int | None = None, edit=None):
    """(model, vllm_config): vLLM's get_model() on model_dir, as `vllm serve` would build it.
    edit(vllm_config), if given, changes the config first."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    setup_vllm()
    config = engine_config(model_dir, tp=tp, ep=ep)
    if edit:
        edit(config)
    with set_current_vllm_config(config):
        init_distributed(world_size=tp, rank=rank, port=port)
        return get_model(vllm_config=config), config


def moe_prefixes(model) -> dict[str, torch.nn.Module]:
    """vLLM prefix of each routed-experts layer -> the layer."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return {m.layer_name: m for m in model.modules() if isinstance(m, RoutedExperts)}


def read_tensors(model_dir, names=None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint directory by name (all, or those named)."""
    out = {}
    for path in sorted(os.listdir(model_dir)):
        if path.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, path), "pt") as f:
                for name in f.keys():
                    if names is None or name in names:
                        out[name] = f.get_tensor(name)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def use_vllm_grouped_routing(runner) -> None:
    """vLLM 0.33's CPURouter has no plain sigmoid+bias top-k (MiniMax-M3's routing); its grouped top-k
    with one group computes exactly that, so the runner's router is switched to it."""
    router = runner.router
    router.use_grouped_topk, router.num_expert_group, router.topk_group = True, 1, 1


def check_rank_slices(rank: int, model_dir: str, ep: bool, port: int, result_dir: str, materialized: str) -> None:
    """One of two spawned ranks: load at TP 2 (with or without EP); write, per expert parameter, whether it
    equals the runtime's slice (runtime.sharding) of the converted tensor bit for bit (BF16 copies derived
    at load: of the `materialized` checkpoint's)."""
    import json

    from mxconvert import format as fmt
    from mxconvert.runtime.sharding import Ranks, shard_expert_tensor

    model, config = load_model(model_dir, tp=2, ep=ep, rank=rank, port=port)
    full = {**read_tensors(materialized), **read_tensors(model_dir)}
    ranks = Ranks(ep_rank=rank, ep_size=2) if ep else Ranks(tp_rank=rank, tp_size=2)
    report = {}
    for prefix, layer in moe_prefixes(model).items():
        method = layer.quant_method
        report[prefix] = {"storage": method.storage, "first_expert": method.first_expert, "params": {}}
        for suffix in fmt.EXPERT_TENSORS:
            if suffix in layer._parameters:
                name = f"{prefix}.{suffix}"
                got = layer._parameters[suffix].data
                ok = same_bits(got, shard_expert_tensor(suffix, full[name], ranks))
                report[prefix]["params"][suffix] = {"exact": ok, "shape": list(got.shape)}
    torch.save(moe_forward(model, config, FORWARD_LAYER, FORWARD_TOKENS), os.path.join(result_dir, f"rank{rank}.pt"))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


FORWARD_LAYER = 2  # a MoE layer without the generator's planted edge bytes
FORWARD_TOKENS = (3, 20, 1024)  # BF16 band, native band, BF16 band


def moe_input(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, TINY["hidden_size"], generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)


def moe_forward(model, config, layer: int, tokens) -> dict:
    """vLLM's MoE block (gate, then the runner: router, shared expert, routed experts) on moe_input(T):
    {T: (output [T, H], whether the runner left the all-reduce to the next norm, router_logits, MoE path)}."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    block = model.model.layers[layer].block_sparse_moe
    use_vllm_grouped_routing(block.experts)
    out = {}
    for t in tokens:
        x = moe_input(t)
        with set_current_vllm_config(config), set_forward_context(None, config):
            logits, _ = block.gate(x)
            y = block.experts(hidden_states=x, router_logits=logits)
        path = block.experts.routed_experts.quant_method.moe_layer.last_path
        out[t] = (y, block.experts.moe_config.skip_final_all_reduce, logits, path)
    return out
