"""apply_chat_template renders the model's own template exactly as transformers does; a model
without one gets a built-in ChatML or Llama 3 template; messages are checked at the boundary."""

import pytest
from tokenizer_helpers import LLAMA3_TEMPLATE
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from kvloft.runtime.tokenizer import Tokenizer

CONVERSATIONS = {
    "no-system": [
        {"role": "user", "content": "What is 2024 + 1?"},
        {"role": "assistant", "content": "2025."},
        {"role": "user", "content": "  And 東京? 😀  "},
    ],
    "system": [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Hi"},
    ],
}
CASES = [(c, g) for c in CONVERSATIONS for g in (True, False)]


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    return Tokenizer.from_path(smollm2_gguf)


@pytest.fixture(scope="module")
def qwen_tok(qwen_gguf):
    return Tokenizer.from_path(qwen_gguf)


def _tiny(specials: list[str], template: str | None = None) -> Tokenizer:
    hf = HFTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    hf.add_special_tokens(specials)
    return Tokenizer(hf, eos_ids=(hf.token_to_id(specials[-1]),), chat_template=template, name="tiny-test")


@pytest.mark.parametrize(("conv", "gen"), CASES)
def test_smollm2_renders_as_transformers(smollm2_tok, smollm2_reference, conv, gen):
    messages = CONVERSATIONS[conv]
    want = smollm2_reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert smollm2_tok.apply_chat_template(messages, gen) == want
    assert smollm2_tok.chat_template_source == "model"
    # SmolLM2's template writes its default system prompt when the conversation has none
    assert ("named SmolLM" in want) == (conv == "no-system")


@pytest.mark.qwen
@pytest.mark.parametrize(("conv", "gen"), CASES)
def test_qwen_renders_as_transformers(qwen_tok, qwen_reference, conv, gen):
    messages = CONVERSATIONS[conv]
    want = qwen_reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert qwen_tok.apply_chat_template(messages, gen) == want
    assert ("You are Qwen" in want) == (conv == "no-system")


@pytest.mark.qwen
def test_qwen_tools_render_as_transformers(qwen_tok, qwen_reference):
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & c", "parameters": {}}}]
    messages = CONVERSATIONS["no-system"]
    want = qwen_reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert qwen_tok.apply_chat_template(messages, True, tools=tools) == want
    assert "a <b> & c" in want  # tojson does not escape HTML


@pytest.mark.parametrize("gen", [True, False])
def test_hf_dir_llama3_template_renders_as_llama3(llama3_dir, gen):
    tok = Tokenizer.from_hf_dir(llama3_dir)
    messages = CONVERSATIONS["system"]
    want = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one line.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ) + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")
    assert tok.apply_chat_template(messages, gen) == want
    assert "<|im_start|>" not in want
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(llama3_dir))
    assert ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want


def test_builtin_templates_only_without_a_model_template():
    chatml = _tiny(["<|im_start|>", "<|im_end|>"])
    assert chatml.chat_template_source == "builtin-chatml"
    text = chatml.apply_chat_template([{"role": "user", "content": "hi"}], True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama3 = _tiny(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    llama3.bos_id = 0
    llama3.special_tokens["bos_token"] = "<|begin_of_text|>"
    assert llama3.chat_template_source == "builtin-llama3"
    assert llama3.apply_chat_template([{"role": "user", "content": "hi"}], False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    )
    own = _tiny(["<|im_start|>", "<|im_end|>"], template=LLAMA3_TEMPLATE)
    assert own.chat_template_source == "model"


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([{"role": "user", "content": None}], TypeError, r"messages\[0\]\['content'\] must be a str, got NoneType"),
        ([{"role": 3, "content": "x"}], TypeError, r"\['role'\] must be a str"),
        ([{"content": "x"}], ValueError, "has no 'role'"),
        ([{"role": "user"}], ValueError, "has no 'content'"),
        (["hello"], TypeError, r"messages\[0\] must be a dict"),
        ("hello", TypeError, "must be a list"),
    ],
)
def test_messages_checked_at_the_boundary(messages, error, match):
    with pytest.raises(error, match=match):
        _tiny(["<|im_start|>", "<|im_end|>"]).apply_chat_template(messages)


def test_template_errors_name_the_model():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    tok = _tiny(["<|im_start|>", "<|im_end|>"], template=tpl)
    with pytest.raises(ValueError, match="tiny-test.*Conversation must start with user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == ""


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append(1) }}",  # the environment is immutable
        "{% set ns = namespace(a=1) %}{% set ns.__x = 2 %}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_templates_run_sandboxed(template):
    with pytest.raises(ValueError, match="tiny-test"):
        _tiny(["<|im_start|>", "<|im_end|>"], template=template).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_globals_as_in_transformers():
    tpl = (
        "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ extra }}"
    )
    tok = _tiny(["<s>", "</s>"], template=tpl)
    tok.special_tokens["bos_token"] = "<s>"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    text = tok.apply_chat_template(msgs, tools=[{"x": "<&>"}], extra="kw")
    assert text == '<s>|</s>|[{"x": "<&>"}]|4|a|2|kw'


def test_continuation_writes_the_default_system_prompt_once(smollm2_tok):
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ANSWER-7"}]
    new = [{"role": "user", "content": "And then?"}]
    full = smollm2_tok.apply_chat_template(history + new, True)
    after_answer = full.split("ANSWER-7", 1)[1]
    assert smollm2_tok.apply_chat_template_continuation(new, open_turn=True) == after_answer
    closed = smollm2_tok.apply_chat_template_continuation(new, open_turn=False)
    assert closed == after_answer.removeprefix("<|im_end|>\n") == "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
    assert full.count("named SmolLM") == 1


def test_rendered_bos_is_not_doubled(llama3_dir):
    tok = Tokenizer.from_hf_dir(llama3_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(text)  # add_bos is on, and the template wrote <|begin_of_text|> itself
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert ids == tok.encode(text, add_bos=False)


def test_session_stats_say_whose_template_renders(smollm2_tok):
    import dataclasses

    from kvloft import RuntimeConfig, Session, load_model

    tiny = load_model("tiny", device="cpu", dtype="float32")
    assert "chat_template" not in Session(tiny, runtime=RuntimeConfig(progress=False)).stats()
    with_tok = dataclasses.replace(tiny, tokenizer=smollm2_tok)
    assert Session(with_tok, runtime=RuntimeConfig(progress=False)).stats()["chat_template"] == "model"
