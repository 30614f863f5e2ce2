"""Seeded tiny MiniMax-M3-shaped MXFP8 checkpoints (the input of docs/FORMAT.md), for tests and benchmarks.

Same seed and arguments -> byte-identical files. A tensor's bytes depend only on (seed, name, shape),
not on the shard layout. Two kinds of MXFP8 weights:
- edge (the function's default, what the converter's tests use): valid E4M3FN codes drawn uniformly
  (never 0x7F/0xFF, NaN), scales E8M0 bytes in 120..127, plus the edge bytes listed by `planted_bytes()`
  in the first MoE layer's experts. Weights reach ~1e38 (scale 253), so a forward gives inf/NaN there.
- demo (`demo=True`; the command line's default): Gaussian weights (std 0.02) quantized to MXFP8 as a
  real checkpoint is (block maximum at the top of E4M3FN), no planted bytes: a forward on ordinary
  inputs is finite and meaningful. `--edge-bytes` on the command line writes the edge kind.
Files: config.json, shards + index, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json, modeling_minimax_m3.py, README.md, and NOT_COPIED (a converter must skip it).
Layout as vLLM 0.33 loads MiniMax-M3: the VL model (MiniMaxM3SparseForConditionalGeneration: decoder under
`language_model.`, a tiny vision tower) by default; `text_only=True` writes the same decoder alone, at the
top, as MiniMaxM3SparseForCausalLM loads it.

Shape legend: H hidden, I expert intermediate (the shared expert's too: n_shared_experts = 1), D dense
MLP intermediate, E experts, V vocab, Q = heads * head_dim, KV = kv_heads * head_dim, hd head_dim,
VH/VI vision hidden/intermediate. An MXFP8 linear [out, in] is `.weight` F8_E4M3 [out, in] + a scale
U8 [out, in/32].
"""

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EDGE_FP8 = [0x80, 0x7E, 0xFE, 0x00, *range(0x01, 0x08), *range(0x81, 0x88)]  # -0, 448, -448, 0, subnormals
EDGE_SCALE = [0, 1, 127, 253]
DEMO_STD = 0.02  # demo weights: the usual init scale of a transformer's linears
NOT_COPIED = "original/notes.bin"  # neither weights nor a side file: the converter must not copy it
EXPERT_NAMES = {
    "minimax": ("w1", "w3", "w2"),
    "compressed": ("w1", "w3", "w2"),
    "hf": ("gate_proj", "up_proj", "down_proj"),
}  # (gate, up, down)
DTYPE_BYTES = {"F8_E4M3": 1, "U8": 1, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class TinyShape:
    """The model's sizes (MiniMax-M3's keys), tiny by default; `text_only` drops the VL wrapper."""

    hidden_size: int = 160
    intermediate_size: int = 96
    num_experts: int = 8
    top_k: int = 2
    num_hidden_layers: int = 7
    num_dense_layers: int = 3
    dense_intermediate_size: int = 192
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 256
    mtp: bool = True
    text_only: bool = False


# vLLM's MiniMaxVLVisionModel, tiny: a CLIP-style ViT (Conv3d patches), projector, 2x2 patch merger
VISION = {
    "model_type": "minimax_m3_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "num_channels": 3,
    "patch_size": 2,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "img_token_compression_config": {"spatial_merge_size": 2, "temporal_patch_size": 2},
}


def _mx(specs, name, out, inp, scale_suffix):
    specs += [(f"{name}.weight", "F8_E4M3", (out, inp)), (f"{name}.{scale_suffix}", "U8", (out, inp // 32))]


def _experts(specs, prefix, n, h, i, names, scale_suffix):
    gate, up, down = names
    for e in range(n):
        for proj, out, inp in ((gate, i, h), (up, i, h), (down, h, i)):
            _mx(specs, f"{prefix}.experts.{e}.{proj}", out, inp, scale_suffix)


def planted_bytes(*, naming="minimax", scale_suffix=None, **shape):
    """[(tensor name, row, col, byte)] of the edge bytes planted in the first MoE layer's experts.

    Expert 0 gate row 0 starts with EDGE_FP8 (under random scales: every value exact in BF16); the last
    expert's down row H-1 ends with EDGE_FP8 under scale 253 (its BF16 copy overflows to +-inf); expert 1
    up scale row 0 starts with EDGE_SCALE; the last expert's down scales [H-4:H, I/32-1] are EDGE_SCALE.
    """
    shape = TinyShape(**shape)
    h, i, last = shape.hidden_size, shape.intermediate_size, shape.num_experts - 1
    gate, up, down = EXPERT_NAMES[naming]
    suffix = scale_suffix or ("weight_scale" if naming == "compressed" else "weight_scale_inv")
    p = f"{_lm(shape.text_only)}.layers.{shape.num_dense_layers}.block_sparse_moe.experts"
    out = [(f"{p}.0.{gate}.weight", 0, c, b) for c, b in enumerate(EDGE_FP8)]
    out += [(f"{p}.{last}.{down}.weight", h - 1, i - len(EDGE_FP8) + c, b) for c, b in enumerate(EDGE_FP8)]
    out += [(f"{p}.1.{up}.{suffix}", 0, c, b) for c, b in enumerate(EDGE_SCALE)]
    out += [(f"{p}.{last}.{down}.{suffix}", h - 4 + r, i // 32 - 1, b) for r, b in enumerate(EDGE_SCALE)]
    return out


def _head(text_only):
    """The text model's prefix: the VL model's language_model, or none (text only)."""
    return "" if text_only else "language_model."


def _lm(text_only):
    """Where the decoder's tensors live."""
    return f"{_head(text_only)}model"


def _vision(specs, h):
    """vLLM's vision tower as the checkpoint names it (its loader maps `multi_modal_projector.`,
    `patch_merge_mlp.` under vision_tower and `.mlp.fc1.` to `.fc1.`); BF16, no post_layernorm."""
    vh, vi, c, p = (VISION[k] for k in ("hidden_size", "intermediate_size", "num_channels", "patch_size"))
    t, m = (VISION["img_token_compression_config"][k] for k in ("temporal_patch_size", "spatial_merge_size"))

    def linear(name, *shape):  # weight [out, in] (a LayerNorm's: [out]) and bias [out]
        specs.extend([(f"{name}.weight", "BF16", shape), (f"{name}.bias", "BF16", shape[:1])])

    vt = "vision_tower.vision_model"
    specs.append((f"{vt}.embeddings.patch_embedding.weight", "BF16", (vh, c, t, p, p)))
    linear(f"{vt}.pre_layrnorm", vh)
    for L in range(VISION["num_hidden_layers"]):
        b = f"{vt}.encoder.layers.{L}"
        linear(f"{b}.layer_norm1", vh), linear(f"{b}.layer_norm2", vh)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{b}.self_attn.{proj}", vh, vh)
        linear(f"{b}.mlp.fc1", vi, vh), linear(f"{b}.mlp.fc2", vh, vi)
    linear("multi_modal_projector.linear_1", h, vh), linear("multi_modal_projector.linear_2", h, h)
    linear("patch_merge_mlp.linear_1", h, h * m * m), linear("patch_merge_mlp.linear_2", h, h)


def _mxfp8_pool(seed, n=1 << 24):
    """FP8 bytes of Gaussian weights quantized MXFP8-style (block max near 448), as real checkpoints
    hold: few zeros and subnormals, unlike uniform bytes (1 in 16 has a zero exponent there)."""
    import torch  # only for its float8 rounding

    x = torch.from_numpy(np.random.default_rng([seed, 2]).standard_normal((n // 32, 32), dtype=np.float32))
    exponent = torch.ceil(torch.log2(x.abs().amax(dim=1, keepdim=True) / 448))
    return (x / torch.exp2(exponent)).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1).numpy()


def _demo_mx(seed, name, dtype, shape):
    """One demo MXFP8 linear's bytes: the weight's (F8_E4M3 [out, in]) or its scales' (U8 [out, in/32]).
    Both come from the same Gaussian (seeded by the linear's name), so values and scales agree."""
    import torch  # only for its float8 rounding

    base, _ = name.rsplit(".", 1)
    out, inp = shape if dtype == "F8_E4M3" else (shape[0], shape[1] * 32)
    rng = np.random.default_rng([seed, zlib.crc32(base.encode()), 3])
    x = torch.from_numpy(rng.standard_normal((out * inp // 32, 32), dtype=np.float32) * DEMO_STD)
    exponent = torch.ceil(torch.log2(x.abs().amax(dim=1, keepdim=True) / 448)).clamp(-127, 127)
    if dtype == "U8":
        return (exponent.reshape(-1) + 127).to(torch.uint8).numpy()
    return (x / torch.exp2(exponent)).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1).numpy()


def _values(seed, name, dtype, shape, pool=None, demo=False):
    """A tensor's bytes from its own generator, so layouts and write order do not change them."""
    if demo and dtype in ("F8_E4M3", "U8"):
        return _demo_mx(seed, name, dtype, shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = int(np.prod(shape))
    if dtype == "F8_E4M3" and pool is not None:  # realistic codes: the pool, rotated per tensor
        return np.resize(np.roll(pool, -int(rng.integers(len(pool)))), n)
    if dtype == "F8_E4M3":
        words = rng.integers(0, 2**64 - 1, (n + 7) // 8, dtype=np.uint64, endpoint=True)
        b = words.view(np.uint8)[:n]
        return np.subtract(b, (b & 0x7F) == 0x7F, out=b, casting="unsafe")  # NaN 0x7F/0xFF -> 0x7E/0xFE
    if dtype == "U8":
        return rng.integers(120, 128, n, dtype=np.uint8)
    if dtype == "F32":
        return (rng.standard_normal(n, dtype=np.float32) * 0.01).view(np.uint8)
    norm = name.endswith(("norm.weight", "layernorm.weight"))
    f = rng.standard_normal(n, dtype=np.float32) * (0.05 if norm else 0.02) + (1.0 if norm else 0.0)
    u = f.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)  # BF16, nearest-even


def _write_safetensors(path, seed, specs, patches, pool=None, demo=False):
    """Header planned from shapes, then each tensor's bytes in `specs` order (one tensor in memory)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        size = int(np.prod(shape)) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, dtype, shape in specs:
            data = _values(seed, name, dtype, shape, pool, demo)
            for row, col, byte in patches.get(name, ()):
                data.reshape(shape)[row, col] = byte
            f.write(data.tobytes())


def _config(a, moe_layers, mtp, naming, ignored, text_only=False):
    """vLLM 0.33's MiniMaxM3TextConfig keys (sparse attention off), alone or as the VL config's text_config."""
    text = {
        "architectures": ["MiniMaxM3SparseForCausalLM"],
        "model_type": "minimax_m3_text",
        "hidden_size": a["h"],
        "intermediate_size": a["i"],
        "dense_intermediate_size": a["d"],
        "shared_intermediate_size": a["i"],  # vLLM builds the shared expert intermediate_size * n_shared_experts
        "n_shared_experts": 1,
        "num_local_experts": a["e"],
        "num_experts_per_tok": a["top_k"],
        "num_hidden_layers": a["layers"],
        "first_k_dense_replace": a["dense"],
        "mlp_layer_types": ["sparse" if L in moe_layers else "dense" for L in range(a["layers"])],
        "moe_layer_freq": [int(L in moe_layers) for L in range(a["layers"])],
        "num_attention_heads": a["heads"],
        "num_key_value_heads": a["kv_heads"],
        "head_dim": a["hd"],
        "vocab_size": a["v"],
        "swiglu_alpha": 1.702,
        "swiglu_beta": 1.0,
        "swiglu_limit": 7.0,
        "routed_scaling_factor": 2.0,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "hidden_act": "swigluoai",
        "use_qk_norm": True,
        "qk_norm_type": "per_head",
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "max_position_embeddings": 196608,
        "sparse_attention_config": {
            "use_sparse_attention": False,
            "sparse_num_index_heads": 1,
            "sparse_topk_blocks": 1,
            "sparse_attention_freq": [0] * a["layers"],
        },
        "num_mtp_modules": 1 if mtp else 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if naming == "compressed":
        weights = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True}
        quant = {
            "quant_method": "compressed-tensors",
            "format": "mxfp8-quantized",
            "ignore": ignored,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": {**weights, "dynamic": True},
                }
            },
        }
    else:
        quant = {
            "quant_method": "mxfp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [1, 32],
            "ignored_layers": ignored,
        }
    if text_only:
        return {**text, "quantization_config": quant}
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "auto_map": {"AutoModelForCausalLM": "modeling_minimax_m3.MiniMaxM3ForConditionalGeneration"},
        "text_config": text,
        "vision_config": VISION,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": quant,
    }


SIDE_FILES = {
    "tokenizer.json": json.dumps(
        {
            "version": "1.0",
            "model": {
                "type": "WordLevel",
                "unk_token": "<unk>",
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3},
            },
        },
        indent=1,
    ),
    "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 196608}),
    "chat_template.jinja": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}\n",
    "generation_config.json": json.dumps({"do_sample": True, "temperature": 1.0, "top_p": 0.95}),
    "modeling_minimax_m3.py": '"""Stand-in for the remote code file of MiniMax-M3 (copied unchanged)."""\n\n\n'
    "class MiniMaxM3ForConditionalGeneration:\n    pass\n",
    "README.md": "---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n---\n\n"
    "# Tiny MiniMax-M3 (MXFP8)\n\nA random, seeded test checkpoint with MiniMax-M3's layout.\n",
    NOT_COPIED: "scratch notes that are not part of the model\n",
}


def make_tiny_checkpoint(
    out_dir,
    *,
    seed=0,
    num_shards=4,
    naming="minimax",
    scale_suffix=None,
    poison=(),
    fp8_values="uniform",
    demo=False,
    edges=True,
    **shape,
) -> Path:
    """Write the checkpoint into out_dir (created; should be empty) and return its path.

    scale_suffix: None -> "weight_scale" for naming="compressed", else "weight_scale_inv".
    poison: ((tensor name, byte), ...) sets each named tensor's last byte (e.g. 0x7F, or scale 255).
    fp8_values: "uniform" (every valid code alike: covers them all) or "mxfp8" (quantized Gaussian
    weights, as real checkpoints: for benchmarks).
    text_only: the text backbone alone (MiniMaxM3SparseForCausalLM): the text config at the top, names
    under `model.` and `lm_head`, no vision tensors; else the VL model (MiniMaxM3SparseForConditionalGeneration).
    demo: Gaussian MXFP8 weights with their own scales and no planted edge bytes (finite forwards);
    else the edge kind the converter's tests check (see the module's docstring).
    edges: False leaves out the planted edge bytes (benchmarks of the load-time paths: a BF16 copy of
    scale 253 is inf, which a released checkpoint never holds).
    """
    shape = TinyShape(**shape)  # hidden_size=..., num_experts=..., text_only=...: TinyShape's fields
    num_experts, num_hidden_layers, num_dense_layers = (
        shape.num_experts,
        shape.num_hidden_layers,
        shape.num_dense_layers,
    )
    head_dim, vocab_size, mtp, text_only = shape.head_dim, shape.vocab_size, shape.mtp, shape.text_only
    if fp8_values not in ("uniform", "mxfp8"):
        raise ValueError(f"fp8_values must be 'uniform' or 'mxfp8', not {fp8_values!r}")
    if demo and fp8_values != "uniform":
        raise ValueError("demo draws its own FP8 values: leave fp8_values at 'uniform'")
    pool = _mxfp8_pool(seed) if fp8_values == "mxfp8" else None
    if naming not in EXPERT_NAMES:
        raise ValueError(f"naming must be one of {sorted(EXPERT_NAMES)}, not {naming!r}")
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.dense_intermediate_size
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    if any(x % 32 for x in (h, i, d, q)) or h < 128 or i < 32 or num_experts < 2:
        raise ValueError("sizes must be multiples of 32, hidden >= 128, experts >= 2")
    suffix = scale_suffix or ("weight_scale" if naming == "compressed" else "weight_scale_inv")
    names, head, lm = EXPERT_NAMES[naming], _head(text_only), _lm(text_only)
    moe_layers = range(num_dense_layers, num_hidden_layers)
    specs = [(f"{lm}.embed_tokens.weight", "BF16", (vocab_size, h))]
    for L in range(num_hidden_layers):
        p = f"{lm}.layers.{L}"
        specs += [
            (f"{p}.input_layernorm.weight", "BF16", (h,)),
            (f"{p}.post_attention_layernorm.weight", "BF16", (h,)),
            (f"{p}.self_attn.q_norm.weight", "BF16", (head_dim,)),  # qk_norm_type "per_head"
            (f"{p}.self_attn.k_norm.weight", "BF16", (head_dim,)),
        ]
        for proj, out, inp in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            _mx(specs, f"{p}.self_attn.{proj}", out, inp, suffix)
        mlp, size = (f"{p}.block_sparse_moe.shared_experts", i) if L in moe_layers else (f"{p}.mlp", d)
        for proj, out, inp in (("gate_proj", size, h), ("up_proj", size, h), ("down_proj", h, size)):
            _mx(specs, f"{mlp}.{proj}", out, inp, suffix)
        if L in moe_layers:
            specs += [
                (f"{p}.block_sparse_moe.gate.weight", "BF16", (num_experts, h)),
                (f"{p}.block_sparse_moe.e_score_correction_bias", "F32", (num_experts,)),
            ]
            _experts(specs, f"{p}.block_sparse_moe", num_experts, h, i, names, suffix)
    if mtp:  # an expert group outside layers.{L}
        m = f"{lm}.mtp.0"
        specs += [
            (f"{m}.enorm.weight", "BF16", (h,)),
            (f"{m}.hnorm.weight", "BF16", (h,)),
            (f"{m}.eh_proj.weight", "BF16", (h, 2 * h)),
            (f"{m}.block_sparse_moe.gate.weight", "BF16", (num_experts, h)),
            (f"{m}.block_sparse_moe.e_score_correction_bias", "F32", (num_experts,)),
        ]
        _experts(specs, f"{m}.block_sparse_moe", num_experts, h, i, names, suffix)
    specs += [(f"{lm}.norm.weight", "BF16", (h,)), (f"{head}lm_head.weight", "BF16", (vocab_size, h))]
    if not text_only:
        _vision(specs, h)

    patches = {}
    if len(moe_layers) and edges and not demo:
        for name, row, col, byte in planted_bytes(naming=naming, scale_suffix=suffix, **vars(shape)):
            patches.setdefault(name, []).append((row, col, byte))
    byte_tensors = {n for n, dt, _ in specs if dt in ("F8_E4M3", "U8")}
    for name, byte in poison:
        if name not in byte_tensors:
            raise ValueError(f"poison: no FP8 or scale tensor named {name!r}")
        patches.setdefault(name, []).append((-1, -1, byte))

    # Shards: tensors in model order split by bytes, except the first MoE layer's experts, which are
    # shuffled and dealt round-robin over every shard (one expert's tensors land in different shards).
    rng = np.random.default_rng([seed, 1])
    spread = f"{lm}.layers.{num_dense_layers}.block_sparse_moe.experts."
    nbytes = {n: int(np.prod(sh)) * DTYPE_BYTES[dt] for n, dt, sh in specs}
    rest = [sp for sp in specs if not sp[0].startswith(spread)]
    dealt = [specs[k] for k in rng.permutation(len(specs)) if specs[k][0].startswith(spread)]
    total, cum, shards = sum(nbytes.values()), 0, [[] for _ in range(num_shards)]
    rest_total = sum(nbytes[n] for n, _, _ in rest)
    for sp in rest:
        shards[min(num_shards - 1, (cum + nbytes[sp[0]] // 2) * num_shards // rest_total)].append(sp)
        cum += nbytes[sp[0]]
    for k, sp in enumerate(dealt):
        shards[k % num_shards].append(sp)
    if not all(shards):
        raise ValueError(f"num_shards={num_shards} leaves a shard empty")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if num_shards == 1 else f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        order = [shard[j] for j in rng.permutation(len(shard))]  # a shuffled file order
        _write_safetensors(out / fname, seed, order, patches, pool, demo)
        weight_map.update({n: fname for n, _, _ in shard})
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    ignored = [f"{head}lm_head"] + ([] if text_only else ["vision_tower", "multi_modal_projector", "patch_merge_mlp"])
    ignored += [f"{lm}.layers.{L}.block_sparse_moe.gate" for L in moe_layers]
    ignored += [f"{lm}.mtp.0.eh_proj", f"{lm}.mtp.0.block_sparse_moe.gate"] if mtp else []
    a = dict(h=h, i=i, d=d, e=num_experts, top_k=shape.top_k, layers=num_hidden_layers, dense=num_dense_layers,
             heads=shape.num_attention_heads, kv_heads=shape.num_key_value_heads, hd=head_dim,
             v=vocab_size)  # fmt: skip
    config = _config(a, moe_layers, mtp, naming, ignored, text_only)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname, text in SIDE_FILES.items():
        (out / fname).parent.mkdir(parents=True, exist_ok=True)
        (out / fname).write_text(text)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Write a seeded tiny MiniMax-M3-shaped MXFP8 checkpoint (by default the demo kind: "
        "Gaussian weights whose forward is finite)."
    )
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden-size", type=int, default=160)
    ap.add_argument("--intermediate-size", type=int, default=96)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--num-hidden-layers", type=int, default=7)
    ap.add_argument("--num-shards", type=int, default=4)
    ap.add_argument("--naming", choices=sorted(EXPERT_NAMES), default="minimax")
    ap.add_argument("--no-mtp", dest="mtp", action="store_false")
    ap.add_argument("--fp8-values", choices=["uniform", "mxfp8"], default="uniform")
    ap.add_argument("--text-only", action="store_true", help="the text backbone alone, as vLLM loads it")
    ap.add_argument(
        "--edge-bytes",
        dest="demo",
        action="store_false",
        help="every FP8 code and the planted edge bytes, as the converter's tests use (forwards overflow)",
    )
    args = vars(ap.parse_args(argv))
    if args["fp8_values"] != "uniform" and args["demo"]:
        ap.error("--fp8-values needs --edge-bytes (the demo kind draws its own values)")
    print(make_tiny_checkpoint(args.pop("out_dir"), **args))


if __name__ == "__main__":
    main()
