"""The manifest `mxconvert.json`: written last (without it a directory is not a finished conversion),
naming every file of OUT_DIR with its size and sha256. Nothing in it names the local machine."""

import re
from pathlib import Path

from . import __version__
from . import format as fmt
from .errors import MxconvertError, plain_name, read_json, require
from .files import write_json_atomic

SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def write_manifest(out_dir: Path, *, options: dict, fingerprint: list[dict], source_id: dict, files: dict) -> None:
    """files: output file name -> sha256. The manifest names itself nowhere and is renamed into place last.
    source_id is a Hub repo id and revision, or a directory's name: never a local path."""
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "tool": {"name": fmt.PRODUCER, "version": __version__},
        "options": options,
        "source": {**source_id, "files": fingerprint},
        "files": [{"name": n, "size": (out_dir / n).stat().st_size, "sha256": files[n]} for n in sorted(files)],
    }
    write_json_atomic(out_dir / fmt.MANIFEST_NAME, manifest)


def load_manifest(out_dir: Path) -> dict:
    """The manifest, checked field by field: every file name plain, sizes and sha256s well-formed."""
    path = Path(out_dir) / fmt.MANIFEST_NAME
    if not path.exists():
        raise MxconvertError(
            out_dir,
            f"has no {fmt.MANIFEST_NAME}, so it is not a finished conversion",
            "Run the conversion again (with --resume if it was interrupted)",
        )
    fix = "Convert again (the manifest was edited, or is not mxconvert's)"
    manifest = read_json(path, fix=fix)
    if manifest.get("format_version") != fmt.FORMAT_VERSION:
        raise MxconvertError(
            path,
            f"format_version {manifest.get('format_version')!r} is unknown to mxconvert {__version__}",
            "Use the mxconvert version that wrote it, or convert again",
        )

    def need(ok: bool, field: str):
        require(ok, path, field, fix)

    tool, source, files = manifest.get("tool"), manifest.get("source"), manifest.get("files")
    need(isinstance(tool, dict) and isinstance(tool.get("version"), str), "tool.version")
    need(isinstance(manifest.get("options"), dict), "options")
    need(isinstance(source, dict) and isinstance(source.get("files"), list), "source.files")
    need(all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in source["files"]), "source.files")
    need(isinstance(files, list) and files, "files")
    names = set()
    for entry in files:
        need(isinstance(entry, dict) and set(entry) == {"name", "size", "sha256"}, "a files entry")
        name = plain_name(entry["name"], path, fix=fix)
        need(name not in names and name != fmt.MANIFEST_NAME, f"files entry {name} (twice, or the manifest)")
        need(type(entry["size"]) is int and entry["size"] >= 0, f"files entry {name}: size")
        need(isinstance(entry["sha256"], str) and SHA256.fullmatch(entry["sha256"]), f"files entry {name}: sha256")
        names.add(name)
    return manifest
