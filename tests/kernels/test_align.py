"""Routing alignment on the device against the pure-torch reference (order within an expert is free)."""

import pytest
import torch
from kernel_helpers import random_routing

from mxconvert.kernels.align import align_routing, align_routing_reference, max_slots


@pytest.mark.parametrize(
    "t,k,e,bm,skew",
    [
        (0, 4, 8, 16, False),
        (1, 1, 1, 16, False),
        (7, 2, 4, 16, False),
        (33, 4, 128, 16, True),
        (32, 4, 128, 16, True),  # 128 pairs: the one-launch kernel's largest batch
        (8, 4, 128, 16, False),
        (5, 4, 8, 64, True),
        (300, 8, 16, 64, True),
        (129, 3, 5, 32, False),
    ],
)
def test_align(t, k, e, bm, skew, device, gen):
    ids, _ = random_routing(t, k, e, gen, skew=skew)
    a = align_routing(ids.to(device), num_experts=e, block_m=bm)
    ref_sorted, ref_experts, used = align_routing_reference(ids, num_experts=e, block_m=bm)
    p = t * k
    assert a.sorted_ids.numel() == max_slots(p, e, bm) >= used
    assert int(a.num_post_pad) == used
    got = a.sorted_ids.cpu()
    assert (got[used:] == p).all()
    assert torch.equal(a.expert_ids.cpu()[: used // bm], ref_experts)
    for b in range(used // bm):  # each block holds the same pairs as the reference's, in any order
        sl = slice(b * bm, (b + 1) * bm)
        if b == 0 or ref_experts[b] != ref_experts[b - 1]:
            run = ref_experts == ref_experts[b]
            lo, hi = run.nonzero()[0].item() * bm, (run.nonzero()[-1].item() + 1) * bm
            assert sorted(got[lo:hi].tolist()) == sorted(ref_sorted[lo:hi].tolist())
        assert (ids.reshape(-1)[got[sl][got[sl] < p].long()] == ref_experts[b]).all()


@pytest.mark.parametrize("t", [6, 50])  # one-launch and two-launch paths
def test_align_places_id_e_nowhere(t, device, gen):
    # id E marks a pair of an expert held elsewhere: counted nowhere, in no block
    e, k, bm = 8, 3, 16
    ids, _ = random_routing(t, k, e, gen)
    ids[::2, 0] = e
    a = align_routing(ids.to(device), num_experts=e, block_m=bm)
    kept = ids.clone()
    kept[kept == e] = -1
    ref_sorted, ref_experts, used = align_routing_reference(kept, num_experts=e, block_m=bm)
    assert int(a.num_post_pad) == used
    got = a.sorted_ids.cpu()[:used]
    assert sorted(got[got < t * k].tolist()) == sorted((kept.reshape(-1) >= 0).nonzero().flatten().tolist())
