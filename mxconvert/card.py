"""The model card `README.md` of a converted checkpoint: Hub metadata, what the conversion did, how to load it."""

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import format as fmt
from .writer import write_atomic

TAGS = ["mxfp8", "fp8", "fnuz", "mi300x", "moe"]
LIBRARY_NAME = "mxconvert"  # transformers cannot load this format; mxconvert's kernels can
# Metadata a converted model shares with its source: the licence above all, then what the model is for.
COPIED_FROM_SOURCE = ("license", "license_name", "license_link", "language", "pipeline_tag")

OPTION_HELP = {
    "long_context": "MoE layers with index % 5 == 0 stored BF16-only, to fit HBM at long context",
    "bf16": "`materialize` writes exact BF16 copies of the experts; `derive` leaves them to load time",
    "bf16_max_tokens": "batches of at most this many tokens run on the BF16 experts",
    "bf16_min_tokens": "batches of at least this many tokens run on the BF16 experts",
    "max_shard_size": "largest safetensors shard",
}


def write_model_card(
    *,
    out_dir: Path,
    source: str,
    source_repo_id: str | None,
    source_revision: str | None,
    source_card: Path | None,
    options: dict,
    version: str,
) -> Path:
    """Write out_dir/README.md (a temporary name, then a rename) and return its path."""
    out_dir = Path(out_dir)
    card = ModelCard(
        render_card(
            source=source,
            source_repo_id=source_repo_id,
            source_revision=source_revision,
            source_card=source_card,
            options=options,
            version=version,
        )
    )
    path = out_dir / fmt.CARD_NAME
    write_atomic(path, str(card).encode("utf-8"))
    return path


def render_card(
    *,
    source: str,
    source_repo_id: str | None,
    source_revision: str | None,
    source_card: Path | None,
    options: dict,
    version: str,
) -> str:
    """The card's text: YAML front matter, then Markdown."""
    copied, note = _source_metadata(source_card)
    if "license_link" in copied:
        copied["license_link"] = _absolute_link(str(copied["license_link"]), source_repo_id, source_revision)
    data = ModelCardData(base_model=source_repo_id, library_name=LIBRARY_NAME, tags=list(TAGS), **copied)
    if source_repo_id is not None:  # a relation without a base model means nothing to the Hub
        data.base_model_relation = "quantized"
    body = _body(source, source_repo_id, source_revision, options, version, note)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _source_metadata(source_card: Path | None) -> tuple[dict, str]:
    """Licence and the like from the source card's front matter, and a note for the text when it is unreadable."""
    if source_card is None or not Path(source_card).is_file():
        return {}, ""
    try:
        data = ModelCard.load(source_card, ignore_metadata_errors=True).data
    except (ValueError, yaml.YAMLError) as e:  # YAML that does not parse, or front matter that is not a mapping
        # A broken source card must not stop a conversion; the card says so instead of dropping it silently.
        return {}, f"The source card's metadata could not be read ({type(e).__name__}): see the source for its licence."
    return {key: data.get(key) for key in COPIED_FROM_SOURCE if data.get(key) is not None}, ""


def _absolute_link(link: str, repo_id: str | None, revision: str | None) -> str:
    """A licence link relative to the source repo (e.g. `LICENSE`) would point into ours, where it is missing."""
    if repo_id is None or "://" in link:
        return link
    return f"https://huggingface.co/{repo_id}/blob/{revision or 'main'}/{link.removeprefix('./')}"


def _body(source: str, repo_id: str | None, revision: str | None, options: dict, version: str, note: str) -> str:
    name = repo_id or Path(source).name or source
    # A local path names the user's machine: only its last part goes public.
    origin = f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else f"`{name}` (a local directory)"
    max_t, min_t = options.get("bf16_max_tokens", 8), options.get("bf16_min_tokens", 1024)
    storage = (
        "`native_only` (FP8 and scales; BF16 derived at load time)"
        if options.get("bf16") == "derive"
        else "`dual` (FP8, scales and BF16 copies)"
    )
    if options.get("long_context"):
        storage += ", except MoE layers whose index is a multiple of 5: `bf16_only`"
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` | {OPTION_HELP.get(k, '')} |" for k, v in options.items())
    return f"""# {name} for AMD MI300X (mxconvert format v{fmt.FORMAT_VERSION})

The MXFP8 checkpoint {origin}, converted offline by mxconvert {version} into a layout that
MI300X can serve: MI300X has no MX hardware and its FP8 is E4M3**FNUZ**, not the E4M3FN that the source stores.
{note}
## What the conversion did
- The routed experts of each MoE layer are stacked into `w13_weight` `[E, 2I, H]` (gate rows, then up)
  and `w2_weight` `[E, H, I]`.
- FP8 values keep their bytes: the same byte means half the value in E4M3FNUZ, so only `0x80`
  (-0 in FN, NaN in FNUZ) becomes `0x00`, and every E8M0 scale byte gets +1, which doubles the scale back.
  Every dequantized value equals the source's exactly.
- Scales are packed `[E, K/32, N]` (`w13_weight_scale`, `w2_weight_scale`), so a kernel tile's scales are contiguous.
- BF16 copies (`*_bf16`, the exact dequantization rounded to nearest-even) per layer storage: {storage}.
- Dispatch band: a batch of T tokens runs on the BF16 experts when T <= {max_t} or T >= {min_t},
  and on the native MXFP8 kernel in between.
- Every other tensor (attention, shared experts, dense MLPs, router, norms, embeddings) is copied
  byte for byte; `config.json` records the format in `quantization_config` (`quant_method: mxconvert`).

## How it was made
- Tool: mxconvert {version}
- Source: {origin}, revision {f"`{revision}`" if revision else "not recorded"}
- Manifest: `{fmt.MANIFEST_NAME}` lists every file with its size and sha256 (`mxconvert verify .` checks them).

| option | value | meaning |
|---|---|---|
{rows}

## How to load it
Install mxconvert on the host (`pip install mxconvert`) and check the files first:

```bash
hf download THIS_REPO_ID --local-dir OUT_DIR  # or use a local conversion as OUT_DIR
mxconvert verify OUT_DIR
```

`mxconvert.kernels.moe` runs the experts as stored (`moe_experts_mxfp8` on the FP8 tensors,
`moe_experts_bf16` on the BF16 copies). As of mxconvert {version}, a loader with dispatch by batch
size (`mxconvert.runtime`) and a vLLM plugin (`vllm serve OUT_DIR`) are being built; see the mxconvert
README for what a given version provides.
"""
