"""A seeded fuzzer of the converter (issue 12, item 20), through the Python API.

Each case copies a tiny checkpoint, applies 1-3 mutations drawn from `random.Random(seed)` (safetensors
headers and length prefixes, truncated, extended or flipped shards, config.json and index as JSON and as
bytes, files replaced by directories, FIFOs or links, deleted files) and converts with a small random
--max-shard-size. The oracle, for every case:
- either convert returns, `verify(out_dir, source=src)` passes and safetensors opens every output shard,
- or convert raises one MxconvertError, one line long, and OUT_DIR holds nothing that looks finished;
- and in both, nothing outside OUT_DIR changed (the source after mutation, and a sentinel directory
  beside it that mutations link to), and no byte of the sentinel reached the output or the message.

CI runs MXCONVERT_FUZZ_CASES seeds (default 500) from MXCONVERT_FUZZ_FIRST (default 0); set them to run
thousands by hand. A failure names its seed: `pytest 'tests/test_fuzz.py::test_fuzz[123]'` replays it, and
MXCONVERT_FUZZ_SEEDS=5474,11200 runs just those seeds (any, in range or not).
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import stat
import tempfile
import threading
import traceback
from pathlib import Path

import pytest
from checkpoint_edits import INDEX, MANIFEST, add_tensor, drop_tensors, edit_tensors, read_shard, rename_tensor
from make_tiny_checkpoint import make_tiny_checkpoint
from safetensors import safe_open

from mxconvert.convert import convert
from mxconvert.errors import MxconvertError
from mxconvert.verify import verify

CASES = int(os.environ.get("MXCONVERT_FUZZ_CASES", "500"))
FIRST = int(os.environ.get("MXCONVERT_FUZZ_FIRST", "0"))
SEEDS = [int(x) for x in os.environ.get("MXCONVERT_FUZZ_SEEDS", "").split(",") if x.strip()]
TIMEOUT = float(os.environ.get("MXCONVERT_FUZZ_TIMEOUT", "30"))  # a tiny case takes well under 1 s
TOKEN = b"mxfuzz-sentinel-5e1d9c"  # the sentinel files' content: it must never reach OUT_DIR
SMALL = dict(
    hidden_size=128,
    intermediate_size=32,
    dense_intermediate_size=32,
    vocab_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_hidden_layers=3,
    num_dense_layers=1,
)
# Few layers and experts keep a case near 40 ms (500 in ~20 s); variants: VL and text-only, index or one shard,
# the three namings, MTP, and a MoE layer 0 (--long-context's BF16 band). demo=False: the edge bytes.
BASES = {
    "vl": dict(SMALL, num_experts=2, num_shards=3),
    "text": dict(SMALL, num_experts=3, num_shards=1, text_only=True, naming="hf", mtp=False, num_dense_layers=0),
    "compressed": dict(SMALL, num_experts=2, num_shards=2, naming="compressed", top_k=1),
}
SIZE = {
    **dict.fromkeys(["BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ"], 1),
    **dict.fromkeys(["I16", "U16", "F16", "BF16"], 2),
    **dict.fromkeys(["I32", "U32", "F32"], 4),
    **dict.fromkeys(["I64", "U64", "F64"], 8),
}  # the dtypes safetensors reads, with their sizes; then spellings it does not read
DTYPES = [*SIZE, "", "BOGUS", "f8_e4m3", "bf16", "F8_E4M3 ", "F4", "C64"]
# Digits other scripts spell, which str.isdigit() accepts and int() may not (issue 12, item 19)
OTHER_DIGITS = ["\u0660", "\u06f0", "\u0966", "\uff10", "\u00b2", "\u2070", "\u2080", "\u2460", "\U0001d7ce"]
JSON_FILES = ["config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
SIDE_NAMES = (  # side-file patterns the converter copies, and names it should not
    "LICENSE vocab.txt tokenizer.model merges.txt special_tokens_map.json x.tiktoken chat_template.json extra.py "
    "notes.bin model.safetensors model-00009-of-00009.safetensors"
).split()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-bases")
    return {name: make_tiny_checkpoint(root / name, seed=7, demo=False, **kw) for name, kw in BASES.items()}


# JSON written by hand: duplicate keys, raw tokens (huge numbers, NaN, deep nesting), lone surrogates --------


class Raw(str):
    """JSON text written as it is."""


class Dup(list):
    """A JSON object as (key, value) pairs: keys may repeat."""


def dump(x, ascii_only=False) -> str:
    if isinstance(x, Raw):
        return str(x)
    if isinstance(x, (Dup, dict)):
        pairs = x if isinstance(x, Dup) else x.items()
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}" for k, v in pairs) + "}"
    if isinstance(x, list):
        return "[" + ",".join(dump(v, ascii_only) for v in x) + "]"
    return json.dumps(x, ensure_ascii=ascii_only)


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8, on purpose


def nodes(data) -> list[tuple[object, object]]:
    """(container, key) of every value inside `data`, in a stable order, walked without recursion."""
    out, stack = [], [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            if isinstance(v, (dict, list)) and not isinstance(v, Raw):
                stack.append(v)
    return out


def weird_value(rng: random.Random, old=None):
    deep = rng.choice([63, 64, 65, 200, 5000, 100_000])
    # fmt: off
    pool = [
        None, True, False, 0, -1, 1, 31, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, 1e308, -0.0, Raw("1" * 5000),
        Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), "", "x", "F8_E4M3", "BF16",
        "BOGUS", "f8_e4m3", "U8", "../x", "/etc/passwd", "\ud800", "a\nb", rng.choice(OTHER_DIGITS), "x" * 10_000, [],
        {}, [1, 2], [0], [-1], [2**64], [[1]], [None], {"a": 1}, Raw("[" * deep + "]" * deep),
        Raw('{"a":' * deep + "1" + "}" * deep), "sparse", "dense", "mxfp8", "compressed-tensors", [1, 32], [1, 16],
    ]
    # fmt: on
    if isinstance(old, bool) or old is None:
        pass
    elif isinstance(old, int):
        pool += [old + 1, old - 1, -old, old * 2, old // 2, float(old), str(old), [old]] * 3
    elif isinstance(old, float):
        pool += [int(old), -old, str(old)]
    elif isinstance(old, str):
        pool += [old + "x", old.upper(), old.lower(), old[:-1], [old], old + "\x00", " " + old] * 2
    elif isinstance(old, list):
        pool += [old[:-1], old + old[-1:], old[::-1], [str(v) for v in old], {"0": old}, old * 2] * 2
    elif isinstance(old, dict):
        pool += [list(old), {}, list(old.values())]
    return rng.choice(pool)


def weird_key(rng: random.Random) -> str:
    # fmt: off
    return rng.choice([
        "", "__metadata__", "dtype", "shape", "data_offsets", "weight_map", "metadata", "x", "\u00e4", "\x00",
        "\ud800", "a" * 300, "quantization_config", "text_config", "num_local_experts", rng.choice(OTHER_DIGITS),
    ])
    # fmt: on


def mutate_data(rng: random.Random, data):
    """One structural change to parsed JSON: (new document, what was done)."""
    found = nodes(data)
    op = rng.choice(["set", "set", "set", "delete", "delete", "add", "rename", "dup", "top"])
    if op == "top" or not found:
        new = weird_value(rng, data)
        return new, f"document -> {short(new)}"
    container, key = rng.choice(found)
    if op == "set":
        new = weird_value(rng, container[key])
        container[key] = new
        return data, f"[{short(key)}] = {short(new)}"
    if op == "delete":
        container.pop(key)
        return data, f"delete [{short(key)}]"
    dicts = [c[k] for c, k in found if isinstance(c[k], dict)] + ([data] if isinstance(data, dict) else [])
    if not dicts:
        return mutate_data(rng, data)
    target = rng.choice(dicts)
    if op == "add":
        k, v = weird_key(rng), weird_value(rng)
        target[k] = v
        return data, f"add [{short(k)}] = {short(v)}"
    if not target:
        return data, "nothing to rename"
    old = rng.choice(list(target))
    if op == "rename":
        new_key = rng.choice([weird_key(rng), old + "x", old.upper(), " " + old, rng.choice(list(target))])
        items = [(new_key if k == old else k, v) for k, v in target.items()]
        target.clear()
        target.update(items)  # a rename onto an existing key drops one of them
        return data, f"rename key {short(old)} -> {short(new_key)}"
    # dup: the key twice, the second value changed or not
    pairs = Dup(target.items())
    pairs.insert(rng.randrange(len(pairs) + 1), (old, rng.choice([target[old], weird_value(rng, target[old])])))
    for c, k in found:  # put the Dup where the dict was
        if c[k] is target:
            c[k] = pairs
            return data, f"duplicate key {short(old)}"
    return pairs, f"duplicate top key {short(old)}"


def mutate_text(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """A change to a JSON file's bytes: encodings, byte-order marks, invalid UTF-8, truncation, garbage."""
    op = rng.choice("bom utf16 utf16le utf32 invalid invalid truncate garbage empty nul nan space".split())
    if op == "bom":
        return b"\xef\xbb\xbf" + raw, "UTF-8 byte-order mark"
    if op in ("utf16", "utf16le", "utf32"):
        codec = {"utf16": "utf-16", "utf16le": "utf-16-le", "utf32": "utf-32"}[op]
        return raw.decode("utf-8", "surrogatepass").encode(codec, "surrogatepass"), codec
    if op == "invalid":
        at, bad = rng.randrange(len(raw) + 1), rng.choice([b"\xff", b"\x80", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80"])
        return raw[:at] + bad + raw[at:], f"{bad!r} inserted at byte {at}"
    if op == "truncate":
        at = rng.randrange(len(raw) + 1)
        return raw[:at], f"truncated to {at} bytes"
    if op == "garbage":
        tail = rng.choice([b"x", b"}", b"\x00", b"{}", b"\n\n", b",", b" " * 1000])
        return raw + tail, f"{short(tail)} appended"
    if op == "empty":
        return b"", "emptied"
    if op == "nul":
        at = rng.randrange(len(raw) + 1)
        return raw[:at] + b"\x00" + raw[at:], f"NUL inserted at byte {at}"
    if op == "nan":
        m = list(re.finditer(rb"(?<=[:\[,])\s*-?[0-9][0-9.eE+-]*", raw))
        if not m:
            return raw + b" ", "space appended"
        x = rng.choice(m)
        tok = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"0x10", b"01", b"+1", b"1" * 5000])
        return raw[: x.start()] + tok + raw[x.end() :], f"number at {x.start()} -> {short(tok)}"
    return b"\n\t " + raw + b"\r\n", "surrounding whitespace"  # valid JSON still


