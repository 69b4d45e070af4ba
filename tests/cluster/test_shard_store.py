"""Shard stores without Ray: record files (checksums, torn tails), reload with index replay,
partial attention against the torch reference, the global top-k split."""

import itertools

import pytest
import torch

from kvloft.cluster.records import CorruptRecord, RecordFile
from kvloft.cluster.session import split_global_topk
from kvloft.cluster.shard import KVShard, ShardStore, StoreNotOpen, StoreSpec
from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.kernels import reference

CFG = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, D = 16
SCALE = CFG.head_dim**-0.5


def _spec(tmp_path, **kw) -> StoreSpec:
    base = {"directory": str(tmp_path / "r0"), "first_row": 100, "capacity": 64, "model": CFG,
            "retrieval": RetrievalConfig(method="exact", budget=8)}
    return StoreSpec(**{**base, **kw})


def _rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, generator=g), torch.randn(n, 3, 16, generator=g), torch.arange(100, 100 + n))


def _fill(store: ShardStore, k, v, pos, build_at: int) -> None:
    """Blocks of uneven sizes; the index is built after `build_at` rows (as a session does)."""
    cuts = [0, 7, build_at, build_at + 1, build_at + 2, k.shape[0]]
    for a, b in itertools.pairwise(cuts):
        if a == build_at:
            store.build({0: None, 1: None})
        for layer in range(2):
            store.append(layer, (k[a:b], v[a:b], pos[a:b], 100 + a))


def test_attention_matches_reference_and_reload_is_identical(tmp_path):
    k, v, pos = _rows(40)
    store = ShardStore(_spec(tmp_path))
    _fill(store, k, v, pos, build_at=20)
    q = torch.randn(9, 16)
    out, lse, scanned = store.attend(1, q, 1000)  # covering budget: dense over the store's rows
    ref_out, ref_lse = reference.decode_attend(q, k, v, scale=SCALE)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)
    assert scanned == 40 * 3
    qs = torch.randn(5, 9, 16)
    p_out, p_lse = store.prefill(0, qs)
    r_out, r_lse = reference.attend(qs, k, v, scale=SCALE)
    torch.testing.assert_close(p_out, r_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p_lse, r_lse, atol=1e-6, rtol=1e-5)
    sparse = store.attend(0, q, 5)
    store.close()

    again = ShardStore(_spec(tmp_path))  # reload: records verified, index replayed
    assert again.rows(0) == again.rows(1) == 40 and again.indexed == [True, True]
    assert torch.equal(again.pos[0].all(), pos)
    for a, b in zip(sparse, again.attend(0, q, 5)):
        assert a == b if isinstance(a, int) else torch.equal(a, b)


def test_append_is_idempotent_and_refuses_gaps_and_overflow(tmp_path):
    k, v, pos = _rows(10)
    store = ShardStore(_spec(tmp_path, capacity=12))
    assert store.append(0, (k[:6], v[:6], pos[:6], 100)) == 6
    assert store.append(0, (k[:6], v[:6], pos[:6], 100)) == 6  # resent after a lost reply
    assert store.append(0, (k[4:10], v[4:10], pos[4:10], 104)) == 10  # overlapping resend
    assert torch.equal(store.k[0].all(), k)
    with pytest.raises(ValueError, match="gap"):
        store.append(0, (k[:1], v[:1], pos[:1], 111))
    with pytest.raises(ValueError, match="capacity"):
        store.append(0, (torch.cat([k, k])[:3], torch.cat([v, v])[:3], torch.arange(3), 110))


def test_corrupted_record_is_detected(tmp_path):
    k, v, pos = _rows(12)
    store = ShardStore(_spec(tmp_path))
    _fill(store, k, v, pos, build_at=8)
    store.close()
    path = tmp_path / "r0" / "layer-001.rec"
    data = bytearray(path.read_bytes())
    size = RecordFile(path, 3 * 16 * 4).record_size
    data[5 * size + 40] ^= 0x10  # one bit of record 5's keys
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match=r"layer-001\.rec: record 5 of 12 fails its crc32"):
        ShardStore(_spec(tmp_path))


def test_torn_tail_is_cut_and_the_rest_reloads(tmp_path):
    k, v, pos = _rows(12)
    f = RecordFile(tmp_path / "x.rec", 3 * 16 * 4)
    f.append(pos[:5], k[:5], v[:5])
    f.append(pos[5:], k[5:], v[5:])
    f.close()
    whole = (tmp_path / "x.rec").stat().st_size
    with open(tmp_path / "x.rec", "r+b") as fh:  # the second block's write died after 2.5 records
        fh.truncate(whole - int(4.5 * f.record_size))
    got = RecordFile(tmp_path / "x.rec", 3 * 16 * 4).read()
    assert got.blocks == [5] and got.pos.tolist() == pos[:5].tolist() and got.dropped_bytes > 0
    assert (tmp_path / "x.rec").stat().st_size == 5 * f.record_size


def test_other_setup_and_unwritable_directory_are_refused(tmp_path):
    ShardStore(_spec(tmp_path)).close()
    with pytest.raises(ValueError, match="another setup"):
        ShardStore(_spec(tmp_path, first_row=0))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        ShardStore(_spec(tmp_path, directory=str(tmp_path / "file" / "sub")))


def test_shard_process_reports_unknown_store(tmp_path):
    shard = KVShard()
    with pytest.raises(StoreNotOpen):
        shard.step(str(tmp_path / "r0"), 0, None, 0, None)
    assert shard.open(_spec(tmp_path))["rows"] == 0
    key, (k, v, pos) = str(tmp_path / "r0"), _rows(4)
    assert shard.append(key, 0, (k, v, pos, 100)) == 4
    shard.build(key, {0: None})
    out, lse, _ = shard.attend(key, 0, torch.randn(9, 16), 2)
    assert out.shape == (9, 16) and lse.shape == (9,) and torch.isfinite(lse).all()


def test_global_topk_split_equals_topk_over_all_rows():
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(3, k, generator=g) for k in (5, 0, 7)]
    ids = [torch.arange(k).expand(3, -1) + 10 * j for j, k in enumerate((5, 0, 7))]
    scores[2][1, 6] = float("-inf")  # a padded candidate
    ids[2] = ids[2].clone()
    ids[2][1, 6] = -1
    shares = split_global_topk(scores, ids, budget=6)
    every_s, every_i = torch.cat(scores, 1), torch.cat(ids, 1)
    want = every_i.gather(1, torch.topk(every_s, 6, dim=1).indices)
    for h in range(3):
        got = torch.cat([s[h][s[h] >= 0] for s in shares])
        assert sorted(got.tolist()) == sorted(want[h].tolist())
    assert shares[1].shape == (3, 0)
