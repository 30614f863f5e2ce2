"""Every way a conversion can be refused, through the CLI: one `Error:` line naming the file or tensor,
exit code 1 (2 for usage errors), no traceback, and nothing left behind that looks finished.

Each case copies one tiny checkpoint and breaks it. `PYTHONPATH=.:scripts python tests/test_errors.py`
prints the table of cases with the message each one prints.
"""

import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from checkpoint_edits import drop_tensors, edit_json, rename_tensor, shard_of, tensor_names
from click.testing import CliRunner
from make_tiny_checkpoint import make_tiny_checkpoint

import mxconvert.outdir
from mxconvert.cli import main

LM = "language_model.model"
EXPERTS = f"{LM}.layers.4.block_sparse_moe.experts"
MTP = f"{LM}.mtp.0.block_sparse_moe.experts"
W1 = f"{LM}.layers.3.block_sparse_moe.experts.0.w1.weight"
INDEX = "model.safetensors.index.json"


# Breaking a checkpoint -------------------------------------------------------------------------------


def edit_text_config(src, **changes):
    def edit(config):
        for key, value in changes.items():
            if value is None:
                config["text_config"].pop(key)
            else:
                config["text_config"][key] = value

    edit_json(src / "config.json", edit)


def edit_quant(src, **changes):
    edit_json(src / "config.json", lambda config: config["quantization_config"].update(changes))


