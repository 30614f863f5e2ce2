"""The model card `README.md` of a converted checkpoint: Hub metadata, what is inside, how to serve it,
what was tested where, where it came from, and the source's licence.

The card describes the output `config.json` (written before it), so what it says is what the files hold.
It never names a local path, a user or a token: a local source appears by its last path part only.
"""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import format as fmt
from .files import write_atomic

TAGS = ["mxfp8", "fp8", "fnuz", "mi300x", "moe"]
LIBRARY_NAME = "mxconvert"  # transformers cannot load this format; mxconvert's runtime and vLLM plugin can
# Metadata a converted model shares with its source: the licence above all, then what the model is for.
COPIED_FROM_SOURCE = ("license", "license_name", "license_link", "language", "pipeline_tag")
VLLM_VERSION = "0.33.0"  # the vLLM the plugin supports (pyproject's `vllm` extra)

OPTION_HELP = {
    "long_context": "MoE layers with index % 5 == 0 stored BF16-only, to fit HBM at long context",
    "bf16": "`derive` stores FP8 only (BF16 copies, where used, are dequantized at load); `materialize` stores them",
    "bf16_max_tokens": "batches of at most this many tokens run on the BF16 experts",
    "bf16_min_tokens": "batches of at least this many tokens run on the BF16 experts",
    "max_shard_size": "largest safetensors shard",
}
STORAGE_HELP = {
    fmt.DUAL: "FP8 values, packed scales and exact BF16 copies",
    fmt.NATIVE_ONLY: "FP8 values and packed scales; BF16 copies, where a band uses them, made at load (same bits)",
    fmt.BF16_ONLY: "BF16 copies only (the native band runs on BF16 there)",
}


def write_model_card(*, out_dir: Path, **card) -> Path:
    """Write out_dir/README.md (a temporary name, then a rename) and return its path: render_card's text for
    out_dir/config.json's quantization_config, with `card` as render_card's other arguments.

    repo_id: the Hub repo the card will live in, when known (the push's target); source_files: the
    manifest's input fingerprint (`source.files`).
    """
    out_dir = Path(out_dir)
    quant = fmt.find_quant(json.loads((out_dir / "config.json").read_text()))
    text = render_card(quant=quant, project_url=card.pop("project_url", project_url()), **card)
    path = out_dir / fmt.CARD_NAME
    write_atomic(path, str(ModelCard(text)).encode("utf-8"))
    return path


