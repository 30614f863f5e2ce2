"""convert(): a MiniMax-M3 MXFP8 checkpoint in, the MI300X format of FORMAT.md out, streamed.

read headers -> plan -> OUT_DIR rules (--force, --resume) -> check every expert scale and the free disk ->
stream every tensor into its shard (recording each finished one) -> config, index, side files, card ->
manifest last -> verify (cheap part).
"""

import ctypes
import fnmatch
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, outdir
from . import format as fmt
from .card import write_model_card
from .checkpoint import SINGLE_NAME, SourceCheckpoint, resolve_model_dir
from .errors import MxconvertError, OptionError
from .manifest import sha256_file, verify, write_manifest
from .outdir import Record
from .plan import Plan, Shard, make_plan, parse_size
from .stream import check_scales, copy_tensor, write_group
from .writer import PARTIAL, ShardSet, ShardWriter, crash_point, safetensors_header, write_atomic, write_json_atomic

SIDE_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template*", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "*.py", "LICENSE*",
)  # fmt: skip
WORKERS = max(1, min(4, os.cpu_count() or 1))  # expert threads
SOURCE_FILES = ("config.json", fmt.INDEX_NAME, "*.safetensors", "README.md", *SIDE_FILES)  # what a Hub fetch needs
SMALL_FILES = 4 * 2**20  # disk allowance for config, index, card, manifest and record (each well under it)


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
    resume: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
) -> Plan:
    """Convert MODEL_DIR (a local directory or a Hub repo id) into OUT_DIR; returns the plan it followed.

    resume: go on with an interrupted conversion in OUT_DIR (same input and options), keeping its
    finished shards; plan.kept names them, plan.complete says OUT_DIR was finished already.
    push_to_hub: a Hub repo id to upload the verified result to (mxconvert.hub.push, with its defaults).
    """
    shard_bytes = _check_options(bf16, device, bf16_max_tokens, bf16_min_tokens, max_shard_size, force, resume)
    options = dict(
        long_context=long_context,
        bf16=bf16,
        bf16_max_tokens=bf16_max_tokens,
        bf16_min_tokens=bf16_min_tokens,
        max_shard_size=max_shard_size,
    )
    local_dir, source_id = resolve_model_dir(model_dir, allow_patterns=SOURCE_FILES)
    outdir.check_paths(Path(out_dir), local_dir)
    source = SourceCheckpoint(local_dir)
    try:
        plan = make_plan(source, long_context=long_context, bf16=bf16, max_shard_size=shard_bytes)
        if dry_run:
            print(describe(plan, source))
            return plan
        ident = outdir.identity(options=options, source=source, plan=plan)
        state = outdir.inspect(Path(out_dir), local_dir, force=force, resume=resume, ident=ident, workers=WORKERS)
        plan.kept, plan.complete = sorted(state.kept), state.complete
        if state.complete:  # --resume on a finished conversion of the same input and options
            verify(out_dir=state.path, full=False)
            for path in state.stale:  # a record left by a run killed just after its manifest
                path.unlink(missing_ok=True)
        else:
            _write(state, ident, source, source_id, plan, options, model_dir, device=device, progress=progress)
    finally:
        source.close()
    if push_to_hub:
        from .hub import push  # huggingface_hub's upload machinery only when asked for

        push(out_dir=state.path, repo_id=push_to_hub)
    return plan


def _write(
    state: outdir.OutDir,
    ident: dict,
    source: SourceCheckpoint,
    source_id: dict,
    plan: Plan,
    options: dict,
    model_dir: str,
    *,
    device: str,
    progress: bool,
) -> None:
    """Check, then write the shards not kept (recording each), the small files, and the manifest last."""
    todo = [shard for shard in plan.shards if shard.name not in state.kept]
    _check_before_writing(source, plan, todo, state, progress=progress)
    record = state.open(ident)
    crash_point("start")
    out = state.path
    hashes = {name: f["sha256"] for name, f in state.kept.items()}
    hashes |= _write_shards(source, plan, out, todo, record=record, device=device, progress=progress)
    for name in _write_small_files(out, source, source_id, plan, options, model_dir):
        hashes[name] = sha256_file(out / name)
    write_manifest(out, options=options, source=source, source_id=source_id, files=hashes)
    record.remove()
    try:
        verify(out_dir=out, full=False)
    except MxconvertError:
        (out / fmt.MANIFEST_NAME).unlink()  # never leave a broken output that looks finished
        raise


def _check_options(bf16, device, bf16_max_tokens, bf16_min_tokens, max_shard_size, force, resume) -> int:
    """Option values and combinations, before anything is read; returns the shard size in bytes."""
    if force and resume:
        raise OptionError(
            "--force", "and --resume exclude each other", "Pass --resume to keep finished shards, --force to start over"
        )
    if bf16 not in ("materialize", "derive"):
        raise OptionError("--bf16", f"{bf16!r} is not materialize or derive", "Pick one of the two")
    if device not in ("cpu", "cuda"):
        raise OptionError("--device", f"{device!r} is not cpu or cuda", "Pick one of the two")
    if device == "cuda" and not torch.cuda.is_available():
        raise MxconvertError("--device", "'cuda' is not available here", "Use --device cpu: the bytes are the same")
    if not 0 <= bf16_max_tokens < bf16_min_tokens:
        raise OptionError(
            "--bf16-max-tokens",
            f"{bf16_max_tokens} is not below --bf16-min-tokens {bf16_min_tokens}",
            "The native band lies between them; pick max < min",
        )
    return parse_size(max_shard_size)


