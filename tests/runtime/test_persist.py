"""Session save/restore: identity of the next tokens, refusal of corrupted or mismatched saves,
crash safety of the commit."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from session_helpers import CACHE, RUNTIME, TIERED, fed, greedy, prompt_ids

from kvloft import RetrievalConfig, Session, load_model
from kvloft.index.exact import ExactRetriever
from kvloft.runtime import persist


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=3)


def _session(model, rcfg, n_prompt=200, n_steps=6) -> Session:
    return fed(model, rcfg, prompt_ids(model, n_prompt), n_steps)  # decode state before the save


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


CONFIGS = {
    "exact": RetrievalConfig(method="exact", **TIERED),
    "tokenselect": RetrievalConfig(method="tokenselect", **TIERED, options={"theta": 0.0}),
    "recycled": RetrievalConfig(method="recycled", **TIERED, options={"stride": 4}),
    "dense": RetrievalConfig(method="dense"),
    # stages that prune 168 host rows and refresh within the 6 + 12 steps of the test
    "hip": RetrievalConfig(method="hip", **TIERED, options={
        "chunk_sizes": [32, 8], "kept_tokens": [64, 24], "refresh_steps": [4, 2], "chunk_rows": 64}),
    "attention_graph": RetrievalConfig(method="attention_graph", **TIERED),
    "actqkv": RetrievalConfig(method="actqkv", **TIERED),
    "faiss": RetrievalConfig(method="faiss", **TIERED),
}
STATEFUL = ("exact", "tokenselect", "recycled", "hip", "attention_graph", "actqkv")  # retrievers whose counters and caches are restored


def _needs(method):
    if method == "faiss":
        pytest.importorskip("faiss")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_restored_session_continues_identically(tiny, tmp_path, method):
    _needs(method)
    s = _session(tiny, CONFIGS[method])
    s.save(tmp_path / "s")
    r = Session.load(tmp_path / "s", tiny)
    assert r.tokens == s.tokens and r.retrieval == s.retrieval
    assert r.stats()["bytes"] == s.stats()["bytes"]
    if method in STATEFUL:
        assert r.stats()["retriever"] == s.stats()["retriever"]  # counters and cache hits restored
    want_ids, want_logits = greedy(s, 12)
    got_ids, got_logits = greedy(r, 12)
    assert got_ids == want_ids
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    if method in STATEFUL:
        assert r.stats()["retriever"] == s.stats()["retriever"]  # same hits/misses/full steps after


def test_tokenselect_cache_state_is_restored_and_used(tiny, tmp_path):
    """Guard on the test above: the restored selection caches equal the originals and get hits."""
    s = _session(tiny, CONFIGS["tokenselect"])
    s.save(tmp_path / "s")
    r = Session.load(tmp_path / "s", tiny)
    a, b = s.backend.retriever, r.backend.retriever
    for layer in range(tiny.config.n_layers):
        assert torch.equal(a.layers[layer].last_q, b.layers[layer].last_q)
        assert torch.equal(a.layers[layer].last_ids, b.layers[layer].last_ids)
    hits = b.cache_hits
    greedy(r, 8)
    assert b.cache_hits > hits


def test_hip_stage_masks_are_restored_and_reused(tiny, tmp_path):
    """Guard on the identity test: the restored masks equal the originals, and the next steps
    reuse them (stage 1 is not refreshed at once, which a fresh state would do)."""
    s = _session(tiny, CONFIGS["hip"])
    s.save(tmp_path / "s")
    r = Session.load(tmp_path / "s", tiny)
    a, b = s.backend.retriever, r.backend.retriever
    for layer in range(tiny.config.n_layers):
        sa, sb = a.state[layer], b.state[layer]
        assert (sa.step, sa.seen, sa.budget) == (sb.step, sb.seen, sb.budget)
        for ma, mb in zip(sa.masks, sb.masks, strict=True):
            assert ma is not None and torch.equal(ma, mb)
    before = list(b.stats()["refreshes"])
    greedy(r, 1)
    assert b.stats()["refreshes"][0] - before[0] < tiny.config.n_layers  # some layer reused stage 1


def test_retriever_without_state_dict_is_rebuilt_from_host_tier(tiny, tmp_path, monkeypatch):
    monkeypatch.delattr(ExactRetriever, "state_dict")
    monkeypatch.delattr(ExactRetriever, "load_state_dict")
    s = _session(tiny, CONFIGS["exact"])
    s.save(tmp_path / "s")
    r = Session.load(tmp_path / "s", tiny)
    assert r.stats()["retriever"]["calls"] == 0  # counters start fresh ...
    assert r.backend.attached == set(range(tiny.config.n_layers))  # on the CPU it searches the host tier in place
    mirror = r.backend.retriever._keys_of(1).all()
    torch.testing.assert_close(mirror, s.backend.retriever._keys_of(1).all(), rtol=0, atol=0)  # ... keys do not
    assert greedy(r, 8)[0] == greedy(s, 8)[0]  # exact selection is stateless: same tokens


def test_empty_session_round_trips(tiny, tmp_path):
    s = Session(tiny, CONFIGS["exact"], RUNTIME, CACHE)
    s.save(tmp_path / "s")
    r = Session.load(tmp_path / "s", tiny)
    assert len(r) == 0 and r.last_logits is None
    r.feed([1, 2, 3])
    assert len(r) == 3


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """One save (tokenselect: it has a retriever file), copied by each test that damages it."""
    path = tmp_path_factory.mktemp("saved") / "s"
    _session(tiny, CONFIGS["tokenselect"], n_prompt=150, n_steps=3).save(path)
    return path


def _corrupt_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _edit_manifest(key, value):
    def edit(p: Path) -> None:
        m = json.loads(p.read_text())
        m[key] = value
        p.write_text(json.dumps(m))
    return edit


def _edit_tiers(field, value, *, redigest=False):
    """Set field of layer 0's ring state; with redigest, also recompute the manifest's digest."""
    def edit(p: Path) -> None:
        m = json.loads(p.read_text())
        m["tiers"]["layers"][0][field] = value
        if redigest:
            m[persist.MANIFEST_DIGEST] = persist._manifest_digest(m)
        p.write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("target,damage,match", [
    ("manifest.json", _edit_tiers("ring_head", 999), "edited or corrupted.*manifest_sha256"),
    ("manifest.json", _edit_tiers("n_host", 3), "edited or corrupted"),
    ("manifest.json", _edit_manifest("session", {"times": {}, "n_tokens": 1}), "edited or corrupted"),
    ("manifest.json", _edit_tiers("ring_head", 999, redigest=True), "ring_head=999.*does not fit"),
    ("manifest.json", _edit_tiers("sink_fill", -1, redigest=True), "sink_fill=-1.*does not fit"),
    ("kv.safetensors", _corrupt_byte, "sha256"),
    ("kv.safetensors", _truncate, "truncated"),
    ("retriever.safetensors", _corrupt_byte, "sha256"),
    ("manifest.json", _truncate, "JSON"),
    ("manifest.json", _edit_manifest("kvloft_version", "0.0.1"), "kvloft '0.0.1'"),
    ("manifest.json", _edit_manifest("format_version", 99), "format version 99"),
    ("CURRENT", lambda p: p.write_text("gen-1-deadbeef"), "not a generation"),
])
def test_damaged_save_is_refused_and_left_untouched(tiny, saved, tmp_path, target, damage, match):
    shutil.copytree(saved, tmp_path / "s")
    gen = (tmp_path / "s" / "CURRENT").read_text()
    damage(tmp_path / "s" / (target if target == "CURRENT" else f"{gen}/{target}"))
    before = _tree(tmp_path / "s")
    with pytest.raises(ValueError, match=match):
        Session.load(tmp_path / "s", tiny)
    assert _tree(tmp_path / "s") == before


def test_other_model_or_dtype_is_refused(tiny, saved, tmp_path):
    shutil.copytree(saved, tmp_path / "s")
    with pytest.raises(ValueError, match="other weights"):
        Session.load(tmp_path / "s", load_model("tiny", device="cpu", dtype="float32", seed=4))
    with pytest.raises(ValueError, match="dtype='float32'"):
        Session.load(tmp_path / "s", load_model("tiny", device="cpu", dtype="bfloat16", seed=3))
    other = load_model("tiny", device="cpu", dtype="float32", seed=3)
    other.config = type(tiny.config)(**{**tiny.config.__dict__, "rope_theta": 500000.0})
    with pytest.raises(ValueError, match="rope_theta"):
        Session.load(tmp_path / "s", other)
    with pytest.raises(ValueError, match="not a kvloft session save"):
        Session.load(tmp_path / "nowhere", tiny)


def test_crash_before_commit_keeps_previous_save(tiny, tmp_path, monkeypatch):
    s = _session(tiny, CONFIGS["exact"], n_steps=2)
    s.save(tmp_path / "s")
    n_saved = len(s)
    greedy(s, 5)

    def crash(root, gen):
        raise KeyboardInterrupt("simulated crash between write and rename of CURRENT")

    monkeypatch.setattr(persist, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        s.save(tmp_path / "s")
    monkeypatch.undo()
    assert len(list((tmp_path / "s").glob("gen-*"))) == 2  # the new generation was written, not published
    r = Session.load(tmp_path / "s", tiny)
    assert len(r) == n_saved
    s.save(tmp_path / "s")  # the next save publishes and removes the leftovers
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith("gen-")) == ["CURRENT"]
    assert len(list((tmp_path / "s").glob("gen-*"))) == 1
    assert len(Session.load(tmp_path / "s", tiny)) == len(s)


def test_refuses_to_write_into_a_foreign_directory(tiny, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    s = Session(tiny, CONFIGS["exact"], RUNTIME, CACHE)
    with pytest.raises(ValueError, match="not a kvloft"):
        s.save(tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
