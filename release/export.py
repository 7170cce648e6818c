"""Hand a GGUF to the runtimes laptop users run: an Ollama Modelfile and an LM Studio folder.

The Modelfile's TEMPLATE is derived from the GGUF's *own* chat template (``tokenizer.chat_template``):
the Jinja template is rendered (the way llama-cpp-python's ``Jinja2ChatFormatter`` does) on probe
conversations, the per-role prefixes and suffixes are read off, and an Ollama Go template over
``.Messages`` is written from them. The Go template is then rendered with :func:`render_go` (a
small interpreter of exactly the Go ``text/template`` subset we emit: text, ``if / else if / else``,
``range $i, $m := ...``, ``eq ne and or not len slice index``, field access, trim markers) on
several conversations and must give the Jinja text byte for byte, else the export fails: a
template we cannot express is refused, never approximated.

Ollama semantics the template relies on: the Modelfile's SYSTEM is prepended as a system message
when a request has none; a conversation whose last message is the assistant's is continued
(no new assistant header), as Ollama's own templates do.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from corpora.sft import system_prompt
from tools.artifact import Stage, is_artifact
from tools.errors import UserError, WorkError
from tools.ggufpath import gguf_shards, resolve_gguf
from tools.llm import SAMPLING_DEFAULTS
from tools.progress import log

from .ggufinfo import gguf_module, read_gguf

OLLAMA_PARAMS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty")
_S = {"system": "\u2063sys\u2063", "user": "\u2063usr\u2063", "assistant": "\u2063ast\u2063"}


# -- Jinja side (as llama-cpp-python renders it) --------------------------------------------------

def jinja_renderer(template: str, bos: str = "", eos: str = ""):
    """A function(messages, add_generation_prompt) -> text, with llama-cpp-python's Jinja settings."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    try:
        tpl = env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the GGUF's chat template does not parse ({e})", field="tokenizer.chat_template") from None

    def render(messages, add_generation_prompt=True):
        def raise_exception(msg):
            raise jinja2.TemplateError(msg)
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                          eos_token=eos, raise_exception=raise_exception)
    return render


def _cut(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise UserError(f"chat template: cannot locate the {what} content in its rendering",
                        field="tokenizer.chat_template")
    a, b = text.split(marker)
    return a, b


def probe_template(template: str, bos: str = "", eos: str = "") -> dict:
    """Per-role prefix/suffix, generation prompt and default system block of a turn-based template."""
    r = jinja_renderer(template, bos, eos)

    def render(msgs, gen):
        t = r(msgs, gen)
        return t[len(bos):] if bos and t.startswith(bos) else t

    S = {"role": "system", "content": _S["system"]}
    U = {"role": "user", "content": _S["user"]}
    A = {"role": "assistant", "content": _S["assistant"]}
    # [S] -> sys_pre S sys_suf ; [S,U] -> ... user_pre U user_suf ; [S,U,A] ; [S,U] + gen
    sys_pre, sys_suf = _cut(render([S], False), _S["system"], "system")
    su = render([S, U], False)
    head, user_suf = _cut(su, _S["user"], "user")
    if not head.startswith(sys_pre + _S["system"] + sys_suf):
        raise UserError("chat template: a system turn is not a fixed prefix of the conversation",
                        field="tokenizer.chat_template")
    user_pre = head[len(sys_pre + _S["system"] + sys_suf):]
    sua = render([S, U, A], False)
    if not sua.startswith(su):
        raise UserError("chat template: turns are not rendered independently", field="tokenizer.chat_template")
    asst_pre, asst_suf = _cut(sua[len(su):], _S["assistant"], "assistant")
    gen_full = render([S, U], True)
    if not gen_full.startswith(su):
        raise UserError("chat template: the generation prompt is not appended after the turns",
                        field="tokenizer.chat_template")
    gen = gen_full[len(su):]
    u_only = render([U], False)
    head, _ = _cut(u_only, _S["user"], "user")
    if not head.endswith(user_pre):
        raise UserError("chat template: the user turn differs without a system message",
                        field="tokenizer.chat_template")
    default_system = head[: len(head) - len(user_pre)]
    parts = {"sys_pre": sys_pre, "sys_suf": sys_suf, "user_pre": user_pre, "user_suf": user_suf,
             "asst_pre": asst_pre, "asst_suf": asst_suf, "gen": gen, "default_system": default_system,
             "bos_stripped": bool(bos) and r([S], False).startswith(bos)}
    for k, v in parts.items():
        if isinstance(v, str) and ("{{" in v or "}}" in v or '"""' in v):
            raise UserError(f"chat template: its {k} text holds '{{{{', '}}}}' or '\"\"\"', which a Modelfile "
                            "cannot carry", field="tokenizer.chat_template")
    return parts


def go_template(p: dict) -> str:
    """The Ollama Go template (over .Messages) for the probed parts."""
    out = []
    if p["default_system"]:
        out.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + p["default_system"]
                   + "{{ end }}")
    out.append("{{ range $i, $m := .Messages }}")
    out.append('{{ if eq $m.Role "system" }}' + p["sys_pre"] + "{{ $m.Content }}" + p["sys_suf"])
    out.append('{{ else if eq $m.Role "user" }}' + p["user_pre"] + "{{ $m.Content }}" + p["user_suf"])
    out.append('{{ else if eq $m.Role "assistant" }}' + p["asst_pre"] + "{{ $m.Content }}" + p["asst_suf"])
    out.append("{{ end }}")
    if p["gen"]:
        out.append('{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}' + p["gen"] + "{{ end }}")
    out.append("{{ end }}")
    return "".join(out)