def short(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:60] + f"...({len(r)} chars)"


# The case's world: root/src (the source), root/sentinel (outside it), root/out -----------------------------


class Case:
    """One case's world under root: the source (plain, or a Hub cache snapshot of links into blobs/), the
    sentinel directory beside it, OUT_DIR, the RNG, and the log of mutations applied."""

    def __init__(self, rng: random.Random, root: Path, base: Path, hub: bool):
        self.rng, self.root = rng, root
        self.sentinel = root / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "secret.txt").write_bytes(TOKEN + b"\n")
        (self.sentinel / "secret.json").write_text(json.dumps({"weight_map": {}, "token": TOKEN.decode()}))
        (self.sentinel / "sub").mkdir()
        (self.sentinel / "sub" / "secret.safetensors").write_bytes(tiny_shard(TOKEN))
        if hub:  # a Hugging Face cache snapshot: every file a relative link into the repo's blobs/
            repo = root / "models--org--tiny"
            self.src = repo / "snapshots" / "0123abc"
            self.src.mkdir(parents=True)
            (repo / "blobs").mkdir()
            for p in sorted(base.rglob("*")):
                rel = p.relative_to(base)
                if p.is_dir():
                    (self.src / rel).mkdir()
                    continue
                blob = repo / "blobs" / hashlib.sha256(p.read_bytes() + str(rel).encode()).hexdigest()
                shutil.copyfile(p, blob)
                os.symlink(os.path.relpath(blob, (self.src / rel).parent), self.src / rel)
            self.repo = repo
        else:
            self.src = root / "src"
            shutil.copytree(base, self.src)
            self.repo = self.src
        self.out = root / "out"
        self.log: list[str] = []

    # what is there

    def names(self) -> list[str]:
        return sorted(os.listdir(self.src))

    def writable(self, path: Path) -> bool:
        """A regular file (links followed) that really lies in the source: safe to read and rewrite."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return stat.S_ISREG(os.stat(real).st_mode) and (real == self.repo or self.repo in real.parents)

    def shards(self) -> list[Path]:
        return [self.src / n for n in self.names() if n.endswith(".safetensors") and self.writable(self.src / n)]

    def parsed_shards(self) -> list[tuple[Path, dict, dict]]:
        out = []
        for path in self.shards():
            try:
                header, tensors = read_shard(path)
                if all(isinstance(e, dict) and isinstance(e.get("data_offsets"), list) for e in header.values()):
                    out.append((path, header, tensors))
            except Exception:  # noqa: BLE001 - a shard an earlier mutation broke is not edited by name
                continue
        return out

    def index_ok(self) -> bool:
        """The checkpoint_edits helpers keep the index in step: only when it is absent or still sound."""
        path = self.src / INDEX
        if not os.path.lexists(path):
            return True
        if not self.writable(path):
            return False
        try:
            return isinstance(json.loads(path.read_bytes()).get("weight_map"), dict)
        except (ValueError, AttributeError):
            return False

    def pick_tensor(self, pattern: str = "") -> tuple[Path, str, dict] | None:
        found = [(p, n, h[n]) for p, h, _ in self.parsed_shards() for n in h if re.search(pattern, n)]
        return self.rng.choice(found) if found else None


def tiny_shard(token: bytes) -> bytes:
    """A valid safetensors file whose metadata and data hold the sentinel token."""
    header = {
        "__metadata__": {"token": token.decode()},
        "t": {"dtype": "U8", "shape": [len(token)], "data_offsets": [0, len(token)]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + token


def remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# Mutations: each returns what it did, or None where it does not apply --------------------------------------


def m_header_json(c: Case):
    """A JSON mutation of one shard's header, rewritten with its new length; the data left as it is."""
    shards = c.shards()
    if not shards:
        return None
    path = c.rng.choice(shards)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        return None
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError:
        return None
    if c.rng.random() < 0.25:
        new, what = mutate_text(c.rng, raw[8 : 8 + n])
    else:
        header, what = mutate_data(c.rng, header)
        new = encode(dump(header, ascii_only=c.rng.random() < 0.3))
    if c.rng.random() < 0.7:
        new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    return f"{path.name} header: {what}"