def render_card(
    *,
    quant: dict,
    source: str,
    source_repo_id: str | None,
    source_revision: str | None,
    source_card: bytes | Path | None,
    options: dict,
    version: str,
    repo_id: str | None = None,
    source_files: list[dict] | None = None,
    project_url: str | None = None,
) -> str:
    """The card's text: YAML front matter, then Markdown. quant: the output config's quantization_config."""
    copied, note = _source_metadata(source_card)
    if "license_link" in copied:
        copied["license_link"] = _absolute_link(str(copied["license_link"]), source_repo_id, source_revision)
    data = ModelCardData(base_model=source_repo_id, library_name=LIBRARY_NAME, tags=list(TAGS), **copied)
    if source_repo_id is not None:  # a relation without a base model means nothing to the Hub
        data.base_model_relation = "quantized"
    # A local path names the user's machine: only its last part goes public.
    name = source_repo_id or Path(source).name or source
    origin = f"`{name}` (a local directory)"
    if source_repo_id:
        origin = f"[{source_repo_id}](https://huggingface.co/{source_repo_id})"
    body = "\n".join(
        [
            _intro(name, origin, version, note),
            _inside(quant),
            _serving(repo_id, project_url),
            _tested(),
            _provenance(origin, source_revision, version, options, source_files),
            _licence(copied, origin, source_repo_id),
        ]
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def project_url() -> str | None:
    """mxconvert's repository, if the installed package's metadata names one (Project-URL)."""
    try:
        urls = metadata.metadata("mxconvert").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    found = dict(u.split(", ", 1) for u in urls if ", " in u)
    return next((found[k] for k in ("Repository", "Source", "Homepage") if k in found), None)


def input_fingerprint(source_files: list[dict]) -> str:
    """One sha256 over the manifest's `source.files` (each input file's name, size and sha256, of its
    header for a weight file), in name order."""
    files = sorted(source_files, key=lambda f: f["name"])
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_metadata(source_card: bytes | Path | None) -> tuple[dict, str]:
    """Licence and the like from the source card's front matter (its bytes as the converter read them once),
    and a note for the text when it is unreadable."""
    if isinstance(source_card, Path):
        source_card = source_card.read_bytes() if source_card.is_file() else None
    if source_card is None:
        return {}, ""
    try:
        data = ModelCard(source_card.decode("utf-8", "replace"), ignore_metadata_errors=True).data
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # YAML that does not parse, or not a mapping
        # A broken source card must not stop a conversion; the card says so instead of dropping it silently.
        return {}, f"The source card's metadata could not be read ({type(e).__name__}): see the source for its licence."
    return {key: data.get(key) for key in COPIED_FROM_SOURCE if data.get(key) is not None}, ""


def _absolute_link(link: str, repo_id: str | None, revision: str | None) -> str:
    """A licence link relative to the source repo (e.g. `LICENSE`) would point into ours, where it is missing."""
    if repo_id is None or "://" in link:
        return link
    return f"https://huggingface.co/{repo_id}/blob/{revision or 'main'}/{link.removeprefix('./')}"


def _ranges(numbers: list[int]) -> str:
    """[3, 4, 6, 7, 8, 11] -> '3-4, 6-8, 11'."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _intro(name: str, origin: str, version: str, note: str) -> str:
    return f"""# {name} for AMD MI300X (mxconvert format v{fmt.FORMAT_VERSION})

The MXFP8 checkpoint {origin}, converted offline by mxconvert {version} into a layout that MI300X can
serve natively: MI300X has no MX hardware and its FP8 is E4M3**FNUZ**, not the E4M3FN the source stores,
so without this conversion a server re-lays the experts at every start or runs them as BF16 emulation.
The conversion is exact: every expert weight dequantizes to the source's value, bit for bit.
{note}"""


def _inside(quant: dict) -> str:
    experts = quant["experts"]
    by_storage: dict[str, list[str]] = {}
    for prefix, storage in experts["layers"].items():
        by_storage.setdefault(storage, []).append(prefix)
    rows = []
    for storage, prefixes in sorted(by_storage.items()):
        matches = [fmt.DECODER_GROUP.match(p) for p in prefixes]
        where = [f"layers {_ranges([int(m['layer']) for m in matches if m])}"] if any(matches) else []
        where += [f"`{p}`" for p, m in zip(prefixes, matches) if not m]
        rows.append(f"| `{storage}` | {len(prefixes)}: {'; '.join(where)} | {STORAGE_HELP[storage]} |")
    lo, hi = experts["dispatch"]["bf16_max_tokens"], experts["dispatch"]["bf16_min_tokens"]
    if fmt.bf16_band_empty(lo, hi):
        dispatch = """Dispatch: every batch runs on the native MXFP8 kernel; no BF16 band, so no BF16 copy is held
  in GPU memory (exact weights at the memory of FP8). A BF16 band is opt-in when converting
  (`--bf16-max-tokens`, `--bf16-min-tokens`)."""
    else:
        dispatch = f"""Dispatch band: a batch of T tokens runs on the BF16 experts when T <= {lo} or T >= {hi},
  and on the native MXFP8 kernel in between (mxconvert's runtime uses the bands it measured for a device
  where it has them, else these)."""
    act = experts["activation"]
    return f"""## What is inside
Routed experts, per MoE layer `P = <prefix>.block_sparse_moe.experts`, stacked over the E experts:
`P.w13_weight` `[E, 2I, H]` (gate rows, then up) and `P.w2_weight` `[E, H, I]` as FP8 E4M3FNUZ, their
E8M0 scales packed `[E, K/32, N]` (`P.w13_weight_scale`, `P.w2_weight_scale`) so that a kernel tile's
scales are contiguous, and where a group's storage holds them BF16 copies (`P.w13_weight_bf16`,
`P.w2_weight_bf16`, the exact value rounded to nearest-even). Each expert group's storage:

| storage | expert groups | what is stored |
|---|---|---|
{chr(10).join(rows)}

- FN to FNUZ keeps each value byte (the same byte means half the value in FNUZ), except `0x80` (-0 in FN,
  NaN in FNUZ), which becomes `0x00`; every scale byte gets +1, which doubles the scale back.
- {dispatch}
- Activation: {act["kind"]} (alpha {act["alpha"]}, beta {act["beta"]}, limit {act["limit"]}).
- Every other tensor (attention, shared experts, dense MLPs, router, norms, embeddings, vision) is the
  source's, byte for byte. `config.json` records all this in `quantization_config`
  (`quant_method: {fmt.QUANT_METHOD}`, `format_version: {fmt.FORMAT_VERSION}`), keeping the source's under
  `source_quantization_config`.