def stop_strings(p: dict, eos: str = "") -> list[str]:
    """Where a reply ends: the assistant turn's closing marker, the next turn's opening marker, EOS."""
    stops = []
    end = p["asst_suf"].strip()
    if end:
        stops.append(end)
    m = re.match(r"\s*(\S+?)(?=user)", p["user_pre"])  # '<|im_start|>' of '<|im_start|>user\n'
    if m:
        stops.append(m.group(1))
    if eos and eos.strip():
        stops.append(eos.strip())
    return list(dict.fromkeys(s for s in stops if s))


# -- a Go text/template interpreter for the subset above ------------------------------------------

_TOK = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$\w*(?:\.\w+)*|(?:\.[A-Za-z_]\w*)+|\.|[A-Za-z_]\w*)\s*')


def _lex_actions(src: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', s)] with Go's trim markers applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    while True:
        i = src.find("{{", pos)
        if i < 0:
            items.append(("text", src[pos:]))
            break
        j = src.find("}}", i)
        if j < 0:
            raise UserError("Go template: unclosed action", field="TEMPLATE")
        text = src[pos:i]
        body = src[i + 2:j]
        if body.startswith("- "):
            text = text.rstrip(" \t\r\n")
            body = body[2:]
        trim_right = body.endswith(" -")
        if trim_right:
            body = body[:-2]
        items.append(("text", text))
        items.append(("action", body.strip()))
        pos = j + 2
        if trim_right:
            while pos < len(src) and src[pos] in " \t\r\n":
                pos += 1
    return [it for it in items if not (it[0] == "text" and it[1] == "")]


def _parse_expr(tokens: list[str], i: int):
    """A command: operand, or function name followed by operands. Returns (node, next index)."""
    args = []
    while i < len(tokens) and tokens[i] != ")":
        t = tokens[i]
        if t == "(":
            node, i = _parse_expr(tokens, i + 1)
            if i >= len(tokens) or tokens[i] != ")":
                raise UserError("Go template: unbalanced parenthesis", field="TEMPLATE")
            i += 1
            while i < len(tokens) and tokens[i].startswith(".") and tokens[i] != ".":
                node = ("field", node, tokens[i][1:])
                i += 1
            args.append(node)
            continue
        if t.startswith('"'):
            args.append(("lit", json.loads(t)))
        elif re.fullmatch(r"-?\d+", t):
            args.append(("lit", int(t)))
        elif t.startswith("$"):
            name, *fields = t.split(".")
            node = ("var", name)
            for f in fields:
                node = ("field", node, f)
            args.append(node)
        elif t == ".":
            args.append(("dot",))
        elif t.startswith("."):
            node = ("dot",)
            for f in t[1:].split("."):
                node = ("field", node, f)
            args.append(node)
        else:
            args.append(("fn", t))
        i += 1
    if not args:
        raise UserError("Go template: empty expression", field="TEMPLATE")
    if args[0][0] == "fn":
        return ("call", args[0][1], args[1:]), i
    if len(args) != 1:
        raise UserError("Go template: operands without a function", field="TEMPLATE")
    return args[0], i


def _expr(src: str):
    tokens, pos = [], 0
    while pos < len(src):
        m = _TOK.match(src, pos)
        if not m:
            raise UserError(f"Go template: cannot read {src!r}", field="TEMPLATE")
        tokens.append(m.group(1))
        pos = m.end()
    node, i = _parse_expr(tokens, 0)
    if i != len(tokens):
        raise UserError(f"Go template: trailing tokens in {src!r}", field="TEMPLATE")
    return node


def _parse_go(items, i=0, stop=("end",), nested=False):
    """Items -> node list, until one of ``stop`` (returned with the index after it)."""
    nodes = []
    while i < len(items):
        kind, s = items[i]
        if kind == "text":
            nodes.append(("text", s))
            i += 1
            continue
        word = s.split(None, 1)[0] if s else ""
        if word in ("end", "else"):
            if word not in stop:
                raise UserError(f"Go template: unexpected {{{{ {s} }}}}", field="TEMPLATE")
            return nodes, i, s
        if word == "if":
            branches = []
            cond = _expr(s[2:].strip())
            while True:
                body, i, term = _parse_go(items, i + 1, stop=("end", "else"), nested=True)
                branches.append((cond, body))
                if term == "end":
                    break
                rest = term[4:].strip()
                if rest.startswith("if "):
                    cond = _expr(rest[3:].strip())
                elif rest == "":
                    cond = ("lit", True)
                else:
                    raise UserError(f"Go template: unsupported {{{{ {term} }}}}", field="TEMPLATE")
            nodes.append(("if", branches))
            i += 1
            continue
        if word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", s)
            if not m:
                raise UserError(f"Go template: unsupported {{{{ {s} }}}}", field="TEMPLATE")
            body, i, term = _parse_go(items, i + 1, stop=("end",), nested=True)
            nodes.append(("range", m.group(1), m.group(2), _expr(m.group(3)), body))
            i += 1
            continue
        nodes.append(("print", _expr(s)))
        i += 1
    if nested:
        raise UserError("Go template: missing {{ end }}", field="TEMPLATE")
    return nodes, i, None


def _truth(v) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, dict, tuple)) and len(v) == 0)