def m_entry(c: Case):
    """One field of one header entry set to a near miss: other dtype, shape or offsets (data unchanged)."""
    picked = c.pick_tensor()
    if picked is None:
        return None
    path, name, entry = picked
    field = c.rng.choice(["dtype", "dtype", "shape", "shape", "data_offsets"])
    old = entry.get(field)
    if field == "dtype":
        new = c.rng.choice(DTYPES)
    elif field == "shape" and isinstance(old, list) and old and all(type(d) is int for d in old):
        numel = 1
        for d in old:
            numel *= d
        # fmt: off
        new = c.rng.choice([old[::-1], [numel], old + [1], [1] + old, old[:-1], [d + 1 for d in old], [0] * len(old),
                            [-d for d in old], [numel, 0], [float(d) for d in old], [str(d) for d in old], []])
        # fmt: on
    else:
        new = weird_value(c.rng, old)

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[name][field] = new
    text = encode(dump(header))
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return f"{path.name}: {name} {field} {short(old)} -> {short(new)}"


def m_length_prefix(c: Case):
    shards = c.shards()
    if not shards:
        return None
    path = c.rng.choice(shards)
    raw = path.read_bytes()
    n, size = int.from_bytes(raw[:8].ljust(8, b"\0"), "little"), len(raw)
    # fmt: off
    new = c.rng.choice([0, 1, 2, 7, 8, n - 1, n + 1, n - 8, n + 8, size - 8, size - 7, size, 2**32, 2**63, 2**64 - 1,
                        100_000_001, int.from_bytes(c.rng.randbytes(8), "little")])
    # fmt: on
    new %= 2**64
    path.write_bytes(new.to_bytes(8, "little") + raw[8:])
    return f"{path.name}: header length {n} -> {new}"


