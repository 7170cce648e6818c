"""Ollama / LM Studio export: the Modelfile's TEMPLATE renders every conversation exactly as llama.cpp
renders the GGUF's own chat template (llama-cpp-python's Jinja2ChatFormatter), byte for byte."""
from __future__ import annotations

import json

import pytest

from tools.errors import UserError

CONVERSATIONS = [
    [{"role": "user", "content": "Does metformin cause lactic acidosis?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Dose of aspirin?"}],
    [{"role": "user", "content": "Is it\nserious?"}, {"role": "assistant", "content": "Maybe."},
     {"role": "user", "content": "Why «maybe»? {{ not a template }}"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": ""}],
]


def llama_cpp_rendering(template: str, messages: list[dict]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                               add_generation_prompt=True)(messages=messages).prompt


@pytest.fixture(scope="module")
def tiny_f16(tiny_llama, tmp_path_factory):
    """The tiny Llama's f16 GGUF artifact, converted once per run for every module that asks (tests.helpers)."""
    from tests.helpers import shared_tiny_f16

    return shared_tiny_f16(tmp_path_factory, tiny_llama)


def test_ollama_modelfile_renders_like_llama_cpp(tools_cli, smollm2_gguf, tiny_f16, tmp_path):
    import llama_cpp

    from corpora.sft import system_prompt
    from release.export import parse_modelfile, render_go
    from tools.llm import SAMPLING_DEFAULTS

    out = tmp_path / "ollama"
    tools_cli("export", "ollama", smollm2_gguf, "--out", out, check=True)
    mf = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert mf["FROM"] == f"./{smollm2_gguf.name}"
    assert (out / smollm2_gguf.name).read_bytes()[:4] == b"GGUF"
    assert (out / smollm2_gguf.name).stat().st_size == smollm2_gguf.stat().st_size
    assert mf["SYSTEM"] == system_prompt("pubmedqa")
    assert mf["params"]["top_k"] == 40
    for k in ("temperature", "top_p", "min_p", "repeat_penalty"):
        assert mf["params"][k] == SAMPLING_DEFAULTS[k], k
    assert mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert "<|im_start|>" in mf["TEMPLATE"] and "{{ $m.Content }}" in mf["TEMPLATE"]
    assert "ollama create" in (out / "README.md").read_text()

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)  # the template as
    jinja = llm.metadata["tokenizer.chat_template"]  # llama.cpp reads it (the Python reader takes seconds)
    llm.close()
    for conv in CONVERSATIONS:
        # Ollama prepends the Modelfile's SYSTEM when the request has no system message
        full = conv if conv[0]["role"] == "system" else [{"role": "system", "content": mf["SYSTEM"]}] + conv
        assert render_go(mf["TEMPLATE"], conv, system=mf["SYSTEM"]) == llama_cpp_rendering(jinja, full)
        # without any system prompt, SmolLM2's template inserts its own default system turn
        assert render_go(mf["TEMPLATE"], conv) == llama_cpp_rendering(jinja, conv)

    # --system replaces the MediLoRA prompt; an artifact folder is accepted where a file is asked (the tiny
    # Llama's f16 artifact, also a ChatML model: the same stop strings, read from its small vocabulary)
    p = tools_cli("export", "ollama", tiny_f16.path, "--out", tmp_path / "o2", "--system", "Be terse.", "--json",
                  check=True)
    assert json.loads(p.stdout)["manifest"]["extra"]["stop"] == ["<|im_end|>", "<|im_start|>"]
    mf2 = parse_modelfile((tmp_path / "o2" / "Modelfile").read_text())
    assert mf2["SYSTEM"] == "Be terse." and mf2["FROM"] == f"./{tiny_f16.extra['file']}"


def test_lmstudio_layout(tools_cli, tiny_f16, tmp_path):
    """PUBLISHER/<file name less its type>-GGUF/<file> (the tiny Llama's f16: the layout is the model's name's)."""
    gguf = tiny_f16.path / tiny_f16.extra["file"]
    assert gguf.name.endswith("-F16.gguf")
    tools_cli("export", "lmstudio", gguf, "--out", tmp_path / "lms", "--publisher", "medilora", check=True)
    files = sorted(p.relative_to(tmp_path / "lms").as_posix() for p in (tmp_path / "lms").rglob("*.gguf"))
    assert files == [f"medilora/{gguf.name[:-len('-F16.gguf')]}-GGUF/{gguf.name}"]


def test_go_template_subset_and_refusals():
    from release.export import go_template, probe_template, render_go
    from tools.tinymodel import CHATML_TEMPLATE

    tpl = go_template(probe_template(CHATML_TEMPLATE, "", "<|im_end|>"))
    msgs = [{"role": "user", "content": "hi"}]
    assert render_go(tpl, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # an assistant message last is continued, not followed by a new header (Ollama's convention)
    assert render_go(tpl, msgs + [{"role": "assistant", "content": "Yes"}]).endswith("assistant\nYes<|im_end|>\n")
    assert render_go("a  {{- .System -}}  b{{ if .Prompt }}x{{ else }}y{{ end }}", [], system="S") == "aSby"
    assert render_go('{{ if eq "a" "b" "a" }}1{{ end }}{{ len .Messages }}', msgs) == "11"
    with pytest.raises(UserError, match="missing"):
        render_go("{{ if .System }}x", [])
    with pytest.raises(UserError, match="unsupported function"):
        render_go("{{ printf .System }}", [])
    # a template that transforms the content cannot be expressed: refused, never approximated
    upper = CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(UserError, match="cannot locate"):
        probe_template(upper, "", "")