def _eval(node, dot, env):
    k = node[0]
    if k == "lit":
        return node[1]
    if k == "dot":
        return dot
    if k == "var":
        if node[1] not in env:
            raise UserError(f"Go template: undefined variable {node[1]}", field="TEMPLATE")
        return env[node[1]]
    if k == "field":
        obj = _eval(node[1], dot, env)
        if not isinstance(obj, dict) or node[2] not in obj:
            raise UserError(f"Go template: no field {node[2]}", field="TEMPLATE")
        return obj[node[2]]
    name, args = node[1], node[2]
    if name == "and":
        v = True
        for a in args:
            v = _eval(a, dot, env)
            if not _truth(v):
                return v
        return v
    if name == "or":
        v = False
        for a in args:
            v = _eval(a, dot, env)
            if _truth(v):
                return v
        return v
    vals = [_eval(a, dot, env) for a in args]
    if name == "not":
        return not _truth(vals[0])
    if name == "eq":
        return any(vals[0] == v for v in vals[1:])
    if name == "ne":
        return vals[0] != vals[1]
    if name == "len":
        return len(vals[0])
    if name == "slice":
        return vals[0][vals[1]:vals[2]] if len(vals) > 2 else vals[0][vals[1]:]
    if name == "index":
        if not 0 <= vals[1] < len(vals[0]):
            raise UserError("Go template: index out of range", field="TEMPLATE")
        return vals[0][vals[1]]
    raise UserError(f"Go template: unsupported function {name}", field="TEMPLATE")


def _exec(nodes, dot, env, out):
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "print":
            v = _eval(n[1], dot, env)
            out.append("" if v is None else str(v))
        elif n[0] == "if":
            for cond, body in n[1]:
                if _truth(_eval(cond, dot, env)):
                    _exec(body, dot, env, out)
                    break
        elif n[0] == "range":
            seq = _eval(n[3], dot, env)
            for i, item in enumerate(seq or []):
                e = dict(env)
                if n[1]:
                    e[n[1]], e[n[2]] = i, item
                _exec(n[4], item, e, out)