def m_truncate(c: Case):
    shards = c.shards()
    if not shards:
        return None
    path = c.rng.choice(shards)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8].ljust(8, b"\0"), "little")
    at = c.rng.choice(
        [0, 1, 7, 8, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(raw) - 1, len(raw) - 2, c.rng.randrange(len(raw) + 1)]
    )
    at = max(0, min(at, len(raw)))
    path.write_bytes(raw[:at])
    return f"{path.name}: truncated from {len(raw)} to {at} bytes"


def m_extend(c: Case):
    shards = c.shards()
    if not shards:
        return None
    path = c.rng.choice(shards)
    tail = c.rng.choice([b"\0", b"\0" * 8, c.rng.randbytes(c.rng.randint(1, 64)), TOKEN])
    with open(path, "ab") as f:
        f.write(tail)
    return f"{path.name}: {len(tail)} bytes appended"


def m_flip(c: Case):
    """Bytes changed in place: anywhere (header included) or in the data of one tensor (NaN codes too)."""
    if c.rng.random() < 0.5:
        picked = c.pick_tensor()
        if picked is None:
            return None
        path, name, entry = picked
        raw = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(raw[:8], "little") + entry["data_offsets"][0]
        end = 8 + int.from_bytes(raw[:8], "little") + entry["data_offsets"][1]
        if end <= start:
            return None
        spots = [start, end - 1] + [c.rng.randrange(start, end) for _ in range(3)]
        at, byte = c.rng.choice(spots), c.rng.choice([0x7F, 0xFF, 0x00, 0x80, 0xFE, c.rng.randrange(256)])
        raw[at] = byte
        path.write_bytes(bytes(raw))
        return f"{path.name}: {name} byte {at - start} -> {byte:#x}"
    shards = c.shards()
    if not shards:
        return None
    path = c.rng.choice(shards)
    raw = bytearray(path.read_bytes())
    if not raw:
        return None
    spots = [c.rng.randrange(len(raw)) for _ in range(c.rng.randint(1, 6))]
    for at in spots:
        raw[at] ^= c.rng.randrange(1, 256)
    path.write_bytes(bytes(raw))
    return f"{path.name}: bytes {spots} flipped"


# Spellings that swap one projection or scale name for another
# fmt: off
SWAPS = [("w1.", "gate_proj."), ("w3.", "w1."), ("gate_proj.", "w1."), ("down_proj.", "w2."),
         ("weight_scale_inv", "weight_scale"), ("weight_scale", "weight_scale_inv"), (".weight", ".weight_scale_inv"),
         (".weight_scale_inv", ".weight"), ("experts.", "Experts.")]
# fmt: on


def alias(rng: random.Random, name: str) -> str:
    """Another spelling of a tensor name: expert or layer indices respelled, projections swapped, a
    converter-generated name, or a plain oddity."""
    e = re.search(r"experts\.([0-9]+)\.", name)
    layer = re.search(r"layers\.([0-9]+)\.", name)
    choices = []
    if e:
        d = e[1]
        bump = str(int(d) + rng.choice([1, 2, 3, 100]))
        other = "".join(chr(ord(rng.choice(OTHER_DIGITS)) + int(x)) if rng.random() < 0.8 else x for x in d)
        spell = rng.choice(
            ["0" + d, d + "0", "+" + d, " " + d, bump, "-1", other, str(10**25), "0" if d != "0" else "1"]
        )
        choices.append(name[: e.start(1)] + spell + name[e.end(1) :])
        choices.append(
            name[: e.start()]
            + "experts."
            + rng.choice(["w13_weight", "w2_weight", "w13_weight_scale", "w13_weight_bf16"])
        )
        for a, b in SWAPS:
            if a in name:
                choices.append(name.replace(a, b, 1))
    if layer:
        d = layer[1]
        spell = rng.choice(["0" + d, str(int(d) + 1), str(int(d) + 50), rng.choice(OTHER_DIGITS)])
        choices.append(name[: layer.start(1)] + spell + name[layer.end(1) :])
    # fmt: off
    choices += [name + "x", name.upper(), "", "__metadata__", name + "\n", "../" + name, name.replace(".", "/", 1),
                name + "\ud800", "\ufeff" + name, "x" * 300, "model.layers.1.block_sparse_moe.experts"]
    # fmt: on
    return rng.choice(choices)


def m_rename(c: Case):
    if not c.index_ok():
        return None
    picked = c.pick_tensor(r"experts\." if c.rng.random() < 0.6 else "")
    if picked is None:
        return None
    path, name, _ = picked
    new = alias(c.rng, name)
    edit_tensors(c.src, path, lambda h, t: (h.__setitem__(new, h.pop(name)), t.__setitem__(new, t.pop(name))))
    return f"{path.name}: rename {name} -> {short(new)}"


def m_drop(c: Case):
    if not c.index_ok():
        return None
    shards = c.parsed_shards()
    if not shards:
        return None
    everything = [(p, n) for p, h, _ in shards for n in h]
    how = c.rng.choice(["one", "one", "expert", "layer", "scales", "shard", "experts"])
    if how == "one" or not everything:
        gone = [c.rng.choice(everything)] if everything else []
    else:
        probe = c.rng.choice(everything)[1]
        key = {
            "expert": r"^(.*experts\.[0-9]+\.)",
            "layer": r"^(.*layers\.[0-9]+\.)",
            "scales": r"^(.*)\.[^.]*$",
            "shard": None,
            "experts": r"(experts\.)",
        }[how]
        if how == "shard":
            p0 = c.rng.choice(shards)[0]
            gone = [(p, n) for p, n in everything if p == p0]
        elif how == "scales":
            gone = [(p, n) for p, n in everything if n.endswith(("weight_scale_inv", "weight_scale"))]
        else:
            m = re.search(key, probe)
            if not m:
                return None
            gone = [(p, n) for p, n in everything if n.startswith(m[1]) or (how == "experts" and m[1] in n)]
    for path, name in gone:
        edit_tensors(c.src, path, lambda h, t, name=name: t.pop(name))
    return f"drop {len(gone)} tensors ({how}): {short([n for _, n in gone[:3]])}"