def edit_header(shard, edit):
    """Rewrite a shard's header JSON in place (same length, space-padded), the data left as it is."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    shard.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def sorted_entries(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap(header):
    second = header[sorted_entries(header)[1]]["data_offsets"]
    second[0], second[1] = second[0] - 2, second[1] - 2


def past_the_end(header):
    header[sorted_entries(header)[-1]]["data_offsets"][1] += 64


def set_entry(src, name, **fields):
    edit_header(shard_of(src, name), lambda header: header[name].update(fields))


def drop_tensor(src, name):
    drop_tensors(src, [name])


def set_last_byte(src, name, byte):
    shard = shard_of(src, name)
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][1] - 1] = byte
    shard.write_bytes(bytes(raw))


def edit_bytes(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def finished_conversion(src, out):
    assert CliRunner().invoke(main, [str(src), str(out), "--no-progress"]).exit_code == 0


def link_out(src, tmp, name):
    (tmp / "environ").write_text("HF_TOKEN=hf_secret")
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(tmp / "environ")


def fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def drop_group(src, prefix):
    drop_tensors(src, [n for n in tensor_names(src) if n.startswith(prefix + ".")])


def foreign_home(out):
    write(out / ".ssh" / "id_rsa", "KEY")
    write(out / "thesis.tex", "years of work")


def no_space(monkeypatch):
    monkeypatch.setattr(mxconvert.outdir, "free_bytes", lambda path: 1000)


def offline(monkeypatch, tmp):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# The cases ------------------------------------------------------------------------------------------
# setup(src, out, tmp, monkeypatch) breaks things; args and message name SRC (the broken copy), OUT and
# TMP (the test's directory) as {SRC}, {OUT}, {TMP}; message is a regex of the line after `Error: `.
# left: what OUT_DIR holds afterwards. "nothing": it was never created; "as before": untouched;
# "unfinished": the in-progress record and finished shards only, which `mxconvert verify` refuses.
Case = namedtuple("Case", "id broken setup args code message left")
SHARD1, SHARD2, SHARD3 = (f"{{SRC}}/model-0000{k}-of-00004.safetensors" for k in (1, 2, 3))
SHARD_ANY = r"{SRC}/model-0000\d-of-00004.safetensors"
ARGS = ("{SRC}", "{OUT}")
RE_DOWNLOAD = "Re-download this file."
NOT_M3 = r"Pass a MiniMax-M3 MXFP8 checkpoint \(its config.json unchanged\)."
NOT_M3_SHAPED = "The checkpoint is not MiniMax-M3 MXFP8-shaped; re-download it."
NOT_MXFP8 = "The source checkpoint is corrupt or not MXFP8; re-download it."
INDEX_DIFFERS = r"Re-download the checkpoint \(index and shards differ\)."
EVERY_EXPERT = "Re-download the checkpoint; every expert needs w1, w2, w3 and their scales."
NOT_MXFP8_CONFIG = r"Convert the MiniMax-M3 MXFP8 release \(quant_method 'mxfp8'\)."
OUTSIDE = "Pick an OUT_DIR outside MODEL_DIR."
HELP = "Run 'mxconvert convert --help' for the options."
CASES = [
    Case("model_dir_missing", "MODEL_DIR does not exist", None, ("{TMP}/nowhere", "{OUT}"), 1,
         r"{TMP}/nowhere: does not exist. Pass a checkpoint directory or a Hub repo id.", "nothing"),
    Case("model_dir_is_a_file", "MODEL_DIR is a file", None, ("{SRC}/config.json", "{OUT}"), 1,
         r"{SRC}/config.json: is not a directory. Pass a checkpoint directory or a Hub repo id.", "nothing"),
    Case("not_a_checkpoint", "MODEL_DIR is an empty directory",
         lambda src, out, tmp, mp: (tmp / "empty").mkdir(), ("{TMP}/empty", "{OUT}"), 1,
         r"{TMP}/empty/config.json: is missing. Pass the directory of a Hugging Face checkpoint.", "nothing"),
    Case("no_weights", "no index and no model.safetensors",
         lambda src, out, tmp, mp: [p.unlink() for p in src.glob("model*")], ARGS, 1,
         r"{SRC}: has neither model.safetensors.index.json nor model.safetensors. Pass a safetensors checkpoint.",
         "nothing"),
    Case("config_missing", "config.json deleted",
         lambda src, out, tmp, mp: (src / "config.json").unlink(), ARGS, 1,
         r"{SRC}/config.json: is missing. Pass the directory of a Hugging Face checkpoint.", "nothing"),
    Case("config_not_json", "config.json is not JSON",
         lambda src, out, tmp, mp: write(src / "config.json", "{'hidden_size': 6144"), ARGS, 1,
         r"{SRC}/config.json: is not valid JSON \(Expecting property name enclosed in double quotes: line 1 "
         r"column 2 \(char 1\)\). Re-download it.", "nothing"),
    Case("config_not_an_object", "config.json is a JSON list",
         lambda src, out, tmp, mp: write(src / "config.json", "[]"), ARGS, 1,
         r"{SRC}/config.json: is not a JSON object. Re-download it.", "nothing"),
    Case("config_no_hidden_size", "text_config.hidden_size missing",
         lambda src, out, tmp, mp: edit_text_config(src, hidden_size=None), ARGS, 1,
         r"{SRC}/config.json: text_config.hidden_size is None, not a positive integer. " + NOT_M3, "nothing"),
    Case("config_experts_not_a_number", "text_config.num_local_experts is a string",
         lambda src, out, tmp, mp: edit_text_config(src, num_local_experts="8"), ARGS, 1,
         r"{SRC}/config.json: text_config.num_local_experts is '8', not a positive integer. " + NOT_M3, "nothing"),
    Case("hidden_not_32_aligned", "hidden_size 150",
         lambda src, out, tmp, mp: edit_text_config(src, hidden_size=150), ARGS, 1,
         r"{SRC}/config.json: text_config.hidden_size 150 is not a multiple of 32 \(the MXFP8 block\). " + NOT_M3,
         "nothing"),
    Case("intermediate_not_32_aligned", "intermediate_size 100",
         lambda src, out, tmp, mp: edit_text_config(src, intermediate_size=100), ARGS, 1,
         r"{SRC}/config.json: text_config.intermediate_size 100 is not a multiple of 32 \(the MXFP8 block\). "
         + NOT_M3, "nothing"),
    Case("config_disagrees_with_tensors", "hidden_size 192 in config.json, 160 in the tensors",
         lambda src, out, tmp, mp: edit_text_config(src, hidden_size=192), ARGS, 1,
         r"\S+\.experts\.0\.w1\.weight: is F8_E4M3 \[96, 160\], expected F8_E4M3 \[96, 192\] \(hidden_size 192, "
         r"intermediate_size 96 in config.json\). " + NOT_M3_SHAPED, "nothing"),
    Case("too_few_experts_in_config", "num_local_experts 7, 8 experts in the weights",
         lambda src, out, tmp, mp: edit_text_config(src, num_local_experts=7), ARGS, 1,
         r"\S+\.block_sparse_moe\.experts: has expert 7 but the config says 7 experts. Check num_local_experts in "
         r"config.json.", "nothing"),
    Case("quant_not_mxfp8", "quant_method fp8",
         lambda src, out, tmp, mp: edit_quant(src, quant_method="fp8"), ARGS, 1,
         r"{SRC}/config.json: quantization_config.quant_method is 'fp8', not an MXFP8 checkpoint. " + NOT_MXFP8_CONFIG,
         "nothing"),
    Case("quant_missing", "no quantization_config",
         lambda src, out, tmp, mp: edit_json(src / "config.json", lambda c: c.pop("quantization_config")), ARGS, 1,
         r"{SRC}/config.json: quantization_config.quant_method is None, not an MXFP8 checkpoint. " + NOT_MXFP8_CONFIG,
         "nothing"),
    Case("quant_block_not_32", "weight_block_size [128, 128]",
         lambda src, out, tmp, mp: edit_quant(src, weight_block_size=[128, 128]), ARGS, 1,
         r"{SRC}/config.json: quantization_config.weight_block_size is \[128, 128\], not \[1, 32\] \(MXFP8\). "
         r"Convert the MiniMax-M3 MXFP8 release.", "nothing"),
    Case("index_names_missing_shard", "a shard deleted",
         lambda src, out, tmp, mp: (src / "model-00002-of-00004.safetensors").unlink(), ARGS, 1,
         SHARD2 + r": is named in model.safetensors.index.json but missing. Re-download the checkpoint.", "nothing"),
    Case("shard_truncated", "the last 100 bytes of a shard cut",
         lambda src, out, tmp, mp: truncate(src / "model-00003-of-00004.safetensors", -100), ARGS, 1,
         SHARD3 + r": is truncated or its header is corrupt: tensor \S+ ends at data byte \d+, the file holds \d+. "
         + RE_DOWNLOAD, "nothing"),
    Case("shard_truncated_in_header", "a shard cut to 20 bytes",
         lambda src, out, tmp, mp: truncate(src / "model-00003-of-00004.safetensors", 20), ARGS, 1,
         SHARD3 + r": header length \d+ is corrupt or the file is truncated. " + RE_DOWNLOAD, "nothing"),
    Case("header_not_json", "a shard header overwritten with garbage",
         lambda src, out, tmp, mp: edit_bytes(src / "model-00001-of-00004.safetensors", 8, b"#garbage#"), ARGS, 1,
         SHARD1 + r": safetensors header is not valid JSON \(Expecting value: line 1 column 1 \(char 0\)\). "
         + RE_DOWNLOAD, "nothing"),
    Case("header_entry_corrupt", "a header entry without data_offsets",
         lambda src, out, tmp, mp: edit_header(shard_of(src, W1), lambda h: h[W1].pop("data_offsets")), ARGS, 1,
         SHARD_ANY + r": header entry " + re.escape(W1) + r" is corrupt \(needs dtype, shape and two data_offsets, "
         r"nothing else\). " + RE_DOWNLOAD, "nothing"),
    Case("header_offsets_overlap", "two tensors' bytes overlap",
         lambda src, out, tmp, mp: edit_header(src / "model-00002-of-00004.safetensors", overlap), ARGS, 1,
         SHARD2 + r": header is corrupt: tensor \S+ at \[\d+, \d+\) overlaps \S+ \(ends at \d+\). " + RE_DOWNLOAD,
         "nothing"),
    Case("header_offsets_past_the_file", "the last tensor's end offset 64 bytes past the file",
         lambda src, out, tmp, mp: edit_header(src / "model-00002-of-00004.safetensors", past_the_end), ARGS, 1,
         SHARD2 + r": is truncated or its header is corrupt: tensor \S+ ends at data byte \d+, the file holds \d+. "
         + RE_DOWNLOAD, "nothing"),
    Case("header_size_mismatch", "an entry's bytes do not fit its shape",
         lambda src, out, tmp, mp: set_entry(src, W1, shape=[96, 128]), ARGS, 1,
         SHARD_ANY + r": header is corrupt: tensor " + re.escape(W1) + r" has 15360 bytes, not F8_E4M3 \[96, 128\]. "
         + RE_DOWNLOAD, "nothing"),
    Case("tensor_in_index_not_in_shard", "the index names a tensor its shard lacks",
         lambda src, out, tmp, mp: edit_json(
             src / INDEX, lambda i: i["weight_map"].update({"extra.weight": "model-00001-of-00004.safetensors"})),
         ARGS, 1,
         r"extra.weight: is in model.safetensors.index.json under model-00001-of-00004.safetensors but not in that "
         r"shard. " + INDEX_DIFFERS, "nothing"),
    Case("tensor_in_shard_not_in_index", "a shard holds a tensor the index lacks",
         lambda src, out, tmp, mp: edit_json(src / INDEX, lambda i: i["weight_map"].pop(f"{LM}.norm.weight")),
         ARGS, 1,
         re.escape(f"{LM}.norm.weight") + r": is in model-0000\d-of-00004.safetensors but not in "
         r"model.safetensors.index.json. " + INDEX_DIFFERS, "nothing"),
    Case("expert_missing", "one expert's down weight gone",
         lambda src, out, tmp, mp: drop_tensor(src, f"{EXPERTS}.6.w2.weight"), ARGS, 1,
         re.escape(f"{EXPERTS}.6") + r": down weight is missing from the checkpoint. " + EVERY_EXPERT, "nothing"),
    Case("expert_scale_missing", "one expert's up scale gone",
         lambda src, out, tmp, mp: drop_tensor(src, f"{EXPERTS}.2.w3.weight_scale_inv"), ARGS, 1,
         re.escape(f"{EXPERTS}.2") + r": up weight scale is missing from the checkpoint. " + EVERY_EXPERT, "nothing"),
    Case("wrong_dtype", "an expert weight stored as U8",
         lambda src, out, tmp, mp: set_entry(src, f"{EXPERTS}.5.w1.weight", dtype="U8"), ARGS, 1,
         re.escape(f"{EXPERTS}.5.w1.weight") + r": is U8 \[96, 160\], expected F8_E4M3 \[96, 160\] \(hidden_size "
         r"160, intermediate_size 96 in config.json\). " + NOT_M3_SHAPED, "nothing"),
    Case("wrong_shape", "an expert weight [160, 96] instead of [96, 160]",
         lambda src, out, tmp, mp: set_entry(src, f"{EXPERTS}.5.w1.weight", shape=[160, 96]), ARGS, 1,
         re.escape(f"{EXPERTS}.5.w1.weight") + r": is F8_E4M3 \[160, 96\], expected F8_E4M3 \[96, 160\] "
         r"\(hidden_size 160, intermediate_size 96 in config.json\). " + NOT_M3_SHAPED, "nothing"),
    Case("scale_byte_254", "scale byte 254 (found before the first output byte)",
         lambda src, out, tmp, mp: set_last_byte(src, f"{EXPERTS}.5.w2.weight_scale_inv", 254), ARGS, 1,
         re.escape(f"{EXPERTS}.5.w2.weight_scale_inv") + r": scale byte 254 at \[159, 2\] has no E4M3FNUZ "
         r"counterpart \(max 253\). " + NOT_MXFP8, "nothing"),
    Case("scale_byte_255", "scale byte 255, E8M0 NaN (in the MTP group)",
         lambda src, out, tmp, mp: set_last_byte(src, f"{MTP}.7.w1.weight_scale_inv", 255), ARGS, 1,
         re.escape(f"{MTP}.7.w1.weight_scale_inv") + r": scale byte 255 at \[95, 4\] has no E4M3FNUZ counterpart "
         r"\(max 253\). " + NOT_MXFP8, "nothing"),
    Case("value_byte_0x7F", "value byte 0x7F, E4M3FN NaN (found as it streams)",
         lambda src, out, tmp, mp: set_last_byte(src, f"{EXPERTS}.2.w3.weight", 0x7F), ARGS, 1,
         re.escape(f"{EXPERTS}.2.w3.weight") + r": value byte 0x7F at \[95, 159\] is NaN in E4M3FN. " + NOT_MXFP8,
         "unfinished"),
    Case("value_byte_0xFF", "value byte 0xFF, E4M3FN NaN",
         lambda src, out, tmp, mp: set_last_byte(src, f"{EXPERTS}.7.w2.weight", 0xFF), ARGS, 1,
         re.escape(f"{EXPERTS}.7.w2.weight") + r": value byte 0xFF at \[159, 95\] is NaN in E4M3FN. " + NOT_MXFP8,
         "unfinished"),
    Case("out_dir_is_model_dir", "OUT_DIR = MODEL_DIR", None, ("{SRC}", "{SRC}"), 1,
         r"{SRC}: is, contains or lies inside the source {SRC}. " + OUTSIDE, "nothing"),
    Case("out_dir_inside_model_dir", "OUT_DIR inside MODEL_DIR", None, ("{SRC}", "{SRC}/converted"), 1,
         r"{SRC}/converted: is, contains or lies inside the source {SRC}. " + OUTSIDE, "nothing"),
    Case("model_dir_inside_out_dir", "MODEL_DIR inside OUT_DIR, with --force", None,
         ("{SRC}", "{TMP}", "--force"), 1, r"{TMP}: is, contains or lies inside the source {SRC}. " + OUTSIDE,
         "nothing"),
    Case("out_dir_not_empty", "OUT_DIR holds other files",
         lambda src, out, tmp, mp: write(out / "notes.txt", "x"), ARGS, 1,
         r"{OUT}: already exists and is not empty. Pick another OUT_DIR, or pass --force to replace it.", "as before"),
    Case("out_dir_finished", "OUT_DIR holds a finished conversion",
         lambda src, out, tmp, mp: finished_conversion(src, out), ARGS, 1,
         r"{OUT}: already holds a finished conversion. Pass --force to replace it, or pick another OUT_DIR.",
         "as before"),
    Case("out_dir_is_a_file", "OUT_DIR is a file", lambda src, out, tmp, mp: write(out, "x"), ARGS, 1,
         r"{OUT}: is a file, not a directory. Pick another OUT_DIR.", "as before"),
    Case("resume_without_record", "--resume where no run started",
         lambda src, out, tmp, mp: write(out / "notes.txt", "x"), (*ARGS, "--resume"), 1,
         r"{OUT}: has no mxconvert.partial.json, so it holds no interrupted conversion to resume. Pass --force to "
         r"replace what is there, or pick another OUT_DIR.", "as before"),
    Case("not_enough_disk", "1000 bytes free (free_bytes patched)",
         lambda src, out, tmp, mp: no_space(mp), ARGS, 1,
         r"{OUT}: the output needs [\d.]+ MB of disk space but 1 kB is free there. Free [\d.]+ MB more, or pick an "
         r"OUT_DIR on another disk.", "nothing"),
    Case("hub_id_offline", "a Hub repo id under HF_HUB_OFFLINE=1",
         lambda src, out, tmp, mp: offline(mp, tmp), ("nobody/not-a-model", "{OUT}"), 1,
         r"nobody/not-a-model: is neither a local directory nor a checkpoint in the Hugging Face cache, and "
         r"HF_HUB_OFFLINE is set. Check the path, or unset HF_HUB_OFFLINE to download it.", "nothing"),
    Case("unknown_choice", "--bf16 sometimes", None, (*ARGS, "--bf16", "sometimes"), 2,
         r"--bf16: 'sometimes' is not one of 'materialize', 'derive'. " + HELP, "nothing"),
    Case("bad_shard_size", "--max-shard-size lots", None, (*ARGS, "--max-shard-size", "lots"), 2,
         r"--max-shard-size: 'lots' is not a size. Write it like 5GB, 500MB or 2GiB.", "nothing"),
    Case("bad_dispatch_band", "--bf16-max-tokens above --bf16-min-tokens", None,
         (*ARGS, "--bf16-max-tokens", "2048", "--bf16-min-tokens", "1024"), 2,
         r"--bf16-max-tokens: 2048 is not below --bf16-min-tokens 1024. The native band lies between them; pick "
         r"max < min.", "nothing"),
    Case("force_and_resume", "--force --resume", None, (*ARGS, "--force", "--resume"), 2,
         r"--force: and --resume exclude each other. Pass --resume to keep finished shards, --force to start over.",
         "nothing"),
    Case("unknown_option", "--long-contxt", None, (*ARGS, "--long-contxt"), 2,
         r"--long-contxt: is not an option of mxconvert convert \(did you mean --long-context\?\). " + HELP,
         "nothing"),
    # issue 12: safety and trust
    Case("side_file_link_out", "vocab.txt links to a file outside MODEL_DIR",
         lambda src, out, tmp, mp: link_out(src, tmp, "vocab.txt"), ARGS, 1,
         r"{SRC}/vocab.txt: is a link to {TMP}/environ, outside the source directory. Replace the link with the "
         r"file itself, or remove it: mxconvert reads nothing outside MODEL_DIR.", "nothing"),
    Case("shard_is_a_fifo", "a shard replaced by a FIFO",
         lambda src, out, tmp, mp: fifo(src / "model-00002-of-00004.safetensors"), ARGS, 1,
         SHARD2 + r": is a FIFO, not a regular file. Re-download the checkpoint.", "nothing"),
    Case("index_names_absolute_path", "an index entry names /etc/passwd",
         lambda src, out, tmp, mp: edit_json(src / INDEX, lambda i: i["weight_map"].update({W1: "/etc/passwd"})),
         ARGS, 1, r"{SRC}/model.safetensors.index.json: names '/etc/passwd' as a shard, which is not a plain file "
         r"name. Re-download the checkpoint.", "nothing"),
    Case("expert_index_alias", "experts.00.w1.weight beside experts.0",
         lambda src, out, tmp, mp: rename_tensor(src, f"{EXPERTS}.0.w1.weight", f"{EXPERTS}.00.w1.weight"), ARGS, 1,
         re.escape(f"{EXPERTS}.00.w1.weight") + r": lies under `experts.` but is not a routed expert tensor \(.*\). "
         r"Rename or remove it: it would not be converted.", "nothing"),
    Case("moe_layer_missing", "every expert of layer 4 gone",
         lambda src, out, tmp, mp: drop_group(src, EXPERTS), ARGS, 1,
         r"layer 4: is a MoE layer in config.json but the checkpoint has no routed experts for it. Re-download the "
         r"checkpoint; every MoE layer needs <prefix>.layers.<L>.<mlp>.experts.<e>.\*.", "nothing"),
    Case("empty_weight_map", "the index's weight_map is {}",
         lambda src, out, tmp, mp: edit_json(src / INDEX, lambda i: i.update(weight_map={})), ARGS, 1,
         r"{SRC}/model.safetensors.index.json: weight_map is empty: the checkpoint names no tensors. Re-download the "
         r"checkpoint.", "nothing"),
    Case("unknown_dtype", "a passed-through tensor's dtype is BOGUS",
         lambda src, out, tmp, mp: set_entry(src, f"{LM}.norm.weight", dtype="BOGUS"), ARGS, 1,
         SHARD_ANY + r": header gives tensor " + re.escape(f"{LM}.norm.weight") + r" dtype 'BOGUS', which is not a "
         r"safetensors dtype mxconvert can read \(.*\). " + RE_DOWNLOAD, "nothing"),
    Case("config_with_bom", "config.json starts with a UTF-8 byte-order mark",
         lambda src, out, tmp, mp: (src / "config.json").write_bytes(b"\xef\xbb\xbf" + (src / "config.json")
                                                                     .read_bytes()), ARGS, 1,
         r"{SRC}/config.json: is not plain UTF-8 JSON \(it starts with a byte-order mark\). Re-download it.",
         "nothing"),
    Case("index_deeply_nested", "the index nests 100000 lists",
         lambda src, out, tmp, mp: write(src / INDEX, '{"a": ' + "[" * 100000 + "]" * 100000 + "}"), ARGS, 1,
         r"{SRC}/model.safetensors.index.json: is JSON nested deeper than 64 levels. Re-download it.", "nothing"),
    Case("force_on_a_foreign_directory", "--force on a directory mxconvert did not write",
         lambda src, out, tmp, mp: foreign_home(out), (*ARGS, "--force"), 1,
         r"{OUT}: holds .ssh, thesis.tex, which no mxconvert run of it wrote \(it has no mxconvert.json or "
         r"mxconvert.partial.json\). --force replaces only a conversion of mxconvert's; pick another OUT_DIR, or "
         r"empty it yourself.", "as before"),
    Case("shard_size_400_digits", "--max-shard-size of 400 digits", None, (*ARGS, "--max-shard-size", "9" * 400),
         2, r"--max-shard-size: '9{20}\.\.\.' is not a size. Write it like 5GB, 500MB or 2GiB.", "nothing"),
    Case("shard_size_half_a_byte", "--max-shard-size 0.5", None, (*ARGS, "--max-shard-size", "0.5"), 2,
         r"--max-shard-size: '0.5' is less than one byte. Write it like 5GB, 500MB or 2GiB.", "nothing"),
]  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine") / "src", seed=5)


def run_case(case, pristine, tmp, monkeypatch):
    """Break a copy of the checkpoint as the case says and run the CLI: (result, message regex, OUT_DIR, before)."""
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(pristine, src)
    if case.setup is not None:
        case.setup(src, out, tmp, monkeypatch)
    paths = {"SRC": str(src.resolve()), "OUT": str(out.resolve()), "TMP": str(tmp.resolve())}
    args = [re.sub(r"\{(SRC|OUT|TMP)\}", lambda m: paths[m[1]], a) for a in case.args]
    before = snapshot(out)
    result = CliRunner().invoke(main, [*args, "--no-progress"], prog_name="mxconvert")
    regex = re.sub(r"\{(SRC|OUT|TMP)\}", lambda m: re.escape(paths[m[1]]), case.message)
    return result, regex, out, before


def snapshot(out):
    """Every file under OUT_DIR and its bytes (None if OUT_DIR does not exist; its bytes if it is a file)."""
    if out.is_file():
        return out.read_bytes()
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} if out.exists() else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case, pristine, tmp_path, monkeypatch):
    result, regex, out, before = run_case(case, pristine, tmp_path, monkeypatch)
    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert re.fullmatch("Error: " + regex, result.output.strip()), result.output
    if case.left == "nothing":
        assert not out.exists()
    elif case.left == "as before":
        assert snapshot(out) == before
    else:  # stopped while writing: the record and finished shards, nothing that looks like a conversion
        names = {p.name for p in out.iterdir()}
        assert "mxconvert.partial.json" in names
        assert not names & {"mxconvert.json", "config.json", "model.safetensors.index.json", "README.md"}
        assert not [n for n in names if n.endswith(".partial")]
        verify = CliRunner().invoke(main, ["verify", str(out)])
        assert verify.exit_code == 1 and "not a finished conversion" in verify.output


if __name__ == "__main__":  # the table of cases and messages, for the docs
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        source = make_tiny_checkpoint(Path(root) / "pristine", seed=5)
        print("| case | what is broken | exit | message |\n|---|---|---|---|")
        for case in CASES:
            tmp = Path(tempfile.mkdtemp(dir=root))
            with pytest.MonkeyPatch.context() as mp:
                result, *_ = run_case(case, source, tmp, mp)
            message = result.output.strip().replace(str(tmp.resolve()), "/tmp").replace("|", "\\|")
            print(f"| {case.id} | {case.broken} | {result.exit_code} | `{message}` |")