"""


def _serving(repo_id: str | None, url: str | None) -> str:
    if url:
        install, where = f"pip install 'mxconvert[vllm] @ git+{url}'", ""
    else:  # no address to give: the clone the reader has
        install = "pip install '.[vllm]'  # in a clone of mxconvert"
        where = " (mxconvert is not on PyPI: install it from a clone of its repository)"
    if repo_id:
        local = repo_id.rsplit("/", 1)[-1]
        fetch = f"hf download {repo_id} --local-dir {local}\ncd {local}\n"
        place = "Download it, check every file against the manifest, and serve it"
    else:
        fetch, place = "", "In the directory that holds these files: check them against the manifest, and serve it"
    return f"""## How to serve it
vLLM {VLLM_VERSION} with mxconvert's plugin, installed into one environment{where}. The plugin registers
itself through vLLM's plugin entry point; `quant_method: {fmt.QUANT_METHOD}` selects it.

```shell
{install}
```

{place}:

```shell
{fetch}mxconvert verify "$PWD"
vllm serve "$PWD" --tensor-parallel-size 8      # add --enable-expert-parallel for expert parallelism
```

On MI300X the experts run mxconvert's Triton kernels on the FNUZ bytes (W8A8), and batches in a BF16 band
(if the conversion set one) on BF16 copies; everything else is served by vLLM's own `mxfp8` path. On
NVIDIA Hopper the same bytes run as E4M3FN with the scale exponent lowered by one (W8A16).
`mxconvert.runtime` loads and runs the MoE layers without vLLM (`ConvertedCheckpoint`, `load_moe_layer`).
"""


def _tested() -> str:
    return """## What was tested where
- The conversion: `mxconvert verify` checks every file's size and sha256 against `mxconvert.json`, the
  index and the format; `mxconvert verify --source` also compares every tensor with the source, bit for
  bit. mxconvert's tests run both on seeded tiny MiniMax-M3-shaped checkpoints.
- The kernels: on the CPU under Triton's interpreter and on NVIDIA H100 and H200 GPUs. No MI300X was available: the
  gfx942 path (FNUZ dot, its tile choices) is checked numerically under the interpreter only.
- The vLLM plugin: on a CPU machine, through vLLM's own config, loader and model construction (tiny
  MiniMax-M3, text and vision-language, tensor and expert parallel ranks). Not tested: `vllm serve` end
  to end, vLLM on any GPU, CUDA graphs around the plugin's forward, speculative decoding (MTP).
"""


def _provenance(origin: str, revision: str | None, version: str, options: dict, files: list[dict] | None) -> str:
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` | {OPTION_HELP.get(k, '')} |" for k, v in options.items())
    listed = f"listed under `source.files` in `{fmt.MANIFEST_NAME}`"
    if files:
        weights = sum("header_sha256" in f for f in files)
        fingerprint = (
            f"sha256 `{input_fingerprint(files)}` over {len(files)} input files ({sum(f['size'] for f in files):,}"
            f" bytes): {weights} weight files by name, size and header sha256, the others by sha256, {listed}"
        )
    else:
        fingerprint = f"each input file's name, size and sha256 (of its header, for weight files), {listed}"
    source = f"{origin}, revision `{revision}`" if revision else f"{origin}, no revision recorded"
    return f"""## How it was made
- Source: {source}
- Input fingerprint: {fingerprint}
- Tool: mxconvert {version}, with these options:

| option | value | meaning |
|---|---|---|
{rows}

`{fmt.MANIFEST_NAME}` lists every file of this checkpoint with its size and sha256.
"""


def _licence(copied: dict, origin: str, source_repo_id: str | None) -> str:
    licence = copied.get("license_name") or copied.get("license")
    link = copied.get("license_link")
    if licence:
        terms = f"the source's licence, `{licence}`" + (f" ([text]({link}))" if link else "")
    else:
        terms = "the source's licence (its card names none that could be read: see the source)"
    # MiniMax's own repos: their licence asks for attribution (the card may name it only as "other")
    from_minimax = (source_repo_id or "").lower().startswith("minimaxai/") and licence in (None, "other")
    minimax = "minimax" in f"{licence} {link}".lower() or from_minimax
    attribution = (
        ' MiniMax-M3 ships under the MiniMax Community License, which asks for attribution ("Built with'
        ' MiniMax M3"): read it before you use or share this checkpoint.'
        if minimax
        else ""
    )
    return f"""## Licence and attribution
These are the weights of {origin}, re-encoded without changing any value: they remain under {terms},
and its terms, attribution included, apply to this checkpoint as to the source.{attribution}
mxconvert, the tool that made it, is a separate project under the Apache-2.0 licence.
"""