def m_add(c: Case):
    """A tensor added at the end of a shard: a new or colliding name, any dtype, shapes incl. zero-size."""
    if not c.index_ok():
        return None
    shards = c.parsed_shards()
    if not shards:
        return None
    path, header, _ = c.rng.choice(shards)
    others = [(p, n, h[n]) for p, h, _ in shards for n in h]
    kind = c.rng.choice(["new", "new", "alias", "copy"])
    if kind == "copy" and others:  # the same tensor again, maybe in another shard
        _, name, entry = c.rng.choice(others)
        dtype, shape = entry["dtype"], entry["shape"]
    else:
        if kind == "alias" and others:
            name = alias(c.rng, c.rng.choice(others)[1])
        else:
            # fmt: off
            name = c.rng.choice(["extra.weight", "language_model.model.layers.0.extra.weight", "model.norm.bias",
                                 "lm_head.bias", "mtp.0.block_sparse_moe.experts.0.w1.weight", "z" * 200])
            # fmt: on
        dtype = c.rng.choice(DTYPES)
        shape = c.rng.choice([[], [0], [1], [4], [2, 3], [0, 8], [1, 0, 5], [32, 128], [128, 32], [2**40, 0]])
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * SIZE.get(dtype, 1)
    if c.rng.random() < 0.15:
        nbytes = max(0, nbytes + c.rng.choice([-1, 1, 8]))
    nbytes = min(nbytes, 1 << 20)
    if name in header:
        return None
    add_tensor(c.src, path, name, dtype, list(shape), c.rng.randbytes(nbytes))
    return f"{path.name}: add {short(name)} {dtype} {shape} ({nbytes} bytes)"


def m_restructure(c: Case):
    """Harmless in principle: a shard's tensors reordered, or one tensor moved to another shard."""
    if not c.index_ok():
        return None
    shards = c.parsed_shards()
    if not shards:
        return None
    path, header, tensors = c.rng.choice(shards)
    if c.rng.random() < 0.5 or len(shards) < 2 or not tensors:

        def shuffle(h, t):
            items = list(t.items())
            c.rng.shuffle(items)
            t.clear()
            t.update(items)

        edit_tensors(c.src, path, shuffle)
        return f"{path.name}: tensors reordered"
    name = c.rng.choice(list(tensors))
    dest = c.rng.choice([p for p, _, _ in shards if p != path])
    entry, data = header[name], tensors[name]
    drop_tensors_in(c, path, name)
    add_tensor(c.src, dest, name, entry["dtype"], entry["shape"], data)
    return f"move {name} from {path.name} to {dest.name}"


def drop_tensors_in(c: Case, path: Path, name: str) -> None:
    if os.path.lexists(c.src / INDEX):
        drop_tensors(c.src, [name])  # the helper finds the shard through the index
    else:
        edit_tensors(c.src, path, lambda h, t: t.pop(name))


def m_rename_via_index(c: Case):
    """rename_tensor as the error tests use it (index present): the index and shard stay consistent."""
    if not os.path.lexists(c.src / INDEX) or not c.index_ok():
        return None
    weight_map = json.loads((c.src / INDEX).read_bytes())["weight_map"]
    names = [n for n, s in weight_map.items() if isinstance(s, str) and c.writable(c.src / s)]
    if not names:
        return None
    name = c.rng.choice(names)
    try:
        header, _ = read_shard(c.src / weight_map[name])
    except Exception:  # noqa: BLE001 - broken by an earlier mutation
        return None
    if name not in header:
        return None
    new = alias(c.rng, name)
    if new in header:
        return None
    rename_tensor(c.src, name, new)
    return f"rename {name} -> {short(new)} (index too)"


def m_json_file(c: Case):
    """config.json, the index or a JSON side file: a structural change, or one to its bytes."""
    present = [n for n in JSON_FILES if c.writable(c.src / n)]
    if not present:
        return None
    name = c.rng.choice(present + ["config.json"] * ("config.json" in present) * 2)
    path = c.src / name
    raw = path.read_bytes()
    if c.rng.random() < 0.35:
        new, what = mutate_text(c.rng, raw)
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        data, what = mutate_data(c.rng, data)
        new = encode(dump(data, ascii_only=c.rng.random() < 0.3))
    path.write_bytes(new)
    return f"{name}: {what}"


CONFIG_KEYS = (
    "num_local_experts hidden_size intermediate_size num_hidden_layers first_k_dense_replace mlp_layer_types "
    "moe_layer_freq num_mtp_modules num_experts_per_tok swiglu_alpha swiglu_limit shared_intermediate_size "
    "n_shared_experts architectures model_type"
).split()
QUANT_KEYS = "quant_method weight_block_size ignored_layers ignore config_groups format activation_scheme".split()