def render_go(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render ``template`` as Ollama would for a chat request (SYSTEM prepended when none is given)."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and (not msgs or msgs[0]["Role"] != "system"):
        msgs.insert(0, {"Role": "system", "Content": system})
    data = {"Messages": msgs, "System": system or "", "Prompt": "", "Response": ""}
    nodes, i, term = _parse_go(_lex_actions(template))
    if term is not None:
        raise UserError(f"Go template: unexpected {{{{ {term} }}}}", field="TEMPLATE")
    out: list[str] = []
    _exec(nodes, data, {"$": data}, out)
    return "".join(out)


# -- Modelfile ------------------------------------------------------------------------------------

def _quote(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v) if isinstance(v, float) else str(v)


def modelfile_text(gguf_name: str, template: str, system: str, params: dict, stops: list[str],
                   adapter: str | None = None) -> str:
    if '"""' in system:
        raise UserError('the system prompt holds """, which a Modelfile cannot carry', field="--system")
    lines = [f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f'TEMPLATE """{template}"""')
    lines.append(f'SYSTEM """{system}"""')
    for k in OLLAMA_PARAMS:
        if k in params:
            lines.append(f"PARAMETER {k} {params[k]}")
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """FROM / ADAPTER / TEMPLATE / SYSTEM / PARAMETER of a Modelfile (Ollama's syntax, triple quotes too)."""
    out: dict = {"params": {}, "stop": []}
    i = 0
    n = len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or n
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        if not m:
            raise UserError("Modelfile: expected an instruction", line=text.count("\n", 0, i) + 1)
        cmd = m.group(1).upper()
        i = m.end()
        if text.startswith('"""', i):
            j = text.find('"""', i + 3)
            if j < 0:
                raise UserError('Modelfile: unterminated """', line=text.count("\n", 0, i) + 1)
            value, i = text[i + 3:j], j + 3
        else:
            j = text.find("\n", i)
            j = n if j < 0 else j
            value, i = text[i:j].strip(), j
        if cmd == "PARAMETER":
            key, _, raw = value.partition(" ")
            raw = raw.strip()
            v = json.loads(raw) if raw.startswith('"') else (float(raw) if re.search(r"[.eE]", raw) else int(raw))
            if key == "stop":
                out["stop"].append(v)
            else:
                out["params"][key] = v
        else:
            out[cmd] = value
    return out


def read_chat_parts(gguf: Path) -> dict:
    """The GGUF's chat template, BOS/EOS texts and whether llama.cpp adds BOS."""
    info = read_gguf(gguf, tensors=False)
    tpl = info["chat_template"]
    if not tpl:
        raise UserError("the GGUF carries no chat template (tokenizer.chat_template)", path=str(gguf))
    r = gguf_module().GGUFReader(str(gguf), "r")
    f = r.fields.get("tokenizer.ggml.tokens")

    def tok(key):
        v = info["metadata"].get(key)
        if f is None or not isinstance(v, int) or not 0 <= v < len(f.data):
            return ""
        return bytes(f.parts[f.data[v]]).decode("utf-8", "replace")

    return {"template": tpl, "bos": tok("tokenizer.ggml.bos_token_id"), "eos": tok("tokenizer.ggml.eos_token_id"),
            "add_bos": bool(info["metadata"].get("tokenizer.ggml.add_bos_token", False)), "info": info}


PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Is aspirin an NSAID?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": "yes."}, {"role": "user", "content": "why?  "}],
]


def check_template(go_tpl: str, jinja_tpl: str, bos: str, eos: str, system: str) -> int:
    """Go rendering (Ollama, SYSTEM injected) == Jinja rendering (llama.cpp) on the probe conversations."""
    r = jinja_renderer(jinja_tpl, bos, eos)
    for conv in PROBE_CONVERSATIONS:
        full = conv if conv[0]["role"] == "system" else [{"role": "system", "content": system}] + conv
        want = r(full, True)
        if bos and want.startswith(bos):
            want = want[len(bos):]
        got = render_go(go_tpl, conv, system=system)
        if got != want:
            raise WorkError(f"the Ollama template does not reproduce the GGUF's chat template on a test "
                            f"conversation ({got!r} vs {want!r})")
    return len(PROBE_CONVERSATIONS)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sampling() -> dict:
    return {k: SAMPLING_DEFAULTS[k] for k in OLLAMA_PARAMS if k in SAMPLING_DEFAULTS}


def default_system(task: str = "pubmedqa") -> str:
    try:
        return system_prompt(task)
    except KeyError:
        raise UserError(f"no system prompt for {task!r} in the MediLoRA system prompts", field="--system-task") from None


