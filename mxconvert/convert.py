"""convert(): a MiniMax-M3 MXFP8 checkpoint in, the MI300X format of docs/FORMAT.md out, streamed.

read headers -> plan -> OUT_DIR rules (--force, --resume) -> check every expert scale and the free disk ->
stream every tensor into its shard (recording each finished one) -> config, index, side files, card ->
manifest last -> verify (cheap part).
"""

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, dryrun, outdir
from . import format as fmt
from .card import write_model_card
from .checkpoint import SourceCheckpoint
from .errors import MxconvertError, OptionError
from .files import crash_point, sha256_file, write_atomic
from .hub_source import is_hub_id, open_source
from .manifest import write_manifest
from .outputs import output_names, small_files
from .plan import Plan, Shard, make_plan, parse_size
from .stream import WORKERS, check_scales, stream_shards
from .verify import check_files, check_structure, verify
from .writer import safetensors_header

SMALL_FILES = 4 * 2**20  # disk allowance for config, index, card, manifest and record (each well under it)


@dataclass
class Conversion:
    """What convert() did: the plan it followed, and how the run went."""

    plan: Plan
    kept: list[str] = field(default_factory=list)  # shards a --resume found finished and kept
    complete: bool = False  # --resume found OUT_DIR finished already: nothing was written
    report: dict | None = None  # --dry-run: what would be read, written and held (dryrun.report)


def convert(
    *,
    model_dir: str,
    out_dir: str,
    long_context: bool = False,
    bf16: str = "derive",
    bf16_max_tokens: int = fmt.DISPATCH[0],
    bf16_min_tokens: int = fmt.DISPATCH[1],
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
    device: str = "cpu",
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> Conversion:
    """Convert MODEL_DIR (a local directory or a Hub repo id) into OUT_DIR; returns what it did.

    resume: go on with an interrupted conversion in OUT_DIR (same input and options), keeping its
    finished shards (Conversion.kept; Conversion.complete: OUT_DIR was finished already).
    dry_run: write nothing; Conversion.report says what would be read, written and held.
    force: replace an earlier conversion in OUT_DIR (only files its manifest or record names).
    push_to_hub: a Hub repo id to upload the verified result to (mxconvert.hub.push), with `private`,
    `revision` (a branch) and `token` as push takes them; the token and repo are checked before converting.
    """
    shard_bytes = _check_options(bf16, device, bf16_max_tokens, bf16_min_tokens, max_shard_size, force, resume)
    options = dict(
        long_context=long_context,
        bf16=bf16,
        bf16_max_tokens=bf16_max_tokens,
        bf16_min_tokens=bf16_min_tokens,
        max_shard_size=max_shard_size,
    )
    if push_to_hub and not dry_run:
        from .hub import check_push_target  # huggingface_hub's upload machinery only when asked for

        push_to_hub = check_push_target(repo_id=push_to_hub, private=private, token=token)
    from_hub = dry_run and is_hub_id(model_dir)  # a dry run of a Hub repo reads its headers alone
    source = open_source(model_dir, headers_only=dry_run, token=token)  # every input read and checked once
    try:
        if not from_hub:
            outdir.check_paths(Path(out_dir), source.dir, source.input_paths())
        plan = make_plan(source, long_context=long_context, bf16=bf16, max_shard_size=shard_bytes)
        if dry_run:  # the plan and its report (dryrun.render prints it); nothing written
            return Conversion(plan, report=dryrun.report(plan, source, out_dir=Path(out_dir), options=options,
                                                         from_hub=from_hub))  # fmt: skip
        with outdir.locked(Path(out_dir)) as out:
            ident = outdir.identity(
                options=options, fingerprint=source.fingerprint(), shards={s.name: s.nbytes for s in plan.shards},
                outputs=output_names(source, plan),
            )  # fmt: skip
            state = outdir.inspect(out, source.dir, force=force, resume=resume, ident=ident, workers=WORKERS)
            done = Conversion(plan, kept=sorted(state.kept), complete=state.complete)
            if state.complete:  # --resume on a finished conversion of the same input and options
                for path in state.doomed:  # a record left by a run killed just after its manifest
                    path.unlink(missing_ok=True)
                verify(out_dir=out, full=False)
            else:
                if force and state.doomed:
                    size = outdir.human(sum(p.stat().st_size for p in state.doomed))
                    print(f"Replacing the conversion in {out}: deleting its {len(state.doomed)} files ({size}).",
                          file=sys.stderr)  # fmt: skip
                _write(state, ident, source, plan, options, device=device, progress=progress, repo_id=push_to_hub)
    finally:
        source.close()
    if push_to_hub and not dry_run:
        _push_after(Path(out_dir), push_to_hub, private=private, revision=revision, token=token)
    return done


def _push_after(out: Path, repo_id: str, *, private: bool, revision: str | None, token: str | None) -> None:
    """The push that follows a conversion; if it fails, the conversion stands and the line says how to go on."""
    from .hub import push

    try:
        push(out_dir=out, repo_id=repo_id, private=private, revision=revision, token=token)
    except MxconvertError as e:
        flags = " --private" * private + (f" --revision {revision}" if revision else "")
        raise MxconvertError(
            e.subject, f"{e.problem} (the conversion in {out} is finished and verified; only the push failed)",
            f"{e.fix + '; then resume' if e.fix else 'Resume'} the push with: mxconvert push {out} {repo_id}{flags}",
        ) from None  # fmt: skip


def _write(
    state: outdir.OutDir,
    ident: dict,
    source: SourceCheckpoint,
    plan: Plan,
    options: dict,
    *,
    device: str,
    progress: bool,
    repo_id: str | None,
) -> None:
    """Check, then write the shards not kept (recording each), the small files, check the whole, and
    write the manifest last: nothing that can fail comes after it."""
    todo = [shard for shard in plan.shards if shard.name not in state.kept]
    _check_before_writing(source, plan, todo, state, progress=progress)
    record = state.open(ident)
    crash_point("start")
    out = state.path

    def finished(name: str, size: int, sha256: str) -> None:
        record.finished(name, size, sha256)
        crash_point("shard")

    hashes = {name: f["sha256"] for name, f in state.kept.items()}
    hashes |= stream_shards(source, plan, out, todo, on_finished=finished, device=device, progress=progress)
    for name, data in small_files(source, plan, options).items():
        write_atomic(out / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    card = write_model_card(
        out_dir=out,
        source=source.ident.get("repo_id") or source.ident["name"],
        source_repo_id=source.ident.get("repo_id"),
        source_revision=source.ident.get("revision"),
        source_card=source.card,
        options=options,
        version=__version__,
        source_files=ident["source"]["files"],
        repo_id=repo_id,  # the card names the repo it is pushed to, when converting for one
    )
    hashes[card.name] = sha256_file(card)
    check_files(out, {name: {"size": (out / name).stat().st_size} for name in hashes}, ignore=(outdir.RECORD_NAME,))
    check_structure(out, set(hashes))
    write_manifest(out, options=options, fingerprint=ident["source"]["files"], source_id=source.ident, files=hashes)
    record.remove()


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
        tqdm(total=total, unit="B", unit_scale=True, desc="checking scales", disable=None if progress else True) as bar,
    ):
        check_scales(source, groups, pool=pool, on_bytes=bar.update)
    side = sum(len(data) for data in source.side_files.values())
    shards = sum(len(safetensors_header(shard.tensors)[0]) + shard.nbytes for shard in todo)
    outdir.check_free_space(state, needed=shards + side + SMALL_FILES)
