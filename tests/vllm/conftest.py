"""vLLM tests: only where vLLM 0.33 is installed (the second environment .ci/run builds), on the CPU.

Checkpoints are built once per session: the tiny source (harness.TINY) and two conversions of it,
--long-context (dual + bf16_only layers) and --long-context --bf16 derive (native_only + bf16_only);
and the same model as the generator's default VL layout (harness.TINY_VL), converted --long-context.
"""

import os
from importlib import metadata

import pytest
from harness import TINY, TINY_VL

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
try:  # the installed distribution: `import vllm` alone would find this directory as a namespace package
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    collect_ignore_glob = ["test_*.py"]  # no vLLM here: pip install -e '.[vllm,test]' in a second environment


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from make_tiny_checkpoint import make_tiny_checkpoint

    from mxconvert.convert import convert

    root = tmp_path_factory.mktemp("vllm")
    src = make_tiny_checkpoint(root / "src", **TINY)
    out = {"src": src}
    hybrid = dict(bf16_max_tokens=8, bf16_min_tokens=1024)  # both paths to check: BF16 copies held
    for name, bf16 in (("dual", "materialize"), ("derive", "derive")):
        out[name] = root / name
        convert(model_dir=str(src), out_dir=str(out[name]), long_context=True, bf16=bf16, progress=False, **hybrid)
    out["defaults"] = root / "defaults"  # what `mxconvert SRC OUT` writes: FP8 only, no BF16 band
    convert(model_dir=str(src), out_dir=str(out["defaults"]), progress=False)
    out["vl_src"], out["vl"] = make_tiny_checkpoint(root / "vl_src", **TINY_VL), root / "vl"
    convert(
        model_dir=str(out["vl_src"]), out_dir=str(out["vl"]), long_context=True, bf16="materialize", progress=False,
        **hybrid,
    )  # fmt: skip
    return out
