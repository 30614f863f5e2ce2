"""convert(): a MiniMax-M3 MXFP8 checkpoint in, the MI300X format of FORMAT.md out, streamed.

read headers -> plan -> stream every tensor into its shard -> config, index, side files, card ->
manifest last -> verify (cheap part).
"""

import ctypes
import fnmatch
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from . import format as fmt
from .card import write_model_card
from .checkpoint import SINGLE_NAME, SourceCheckpoint, resolve_model_dir
from .errors import MxconvertError
from .manifest import sha256_file, verify, write_manifest
from .plan import Plan, make_plan, parse_size
from .stream import copy_tensor, write_group
from .writer import PARTIAL, ShardSet, write_atomic, write_json_atomic

SIDE_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template*", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "*.py", "LICENSE*",
)  # fmt: skip
WORKERS = max(1, min(4, os.cpu_count() or 1))  # expert threads
SOURCE_FILES = ("config.json", fmt.INDEX_NAME, "*.safetensors", "README.md", *SIDE_FILES)  # what a Hub fetch needs


def convert(
    *,
    model_dir: str,
    out_dir: str,
    long_context: bool = False,
    bf16: str = "materialize",
    bf16_max_tokens: int = 8,
    bf16_min_tokens: int = 1024,
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
) -> Plan:
    """Convert MODEL_DIR (a local directory or a Hub repo id) into OUT_DIR; returns the plan it followed.

    push_to_hub: a Hub repo id to upload the verified result to (mxconvert.hub.push, with its defaults).
    """
    if bf16 not in ("materialize", "derive"):
        raise MxconvertError("--bf16", f"{bf16!r} is not materialize or derive", "Pick one of the two")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise MxconvertError(
            "--device", f"{device!r} is not available here", "Use --device cpu: the bytes are the same"
        )
    if not 0 <= bf16_max_tokens < bf16_min_tokens:
        raise MxconvertError(
            "--bf16-max-tokens",
            f"{bf16_max_tokens} is not below --bf16-min-tokens {bf16_min_tokens}",
            "The native band lies between them; pick max < min",
        )
    options = dict(
        long_context=long_context,
        bf16=bf16,
        bf16_max_tokens=bf16_max_tokens,
        bf16_min_tokens=bf16_min_tokens,
        max_shard_size=max_shard_size,
    )
    local_dir, source_id = resolve_model_dir(model_dir, allow_patterns=SOURCE_FILES)
    source = SourceCheckpoint(local_dir)
    plan = make_plan(source, long_context=long_context, bf16=bf16, max_shard_size=parse_size(max_shard_size))
    if dry_run:
        print(describe(plan, source))
        return plan

    out = _prepare_out_dir(Path(out_dir), local_dir, force=force)
    hashes = _write_shards(source, plan, out, device=device, progress=progress)

    config = json.loads((local_dir / "config.json").read_text())
    _replace_quant_config(config, plan, source, options)
    write_json_atomic(out / "config.json", config)
    weight_map = {t.name: shard.name for shard in plan.shards for t in shard.tensors}
    write_json_atomic(
        out / fmt.INDEX_NAME,
        {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))},
    )
    for path in _side_files(local_dir):
        write_atomic(out / path.name, path.read_bytes())
    write_model_card(
        out_dir=out,
        source=str(model_dir),
        source_repo_id=source_id.get("repo_id"),
        source_revision=source_id.get("revision"),
        source_card=local_dir / fmt.CARD_NAME if (local_dir / fmt.CARD_NAME).is_file() else None,
        options=options,
        version=__version__,
    )
    for path in sorted(out.iterdir()):
        if path.name not in hashes and path.is_file():
            hashes[path.name] = sha256_file(path)
    write_manifest(out, options=options, source=source, source_id=source_id, files=hashes)
    verify(out_dir=out, full=False)
    if push_to_hub:
        from .hub import push  # huggingface_hub's upload machinery only when asked for

        push(out_dir=out, repo_id=push_to_hub)
    return plan


