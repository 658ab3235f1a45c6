"""The Modelfile's TEMPLATE renders, under Go's text/template (Ollama's engine), exactly what
zhtune renders for the same conversation: every built-in template, conversations with and
without a system message (Ollama then takes the Modelfile's SYSTEM), multi-turn, and text with
braces. Go itself runs the templates (skipped, with the reason, where ``go`` is missing)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from dataclasses import replace

import pytest

from zhtune.data.templates import TEMPLATES, render_text, to_jinja
from zhtune.infer.ollama import go_template, matching_template, modelfile

GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	System   string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("t").Parse(c.Template))
		var b []byte
		w := &writer{&b}
		if err := t.Execute(w, c); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type writer struct{ b *[]byte }

func (w *writer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
    [
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "{{ .System }} and {{braces}} stay text\nline two"},
    ],
    [
        {"role": "system", "content": "系统"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render cases with Go's text/template: ``[(template, system, messages)] -> [text]``."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the Ollama TEMPLATE is not executed")
    work = tmp_path_factory.mktemp("go")
    (work / "main.go").write_text(GO_PROGRAM)
    env = {
        "HOME": str(work),
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(
        [go, "build", "-o", str(work / "render"), str(work / "main.go")], check=True, env=env, cwd=work
    )

    def render(cases: list[tuple[str, str, list[dict]]]) -> list[str]:
        payload = [
            {
                "Template": t,
                "System": s,
                "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs],
            }
            for t, s, msgs in cases
        ]
        done = subprocess.run(
            [str(work / "render")], input=json.dumps(payload), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


def ollama_view(messages: list[dict], default_system: str) -> tuple[str, list[dict]]:
    """What Ollama hands the template: the system message (else the Modelfile's SYSTEM) as
    ``.System``, and every message (system ones too) as ``.Messages``."""
    system = next((m["content"] for m in messages if m["role"] == "system"), default_system)
    if not any(m["role"] == "system" for m in messages) and default_system:
        messages = [{"role": "system", "content": default_system}, *messages]
    return system, messages


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_what_zhtune_renders(name, go_render):
    template = TEMPLATES[name]
    specials = {"bos": "<s>", "eos": "</s>"}
    tok = type("Tok", (), {"bos_token": "<s>", "eos_token": "</s>"})()
    go = go_template(template, specials)
    cases, want = [], []
    for conv in CONVERSATIONS:
        system, messages = ollama_view(conv, template.default_system)
        cases.append((go, system, messages))
        want.append(render_text(template, conv, tok, add_generation_prompt=True))
    assert go_render(cases) == want


def test_the_tokenizers_own_template_is_matched_with_its_default_system(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # not the session's tokenizer
    chatml = replace(TEMPLATES["chatml"], default_system="You are SmolLM.")
    tok.chat_template = to_jinja(chatml, tok)
    found = matching_template(tok)
    assert found is not None and found.name == "chatml" and found.default_system == "You are SmolLM."
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert matching_template(tok) is None


def test_modelfile_has_from_template_system_and_stops(tiny_tokenizer):
    text = modelfile("run-q4_k_m.gguf", TEMPLATES["qwen"], tiny_tokenizer, "qwen")
    lines = text.splitlines()
    assert "FROM ./run-q4_k_m.gguf" in lines
    assert 'SYSTEM "You are a helpful assistant."' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert any(line.startswith('TEMPLATE """') for line in lines)


def test_an_untranslatable_template_leaves_template_out_and_says_why(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    text = modelfile("x-f16.gguf", None, tok, "tokenizer")
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "")
    assert "# no TEMPLATE: the tokenizer's own chat template renders like none" in text
