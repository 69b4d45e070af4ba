"""runtime/batch_attention.py on plain tensors: the batched ids every row's parts make (one
concatenation, padding, per-head and shared ids) and which rows share a launch."""

from __future__ import annotations

import torch

from kvloft.kernels.sparse_decode import SlotTables
from kvloft.runtime.batch_attention import TableLaunch, batched_ids, launch_groups
from kvloft.runtime.dense import Timers

HKV, HQ, D = 3, 6, 16


def _launch(parts, kind=None, dtype=torch.float32, hkv=HKV):
    like = torch.zeros(8, hkv, D, dtype=dtype)
    tables = (torch.arange(4), torch.arange(4))
    if kind is not None:
        tables = SlotTables(*tables, torch.arange(2), torch.arange(2), 2, kind)
    return TableLaunch(torch.zeros(HQ, D, dtype=dtype), like, like, parts, tables, 16, 0.25, Timers())


def test_batched_ids_pad_each_row_and_expand_shared_parts():
    """Row b of the result is its parts concatenated, shared [k] parts expanded over KV heads
    where any row has per-head parts, then -1 up to the longest row."""
    a = [torch.arange(12).view(HKV, 4), torch.tensor([100, 101])[None].expand(HKV, 2)]  # 6 per head
    b = [torch.tensor([7, 8, 9])]  # shared, 3
    c = [torch.arange(20, 29).view(HKV, 3), torch.arange(40, 46).view(HKV, 2), torch.full((HKV, 2), -1)]  # 7
    ids, lengths = batched_ids([_launch(a), _launch(b), _launch(c)])
    assert lengths == [6, 3, 7] and ids.shape == (3, HKV, 7) and ids.stride(-1) == 1
    want = torch.full((3, HKV, 7), -1)
    want[0, :, :6] = torch.cat(a, -1)
    want[1, :, :3] = torch.tensor([7, 8, 9])
    want[2] = torch.cat(c, -1)
    assert torch.equal(ids, want)


def test_batched_ids_stay_shared_when_every_row_is():
    ids, lengths = batched_ids([_launch([torch.tensor([1, 2]), torch.tensor([5])]), _launch([torch.tensor([3])])])
    assert lengths == [3, 1] and torch.equal(ids, torch.tensor([[1, 2, 5], [3, -1, -1]]))
    ids, lengths = batched_ids([_launch([torch.tensor([4, 5])]), _launch([torch.tensor([6, 7])])])
    assert lengths == [2, 2] and torch.equal(ids, torch.tensor([[4, 5], [6, 7]]))  # no padding piece


def test_launch_groups_split_by_layout_and_8bit_format():
    """Rows of another dtype launch apart; int8 and fp8 rows launch apart, rows without 8-bit
    slots join the first format's launch; row order kept within a launch."""
    p = [torch.tensor([0])]
    rows = {0: _launch(p), 1: _launch(p, "int8"), 2: _launch(p, dtype=torch.float64), 3: _launch(p, "fp8"),
            4: _launch(p), 5: _launch(p, "int8"), 6: _launch(p, dtype=torch.float64)}
    assert sorted(launch_groups(rows)) == [[0, 1, 4, 5], [2, 6], [3]]
    assert launch_groups({0: _launch(p), 3: _launch(p)}) == [[0, 3]]
    no_codes = _launch(p, "int8")
    no_codes.tables = no_codes.tables._replace(n_packed=0)  # an 8-bit tier with no chunk yet: no format
    assert no_codes.codes_kind() is None
    assert launch_groups({0: _launch(p, "fp8"), 1: no_codes}) == [[0, 1]]
