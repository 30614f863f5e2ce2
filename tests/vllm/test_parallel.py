"""TP 2 and TP 2 with expert parallelism: two spawned ranks (gloo) each load their slices through vLLM."""

import json

import pytest
import torch.multiprocessing as mp
from harness import MOE_LAYERS, check_rank_slices, free_port

from mxconvert import format as fmt

E, I = 4, 128  # harness.TINY


def _run(rank, *args):
    check_rank_slices(rank, *args)


@pytest.mark.parametrize("name", ["dual", "derive"])
@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2-ep"])
def test_two_ranks_load_exact_slices(checkpoints, tmp_path, name, ep):
    port = free_port()
    args = (str(checkpoints[name]), ep, port, str(tmp_path), str(checkpoints["dual"]))
    mp.start_processes(_run, args=args, nprocs=2, start_method="spawn")
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(report) == [f"model.layers.{L}.block_sparse_moe.experts" for L in MOE_LAYERS]
        for prefix, layer in report.items():
            params = layer["params"]
            if ep:  # BF16 only (the runtime runs expert parallelism on BF16), experts [2r, 2r + 2)
                assert set(params) == set(fmt.BF16_TENSORS), prefix
                assert layer["first_expert"] == rank * E // 2
                assert params["w2_weight_bf16"]["shape"] == [E // 2, 128, I]
            else:  # every stored tensor (native_only: plus derived BF16), half of I each
                want = set(fmt.BF16_TENSORS) if layer["storage"] == fmt.BF16_ONLY else set(fmt.EXPERT_TENSORS)
                assert set(params) == want, prefix
                assert params["w2_weight_bf16"]["shape"] == [E, 128, I // 2]
            for suffix, p in params.items():
                assert p["exact"], f"rank {rank} {prefix}.{suffix}"