def _check_before_writing(
    source: SourceCheckpoint, plan: Plan, todo: list[Shard], state: outdir.OutDir, *, progress: bool
) -> None:
    """The expert scales of every group still to write, then the free disk space. Values are checked
    as they stream instead (a second pass over 400 GB would double the reading)."""
    todo_names = {t.name for shard in todo for t in shard.tensors}
    groups = [g for g in plan.groups if any(f"{g.prefix}.{kind}" in todo_names for kind in fmt.STORED[g.storage])]
    total = sum(scale.nbytes for g in groups for slot in g.source.experts.values() for _, scale in slot.values())
    with (
        ThreadPoolExecutor(WORKERS) as pool,
        tqdm(total=total, unit="B", unit_scale=True, desc="checking scales", disable=not progress) as bar,
    ):
        check_scales(source, groups, pool=pool, on_bytes=bar.update)
    side = sum(path.stat().st_size for path in _side_files(source.dir))
    shards = sum(len(safetensors_header(shard.tensors)[0]) + shard.nbytes for shard in todo)
    outdir.check_free_space(state, needed=shards + side + SMALL_FILES)


def _write_small_files(
    out: Path, source: SourceCheckpoint, source_id: dict, plan: Plan, options: dict, model_dir: str
) -> list[str]:
    """config.json, the index, the side files and the card, after the shards; returns their names."""
    local_dir = source.dir
    config = json.loads((local_dir / "config.json").read_text())
    _replace_quant_config(config, plan, source, options)
    write_json_atomic(out / "config.json", config)
    weight_map = {t.name: shard.name for shard in plan.shards for t in shard.tensors}
    write_json_atomic(
        out / fmt.INDEX_NAME,
        {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))},
    )
    side = _side_files(local_dir)
    for path in side:
        write_atomic(out / path.name, path.read_bytes())
    card = write_model_card(
        out_dir=out,
        source=str(model_dir),
        source_repo_id=source_id.get("repo_id"),
        source_revision=source_id.get("revision"),
        source_card=local_dir / fmt.CARD_NAME if (local_dir / fmt.CARD_NAME).is_file() else None,
        options=options,
        version=__version__,
    )
    return ["config.json", fmt.INDEX_NAME, *(path.name for path in side), card.name]


def _write_shards(
    source: SourceCheckpoint, plan: Plan, out: Path, todo: list[Shard], *, record: Record, device: str, progress: bool
) -> dict[str, str]:
    """Stream every tensor of the `todo` shards into place; returns each shard's sha256.

    Experts convert on WORKERS threads; a full shard is flushed, renamed and recorded on one more, so
    the workers never wait on the disk. Shards are hashed as they are written (ShardWriter).
    """
    wanted = {t.name for shard in todo for t in shard.tensors}
    kinds: dict[str, set[str]] = {}  # expert group -> its tensors to write
    for t in plan.tensors:
        if t.group is not None and t.name in wanted:
            kinds.setdefault(t.group.prefix, set()).add(t.kind)

    def finish(writer: ShardWriter) -> tuple[str, str]:
        name, sha256 = writer.finish()
        record.finished(name, writer.size, sha256)
        crash_point("shard")
        return name, sha256

    hashes, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over experts instead: no oversubscription of small ops
    with (
        ThreadPoolExecutor(WORKERS) as pool,
        ThreadPoolExecutor(1) as finisher,
        tqdm(
            total=sum(s.nbytes for s in todo), unit="B", unit_scale=True, desc="converting", disable=not progress
        ) as bar,
    ):
        finishing = []
        sink = ShardSet(out, plan, on_full=lambda w: finishing.append(finisher.submit(finish, w)), on_bytes=bar.update)
        try:
            for t in plan.tensors:
                if t.name not in wanted:
                    continue
                if t.source is not None:
                    copy_tensor(source, t.source, sink)
                elif t.group.prefix in kinds:
                    group_kinds = kinds.pop(t.group.prefix)
                    write_group(
                        source, t.group, sink, device=device, pool=pool, in_flight=WORKERS + 1, kinds=group_kinds
                    )
                    _release_freed_memory()
                for done in [f for f in finishing if f.done()]:
                    done.result()  # a shard that failed to finish stops the run now
            hashes.update(f.result() for f in finishing)
        except BaseException:
            sink.abort()
            raise
        finally:
            torch.set_num_threads(threads)
    return hashes


def _release_freed_memory() -> None:
    """Hand memory freed by a finished group back to the OS (glibc keeps it in per-thread arenas),
    so that peak memory stays flat over many layers."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
