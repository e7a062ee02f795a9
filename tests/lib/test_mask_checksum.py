"""lib/distributed.py's mask checksum, which ranks compare at every update: any moved pruned weight changes it."""

from __future__ import annotations

import pytest
import torch

from lib.distributed import mask_checksum
from lib.pruning.masks import pack_bits


def _masks(*pruned_positions: list[int], sizes=(40, 24)) -> list[torch.Tensor]:
    """Packed masks of parameters with `sizes` weights; the listed positions are pruned."""
    out = []
    for size, positions in zip(sizes, pruned_positions):
        mask = torch.zeros(size, dtype=torch.bool)
        mask[positions] = True
        out.append(pack_bits(mask))
    return out


def test_equal_masks_give_equal_checksums():
    assert mask_checksum(_masks([1, 9, 30], [0, 5])) == mask_checksum(_masks([1, 9, 30], [0, 5]))


# Every pair prunes the same number of weights, in different places: a count or a
# position-weighted sum of the bytes cannot tell some of them apart, a digest can.
@pytest.mark.parametrize("a, b", [
    (([3], []), ([4], [])),                      # a bit moved within one byte
    (([0, 24], []), ([8, 16], [])),              # bytes 1,0,0,1 vs 0,1,1,0: equal weighted sums
    (([8], []), ([], [0])),                      # from one parameter to the next, at the boundary
    (([0], [8]), ([8], [0])),                    # swapped between parameters
    (([0, 1], []), ([], [0, 1])),                # the same byte in another parameter
], ids=["within-a-byte", "mirrored-bytes", "across-parameters", "swapped", "same-byte-elsewhere"])
def test_masks_that_differ_only_in_position_have_different_checksums(a, b):
    first, second = _masks(*a), _masks(*b)
    assert sum(int(m.sum()) for m in first) != 0
    assert [sorted(x) for x in a] != [sorted(x) for x in b]
    assert mask_checksum(first) != mask_checksum(second)


def test_a_bit_moved_by_the_length_of_a_large_layer_changes_the_checksum():
    n = 8 * 70_000  # more bytes than a 16-bit position weight can tell apart
    first = torch.zeros(n, dtype=torch.bool)
    second = first.clone()
    first[8 * 5] = True
    second[8 * (5 + 65521)] = True
    assert mask_checksum([pack_bits(first)]) != mask_checksum([pack_bits(second)])


def test_checksum_fits_the_int64_all_reduce():
    value = mask_checksum(_masks(list(range(0, 40, 3)), list(range(24))))
    assert 0 <= value < 2 ** 63
    torch.tensor([value], dtype=torch.int64)  # what check_masks_agree all-reduces