def _write_shards(source: SourceCheckpoint, plan: Plan, out: Path, *, device: str, progress: bool) -> dict[str, str]:
    """Stream every planned tensor into its shard; returns each shard's sha256.

    Experts convert on WORKERS threads; a full shard is flushed and renamed on one more, so the
    workers never wait on the disk. Shards are hashed as they are written (ShardWriter).
    """
    hashes, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over experts instead: no oversubscription of small ops
    with (
        ThreadPoolExecutor(WORKERS) as pool,
        ThreadPoolExecutor(1) as finisher,
        tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar,
    ):
        finishing = []
        sink = ShardSet(
            out, plan, on_full=lambda writer: finishing.append(finisher.submit(writer.finish)), on_bytes=bar.update
        )
        try:
            done_groups = set()
            for t in plan.tensors:
                if t.source is not None:
                    copy_tensor(source, t.source, sink)
                elif t.group.prefix not in done_groups:
                    done_groups.add(t.group.prefix)
                    write_group(source, t.group, sink, device=device, pool=pool, in_flight=WORKERS + 1)
                    _release_freed_memory()
            hashes.update(f.result() for f in finishing)
        except BaseException:
            sink.abort()
            raise
        finally:
            source.close()
            torch.set_num_threads(threads)
    return hashes


def _release_freed_memory() -> None:
    """Hand memory freed by a finished group back to the OS (glibc keeps it in per-thread arenas),
    so that peak memory stays flat over many layers."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _prepare_out_dir(out: Path, source_dir: Path, *, force: bool) -> Path:
    """OUT_DIR must not be or hold the source; an existing one is replaced only with force."""
    out, src = out.resolve(), source_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise MxconvertError(out, f"is, contains or lies inside the source {src}", "Pick an OUT_DIR outside MODEL_DIR")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MxconvertError(
                out, "already exists and is not empty", "Pass --force to replace it, or pick another OUT_DIR"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MxconvertError(out, f"cannot be created ({e.strerror})", "Pick a writable OUT_DIR") from e
    return out


def _replace_quant_config(config: dict, plan: Plan, source: SourceCheckpoint, options: dict) -> None:
    text = source.text_config
    activation = {
        "alpha": text.get("swiglu_alpha", 1.702),
        "beta": text.get("swiglu_beta", 1.0),
        "limit": text.get("swiglu_limit", 7.0),
    }
    holder = config if "quantization_config" in config else config.get("text_config", config)
    holder["quantization_config"] = fmt.quantization_config(
        source=source.quant_config,
        layers={g.prefix: g.storage for g in plan.groups},
        bf16_max_tokens=options["bf16_max_tokens"],
        bf16_min_tokens=options["bf16_min_tokens"],
        activation=activation,
        version=__version__,
    )


def _side_files(source_dir: Path) -> list[Path]:
    skip = {"config.json", fmt.INDEX_NAME, SINGLE_NAME, fmt.CARD_NAME}
    return sorted(
        p
        for p in source_dir.iterdir()
        if p.is_file()
        and p.name not in skip
        and not p.name.endswith(PARTIAL)
        and any(fnmatch.fnmatch(p.name, pat) for pat in SIDE_FILES)
    )


def describe(plan: Plan, source: SourceCheckpoint) -> str:
    """The dry-run report: each MoE group and its storage, tensors in and out, bytes, peak memory."""
    gib = 2**30
    lines = [f"{'expert group':<60} {'storage':<12} {'E':>4} {'H':>6} {'I':>6}"]
    lines += [f"{g.prefix:<60} {g.storage:<12} {g.num_experts:>4} {g.hidden:>6} {g.inter:>6}" for g in plan.groups]
    in_bytes = sum(t.nbytes for t in source.tensors.values())
    lines += [
        f"tensors in: {len(source.tensors)} ({in_bytes / gib:.2f} GiB in {len(source.shards)} files)",
        f"tensors out: {len(plan.tensors)} ({plan.output_bytes / gib:.2f} GiB in {len(plan.shards)} shards)",
        f"estimated peak memory: {plan.peak_memory_estimate(in_flight=WORKERS + 1) / gib:.2f} GiB",
        "dry run: nothing written",
    ]
    return "\n".join(lines)