def export_ollama(model, out, *, name: str | None = None, system: str | None = None, system_task: str = "pubmedqa",
                  adapter=None, force: bool = False):
    """Artifact ``out`` (stage ``export.ollama``): the GGUF (hard link), Modelfile, README.md."""
    model = Path(model)
    gguf = resolve_gguf(model, "MODEL")
    parts = read_chat_parts(gguf)
    adapter_gguf = resolve_gguf(adapter, "--adapter") if adapter else None
    system = system if system is not None else default_system(system_task)
    probe = probe_template(parts["template"], parts["bos"] if parts["add_bos"] else "", parts["eos"])
    tpl = go_template(probe)
    check_template(tpl, parts["template"], parts["bos"] if parts["add_bos"] else "", parts["eos"], system)
    stops = stop_strings(probe, parts["eos"])
    params = _sampling()
    name = name or re.sub(r"[^a-z0-9._-]+", "-", gguf.stem.lower()).strip("-")
    inputs = [model if is_artifact(model) else gguf] + ([Path(adapter)] if adapter else [])
    with Stage("export.ollama", out, {"name": name, "system": system, "params": params, "stop": stops},
               inputs=inputs, force=force, log=log) as st:
        if st.skipped:
            return st.result
        for f in gguf_shards(gguf):  # a split model: every shard beside the first (llama.cpp loads them so)
            _link(f, st.path(f.name))
        if adapter_gguf:
            _link(adapter_gguf, st.path(adapter_gguf.name))
        mf = modelfile_text(gguf.name, tpl, system, params, stops, adapter_gguf.name if adapter_gguf else None)
        st.path("Modelfile").write_text(mf, encoding="utf-8")
        st.path("README.md").write_text(_ollama_readme(name, gguf.name, params, stops), encoding="utf-8")
        st.extra.update({"file": gguf.name, "name": name, "modelfile": "Modelfile", "stop": stops, "params": params,
                         "template_checked_conversations": len(PROBE_CONVERSATIONS),
                         "adapter": adapter_gguf.name if adapter_gguf else None})
    return st.result


def _ollama_readme(name, file, params, stops) -> str:
    return (f"# {name} for Ollama\n\n"
            f"This folder holds `{file}` and a `Modelfile` (chat template from the GGUF, the MediLoRA system "
            "prompt and the evaluation protocol's sampling settings).\n\n"
            "```sh\n"
            f"ollama create {name} -f Modelfile\n"
            f"ollama run {name}\n"
            "```\n\n"
            "Sampling: " + ", ".join(f"{k} {v}" for k, v in params.items())
            + "; stops: " + ", ".join(f"`{s}`" for s in stops) + ".\n"
            "Not a medical device; not for clinical decisions.\n")


def export_lmstudio(model, out, *, publisher: str = "medilora", name: str | None = None, force: bool = False):
    """Artifact ``out`` (stage ``export.lmstudio``): ``PUBLISHER/MODEL-GGUF/<file>.gguf`` + README.md,
    the folder layout LM Studio's model directory (~/.lmstudio/models) expects. LM Studio reads the
    chat template from the GGUF itself."""
    model = Path(model)
    gguf = resolve_gguf(model, "MODEL")
    read_chat_parts(gguf)  # a GGUF with a chat template
    for v, flag in ((publisher, "--publisher"), (name, "--name")):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v):
            raise UserError(f"not a folder name: {v!r}", field=flag)
    name = name or (re.sub(r"[-.](?:B?F16|F32|I?Q\d\w*)$", "", gguf.stem, flags=re.I) + "-GGUF")
    inputs = [model if is_artifact(model) else gguf]
    with Stage("export.lmstudio", out, {"publisher": publisher, "name": name}, inputs=inputs, force=force,
               log=log) as st:
        if st.skipped:
            return st.result
        d = st.path(f"{publisher}/{name}/{gguf.name}")
        d.parent.mkdir(parents=True, exist_ok=True)
        for f in gguf_shards(gguf):
            _link(f, d.parent / f.name)
        rel = f"{publisher}/{name}"
        st.path("README.md").write_text(
            f"# {name} for LM Studio\n\n```sh\nmkdir -p ~/.lmstudio/models/{publisher}\n"
            f"cp -r {rel} ~/.lmstudio/models/{publisher}/\n# or: lms import {rel}/{gguf.name}\n```\n\n"
            "LM Studio takes the chat template from the GGUF. Set the system prompt to the MediLoRA prompt and "
            "top-k 40 to match the evaluation protocol.\n", encoding="utf-8")
        st.extra.update({"file": f"{rel}/{gguf.name}", "publisher": publisher, "name": name})
    return st.result