def m_config(c: Case):
    """A key of config.json that the converter reads, set to a near miss or removed."""
    path = c.src / "config.json"
    if not c.writable(path):
        return None
    try:
        config = json.loads(path.read_bytes())
        text = config.get("text_config", config)
        quant = config.get("quantization_config") or text.get("quantization_config")
    except (ValueError, AttributeError):
        return None
    if not isinstance(text, dict) or not isinstance(quant, dict):
        return None
    op = c.rng.choice(["text", "text", "text", "quant", "quant", "move_quant", "flatten", "layer_types"])
    if op == "move_quant" and "quantization_config" in config and "text_config" in config:
        text["quantization_config"] = config.pop("quantization_config")
        what = "quantization_config moved into text_config"
    elif op == "flatten" and "text_config" in config:
        config = {**config.pop("text_config"), **config}
        what = "text_config flattened into the top level"
    elif op == "layer_types" and isinstance(text.get("mlp_layer_types"), list) and text["mlp_layer_types"]:
        types = text["mlp_layer_types"]
        k = c.rng.randrange(len(types))
        types[k] = c.rng.choice(["sparse", "dense", "Sparse", None, 1])
        if c.rng.random() < 0.5 and isinstance(text.get("moe_layer_freq"), list) and k < len(text["moe_layer_freq"]):
            text["moe_layer_freq"][k] = int(types[k] == "sparse")
        what = f"mlp_layer_types[{k}] -> {short(types[k])}"
    else:
        holder, keys = (quant, QUANT_KEYS) if op == "quant" else (text, CONFIG_KEYS)
        key = c.rng.choice(keys)
        if c.rng.random() < 0.2:
            holder.pop(key, None)
            what = f"{key} removed"
        else:
            holder[key] = weird_value(c.rng, holder.get(key))
            what = f"{key} -> {short(holder[key])}"
    path.write_bytes(encode(dump(config)))
    return f"config.json: {what}"


def m_index(c: Case):
    """The index's weight_map emptied, or an entry sent elsewhere (other shard, missing, outside)."""
    path = c.src / INDEX
    if not c.writable(path):
        return None
    try:
        index = json.loads(path.read_bytes())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return None
    op = c.rng.choice(["empty", "target", "target", "target", "delete", "add", "total", "all_to_one"])
    shards = sorted({v for v in weight_map.values() if isinstance(v, str)})
    if op == "empty" or not weight_map:
        index["weight_map"] = {}
        what = "weight_map emptied"
    elif op == "target":
        name = c.rng.choice(list(weight_map))
        outside = str(c.sentinel / "sub" / "secret.safetensors")
        # fmt: off
        dest = c.rng.choice(shards + ["missing.safetensors", "../sentinel/sub/secret.safetensors", "", outside,
                                      ".", "..", "config.json", "model.safetensors", "original", "original/notes.bin",
                                      5, None])
        # fmt: on
        weight_map[name] = dest
        what = f"{name} -> {short(dest)}"
    elif op == "delete":
        name = c.rng.choice(list(weight_map))
        del weight_map[name]
        what = f"{name} removed"
    elif op == "add":
        name = c.rng.choice(["ghost.weight", alias(c.rng, c.rng.choice(list(weight_map)))])
        weight_map[name] = c.rng.choice(shards) if shards else "x"
        what = f"{short(name)} added"
    elif op == "all_to_one" and shards:
        target = c.rng.choice(shards)
        index["weight_map"] = {k: target for k in weight_map}
        what = f"every entry -> {target}"
    else:
        index.setdefault("metadata", {})["total_size"] = odd_total(c.rng)
        what = f"total_size -> {index['metadata']['total_size']!r}"
    path.write_bytes(encode(dump(index)))
    return f"index: {what}"


def odd_total(rng: random.Random):
    return rng.choice([0, -1, 1, 2**64, "12", None, 10**400])


def file_targets(c: Case) -> list[str]:
    names = c.names()
    heavy = [n for n in names if n in ("config.json", INDEX) or n.endswith(".safetensors")]
    return names + heavy * 2


def m_replace(c: Case):
    """A file replaced by a directory, a FIFO or a link (inside the source, dangling, looping, to a device,
    or out to the sentinel), or deleted."""
    targets = file_targets(c)
    if not targets:
        return None
    name = c.rng.choice(targets)
    path = c.src / name
    kinds = "delete delete dir dir fifo fifo link_in link_out link_out moved_out hub_blob dangling loop device chain"
    kind = c.rng.choice(kinds.split())
    others = [n for n in c.names() if n != name]
    if kind in ("link_in", "hub_blob", "chain", "moved_out") and not c.writable(path):
        kind = "delete"
    if kind == "delete":
        remove(path)
    elif kind == "dir":
        remove(path)
        path.mkdir()
        if c.rng.random() < 0.5:
            (path / "inner.safetensors").write_bytes(b"\0" * 16)
    elif kind == "fifo":
        remove(path)
        os.mkfifo(path)
    elif kind == "link_in" and others:  # another input's bytes under this name
        dest = c.rng.choice(others)
        remove(path)
        os.symlink(dest, path)
        kind = f"link to {dest}"
    elif kind == "hub_blob":  # a link into the source's own blobs/, as a Hub snapshot has: legal
        blobs = c.src / "blobs"
        blobs.mkdir(exist_ok=True)
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        shutil.copyfile(path, blob)
        remove(path)
        os.symlink(os.path.relpath(blob, c.src), path)
    elif kind == "chain":  # a -> b -> real file, all inside
        real = c.src / f".{name}.real"
        shutil.copyfile(path, real)
        remove(path)
        os.symlink(real.name, c.src / f".{name}.hop")
        os.symlink(f".{name}.hop", path)
    elif kind in ("link_out", "moved_out"):
        if kind == "moved_out":  # the real bytes, but outside the source: still not ours to read
            dest = c.sentinel / name
            if os.path.lexists(dest):
                return None
            shutil.copyfile(path, dest)
        else:
            dest = c.sentinel / c.rng.choice(["secret.txt", "secret.json", "sub/secret.safetensors", "sub", "."])
        remove(path)
        os.symlink(dest if c.rng.random() < 0.5 else os.path.relpath(dest, c.src), path)
        kind = f"{kind} -> {os.path.relpath(dest, c.root)}"
    elif kind == "dangling":
        remove(path)
        os.symlink("no-such-file", path)
    elif kind == "loop":
        remove(path)
        os.symlink(name, path)
    elif kind == "device":
        remove(path)
        os.symlink(c.rng.choice(["/dev/null", "/dev/zero"]), path)
    else:
        return None
    return f"{name}: {kind}"


