"""Tokenizer fixtures: the real GGUF files (skipped when absent), their transformers references
(loaded once per session: transformers takes seconds to rebuild a GGUF tokenizer), and a small
Llama-3-style tokenizer trained here, so no download is needed."""

import json
from pathlib import Path

import pytest
import torch
from tokenizer_helpers import LLAMA3_TEMPLATE, train_byte_level_bpe, write_sentencepiece_gguf


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests. A batched step's projections are GEMMs of a few
    rows, which torch splits over threads; on a busy small CPU those threads wait on each other
    (a 3-row projection of the tiny model took 100x its one-thread time on a shared 2-core
    machine, a one-row one 3x). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def qwen_gguf_path() -> Path:
    """Where `make models` leaves the Qwen GGUF (the catalog's cache dir)."""
    from kvloft.runtime import catalog

    return catalog.cache_dir() / "models" / catalog.CATALOG["qwen2.5-coder-0.5b-instruct"].file


def pytest_collection_modifyitems(config, items):
    """Every test that needs the Qwen GGUF carries the `qwen` marker (deselect with -m "not qwen")."""
    for item in items:
        if "qwen_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qwen)


@pytest.fixture(scope="session")
def smollm2_gguf():
    from kvloft.runtime.loader import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def qwen_gguf():
    path = qwen_gguf_path()
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make models`")
    return path


def _reference(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' tokenizer rebuilt from the same SmolLM2 GGUF."""
    return _reference(smollm2_gguf)


@pytest.fixture(scope="session")
def qwen_reference(qwen_gguf):
    """transformers' tokenizer rebuilt from the same Qwen2.5-Coder GGUF (~20 s on a small CPU)."""
    return _reference(qwen_gguf)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """A HF dir like Llama-3-Instruct's: tokenizer.json (Llama 3's split pattern, a post-processor
    that puts <|begin_of_text|> first), tokenizer_config.json with Llama 3's chat template."""
    from tokenizers import processors

    from kvloft.runtime.gguf_tokenizer import LLAMA3_SPLIT

    tok = train_byte_level_bpe(LLAMA3_SPLIT)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    d = tmp_path_factory.mktemp("llama3")
    tok.save(str(d / "tokenizer.json"))
    config = {
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def sentencepiece_gguf(tmp_path_factory):
    """A small Llama-2-style SentencePiece GGUF written here (no merges: they come from the scores)."""
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_sentencepiece_gguf(path)
    return path


def write_llama_gguf(path, h: int, f: int, nh: int, nkv: int, v: int, tensor):
    """A one-layer llama GGUF at `path` (hidden h, FFN f, nh / nkv heads, vocab v, context 256):
    every tensor from tensor(name, shape, rng) -> (array, gguf.GGMLQuantizationType or None for
    the array's own dtype), one numpy generator (seed 0) shared in file order. Returns path."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for add, val in ((w.add_block_count, 1), (w.add_embedding_length, h), (w.add_feed_forward_length, f),
                     (w.add_head_count, nh), (w.add_head_count_kv, nkv), (w.add_vocab_size, v),
                     (w.add_context_length, 256)):
        add(val)
    rng = np.random.default_rng(0)
    d = h // nh
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,), "blk.0.attn_norm.weight": (h,),
              "blk.0.ffn_norm.weight": (h,), "blk.0.attn_q.weight": (nh * d, h), "blk.0.attn_k.weight": (nkv * d, h),
              "blk.0.attn_v.weight": (nkv * d, h), "blk.0.attn_output.weight": (h, nh * d),
              "blk.0.ffn_gate.weight": (f, h), "blk.0.ffn_up.weight": (f, h), "blk.0.ffn_down.weight": (h, f),
              "output.weight": (v, h)}
    for name, shape in shapes.items():
        arr, raw = tensor(name, shape, rng)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