def m_add_file(c: Case):
    """A new file beside the checkpoint: a side file (or stray shard) that is a link out, a FIFO, a
    directory, or plain text."""
    name = c.rng.choice(SIDE_NAMES)
    path = c.src / name
    if os.path.lexists(path):
        return None
    kind = c.rng.choice(["text", "link_out", "link_out", "fifo", "dir", "shard_copy", "empty"])
    if kind == "text":
        path.write_bytes(b"plain side file\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "link_out":
        dest = c.sentinel / c.rng.choice(["secret.txt", "secret.json", "sub/secret.safetensors"])
        os.symlink(dest, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        shards = c.shards()
        if not shards:
            return None
        shutil.copyfile(c.rng.choice(shards), path)
    return f"new {name}: {kind}"


def m_rename_shard(c: Case):
    """A shard renamed, the index following: odd but plain names, names of other inputs or side files."""
    path = c.src / INDEX
    shards = c.shards()
    if not shards or not c.writable(path):
        return None
    try:
        index = json.loads(path.read_bytes())
        assert isinstance(index["weight_map"], dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return None
    old = c.rng.choice(shards).name
    # fmt: off
    new = c.rng.choice(["model.safetensors", "x.safetensors", "weights.bin", "\u00fcnic\u00f8de.safetensors",
                        "a b.safetensors", "-rf.safetensors", ".hidden.safetensors", "a" * 240 + ".safetensors",
                        "tokenizer.safetensors", "LICENSE", "vocab.safetensors", "config.json", "README.md",
                        "mxconvert.json", "model-00001-of-00001.safetensors", *[p.name for p in shards]])
    # fmt: on
    if new == old:
        return None
    remove(c.src / new)
    os.rename(c.src / old, c.src / new)
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    path.write_bytes(encode(dump(index)))
    return f"shard {old} renamed {short(new)} (index too)"


def m_card(c: Case):
    """The source card's YAML front matter (its licence is copied into the output card) made odd."""
    path = c.src / "README.md"
    if os.path.lexists(path) and not c.writable(path):
        return None
    value = c.rng.choice(
        [
            "[mit, apache-2.0]",
            "{a: 1}",
            "5",
            ".nan",
            "2020-01-01",
            "yes",
            "null",
            "'a\\0b'",
            "~",
            "&a [x, *a]",
            "!!binary aGk=",
            "!!python/object:os.system x",
            "[" * 200 + "]" * 200,
            "|\n  x",
        ]
    )
    key = c.rng.choice(["license", "license_name", "license_link", "language", "pipeline_tag", "base_model"])
    text = c.rng.choice(
        [f"---\n{key}: {value}\n---\n\n# Card\n", f"---\n{key}: {value}\n", f"---\r\n{key}: {value}\r\n---\r\n"]
    )
    data = text.encode()
    if c.rng.random() < 0.3:
        data, how = mutate_text(c.rng, data)
        text += f" ({how})"
    path.unlink(missing_ok=True)  # a link into blobs/ is replaced, not written through
    path.write_bytes(data)
    return f"README.md: {short(text)}"


# Each mutation with its weight: header and file-kind mutations most, as they reach the most checks
# fmt: off
MUTATIONS = [
    (m_header_json, 5), (m_entry, 4), (m_length_prefix, 2), (m_truncate, 2), (m_extend, 2), (m_flip, 3),
    (m_rename, 4), (m_rename_via_index, 2), (m_drop, 3), (m_add, 4), (m_restructure, 2), (m_json_file, 5),
    (m_config, 5), (m_index, 3), (m_replace, 6), (m_add_file, 3), (m_card, 1), (m_rename_shard, 2),
]
# fmt: on


def mutate(c: Case, count: int) -> None:
    funcs, weights = zip(*MUTATIONS)
    for _ in range(count * 10):
        if len(c.log) >= count:
            return
        fn = c.rng.choices(funcs, weights)[0]
        try:
            what = fn(c)
        except Exception as e:  # noqa: BLE001 - an earlier mutation broke what this one edits: note it, go on
            what = f"gave up part way ({type(e).__name__}: {short(str(e))})"
        if what is not None:
            c.log.append(f"{fn.__name__}: {what}")


# Watching: snapshots and a time limit ----------------------------------------------------------------------


def snapshot(top: Path, skip: Path) -> dict:
    """Every entry under `top` but `skip`: type, mode, size, mtime and content (a link's target); links
    are not followed and FIFOs not opened."""
    snap, stack = {}, [top]
    while stack:
        d = stack.pop()
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            p = Path(entry.path)
            if p == skip:
                continue
            st = os.lstat(p)
            key = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                snap[str(p)] = (*key, os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                snap[str(p)] = (*key, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                snap[str(p)] = key
                stack.append(p)
            else:
                snap[str(p)] = key
    return snap


def unblock_fifos(root: Path) -> None:
    """Open every FIFO under root from the other side, so that a reader or writer stuck on one returns."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISFIFO(os.lstat(p).st_mode):
                for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                    try:
                        os.close(os.open(p, flags))
                    except OSError:
                        pass


def guarded(fn, root: Path, what: str):
    """fn() in a thread: its result or exception, or a failure if it runs past TIMEOUT (a FIFO read)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - every kind is judged by the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(TIMEOUT)
    if t.is_alive():
        unblock_fifos(root)
        t.join(10)
        raise Hang(f"{what} still running after {TIMEOUT:.0f} s (hang)")
    return box.get("value"), box.get("error")


class Hang(Exception):
    pass


@contextlib.contextmanager
def memory_cap(headroom: int = 4 << 30):
    """Cap the address space while a case runs: an absurd size in a mutated config (num_hidden_layers = 2**31)
    must end as a MemoryError the oracle reports, not as the OOM killer taking CI down."""
    try:
        import resource

        used = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024
    except (ImportError, OSError, TypeError):  # not Linux: run uncapped
        used = None
    if used is None:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + headroom if old[1] == resource.RLIM_INFINITY else min(used + headroom, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def tail(e: BaseException, frames: int = 4) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-frames - 1 :])


def open_every_shard(out: Path) -> None:
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def contains_token(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return [p.name for p in sorted(out.iterdir()) if p.is_file() and TOKEN in p.read_bytes()]


# The test ------------------------------------------------------------------------------------------------


def judge(c: Case, options: dict, problems: list[str]) -> str:
    """Convert, then hold the result to the oracle (appending to problems); returns how convert ended."""

    def run_convert():
        return convert(model_dir=str(c.src), out_dir=str(c.out), progress=False, **options)

    _, err = guarded(run_convert, c.root, "convert")
    if err is None:
        _, verr = guarded(lambda: verify(out_dir=c.out, source=c.src), c.root, "verify --source")
        if verr is not None:
            problems.append(f"convert succeeded but verify(source=) refused it: {type(verr).__name__}\n{tail(verr)}")
        else:
            _, serr = guarded(lambda: open_every_shard(c.out), c.root, "safe_open")
            if serr is not None:
                problems.append(f"safetensors cannot open the output: {type(serr).__name__}\n{tail(serr)}")
    elif not isinstance(err, MxconvertError):
        problems.append(f"convert raised {type(err).__name__}, not MxconvertError\n{tail(err)}")
    else:
        msg = str(err)
        if not msg or "\n" in msg or "\r" in msg:
            problems.append(f"the message is not one line: {msg!r}")
        if TOKEN.decode() in msg:
            problems.append(f"the message carries the sentinel's bytes: {msg!r}")
        if (c.out / MANIFEST).exists():
            problems.append(f"{MANIFEST} left in OUT_DIR after: {msg}")
        _, verr = guarded(lambda: verify(out_dir=c.out), c.root, "verify")
        if verr is None:
            problems.append(f"verify accepts OUT_DIR after the failed run: {msg}")
        elif not isinstance(verr, MxconvertError):
            problems.append(f"verify of the failed OUT_DIR raised {type(verr).__name__}\n{tail(verr)}")
    return "converted" if err is None else f"{type(err).__name__}: {err}"


def run_case(seed: int, bases: dict[str, Path], root: Path) -> tuple[list[str], str]:
    """One fuzz case: (the oracle's complaints, empty if it passed; how convert ended)."""
    rng = random.Random(seed)
    base = rng.choice(sorted(bases))
    hub = rng.random() < 0.2
    c = Case(rng, root, bases[base], hub)
    mutate(c, rng.choice([1, 1, 2, 2, 3]))
    size = rng.choice([rng.randint(1, 4096), 2 ** rng.randint(12, 19), rng.randint(4096, 300_000), "64KB", "1MB"])
    options = dict(max_shard_size=size, bf16=rng.choice(["materialize", "derive"]), long_context=rng.random() < 0.3)
    user_file, made = c.out / "notes.txt", rng.random()
    if made < 0.2:
        c.out.mkdir()  # OUT_DIR made beforehand: empty, or holding a user's file that must survive
        if made < 0.05:
            user_file.write_bytes(b"the user's own notes\n")
    before = snapshot(root, skip=c.out)
    out_state = "OUT_DIR with a user's file" if made < 0.05 else "empty OUT_DIR" if made < 0.2 else "no OUT_DIR"
    context = f"seed {seed}, base {base}{' (hub layout)' if hub else ''}, {out_state}, options {options}; mutations:"
    context += "".join(f"\n  {line}" for line in c.log) or " none applied"
    problems, outcome = [], "hang"
    try:
        with memory_cap():
            outcome = judge(c, options, problems)
    except Hang as e:
        problems.append(str(e))
    if made < 0.05 and (not user_file.is_file() or user_file.read_bytes() != b"the user's own notes\n"):
        problems.append("the user's file in OUT_DIR was deleted or changed")
    leaked = contains_token(c.out)
    if leaked:
        problems.append(f"the sentinel's bytes are in OUT_DIR: {leaked}")
    after = snapshot(root, skip=c.out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        problems.append(f"changed outside OUT_DIR: {[os.path.relpath(k, root) for k in changed[:8]]}")
    return [context + "\n" + p for p in problems], outcome


@pytest.mark.parametrize("seed", SEEDS or range(FIRST, FIRST + CASES))
def test_fuzz(seed, bases):
    root = Path(tempfile.mkdtemp(prefix="mxfuzz-"))
    try:
        problems, _ = run_case(seed, bases, root)
    finally:
        unblock_fifos(root)
        shutil.rmtree(root, ignore_errors=True)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
