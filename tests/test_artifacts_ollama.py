"""finetune export --format ollama: the Modelfile's TEMPLATE, rendered as Ollama renders it, gives exactly the
prompt the training pipeline builds (each family's chat template, Alpaca and Goat); a wrong one does not;
the folder holds the GGUF the Modelfile names, and (marker gguf) llama.cpp runs it on that prompt."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from finetune.artifacts.ollama import chat_template_parts
from finetune.artifacts.ollama_template import Untranslatable, prompt_go_template, read_layout
from finetune.cli import main
from finetune.data.formats import FORMATS
from finetune.data.templates import resolve_chat_template
from finetune.eval.prompts import prompt_ids

from conftest import FAMILIES, REPO, require

# --- a renderer of exactly the Go text/template subset the export writes ------------------------------------
# text, {{ if X }} / {{ else if X }} / {{ else }} / {{ end }}, {{ range $i, $_ := X }}, {{ $v := X }}, {{ X }}
# where X is a field (.A, $.A), a variable, a string or integer, or a call of eq, len, slice, not (nested in
# parentheses). Anything else (trim markers, pipes, other functions) raises: the export must not write it.

ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def parse(template: str):
    """[node]: ("text", s), ("print", expr), ("set", name, expr), ("if", [(cond, body)], else), ("range", ...)."""
    pieces, position = [], 0
    for match in ACTION.finditer(template):
        pieces += [("text", template[position : match.start()]), ("action", match.group(1))]
        position = match.end()
    pieces.append(("text", template[position:]))
    nodes, rest = _block(pieces, 0)
    assert rest == len(pieces), "an {{ end }} without a block"
    return nodes


def _block(pieces, i):
    nodes = []
    while i < len(pieces):
        kind, text = pieces[i]
        if kind == "text":
            if text:
                nodes.append(("text", text))
            i += 1
            continue
        assert re.fullmatch(r" [^-].*[^-] ", text, re.S), f"a trim marker or no spaces: {{{{{text}}}}}"
        words = text.strip()
        if words == "end" or words == "else" or words.startswith("else if "):
            return nodes, i
        if words.startswith("if "):
            branches, otherwise = [], []
            condition = words[3:]
            while True:
                body, i = _block(pieces, i + 1)
                branches.append((_expression(condition), body))
                closing = pieces[i][1].strip()
                if closing.startswith("else if "):
                    condition = closing[8:]
                    continue
                if closing == "else":
                    otherwise, i = _block(pieces, i + 1)
                    closing = pieces[i][1].strip()
                assert closing == "end"
                break
            nodes.append(("if", branches, otherwise))
            i += 1
        elif words.startswith("range "):
            match = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", words)
            assert match, f"unsupported range: {words}"
            body, i = _block(pieces, i + 1)
            assert pieces[i][1].strip() == "end"
            nodes.append(("range", match.group(1), match.group(2), _expression(match.group(3)), body))
            i += 1
        elif re.match(r"\$\w+ := ", words):
            name, _, expression = words.partition(" := ")
            nodes.append(("set", name, _expression(expression)))
            i += 1
        else:
            nodes.append(("print", _expression(words)))
            i += 1
    return nodes, i


def _expression(text: str):
    tokens = TOKEN.findall(text)
    expression, used = _command(tokens, 0, top=True)
    assert used == len(tokens), f"unsupported expression: {text}"
    return expression


def _command(tokens, i, *, top=False):
    """A call (function and arguments up to ')' or the end) or one operand."""
    if tokens[i] in ("eq", "len", "slice", "not"):
        name, args, i = tokens[i], [], i + 1
        while i < len(tokens) and tokens[i] != ")":
            arg, i = _operand(tokens, i)
            args.append(arg)
        return ("call", name, args), i
    assert top or tokens[i] != ")", "empty parentheses"
    return _operand(tokens, i)


def _operand(tokens, i):
    token = tokens[i]
    if token == "(":
        inner, i = _command(tokens, i + 1)
        assert tokens[i] == ")"
        return inner, i + 1
    if token.startswith('"'):
        return ("value", token[1:-1].encode().decode("unicode_escape")), i + 1
    if token.isdigit():
        return ("value", int(token)), i + 1
    if re.fullmatch(r"\$?\.\w+|\$\w*", token):
        return ("ref", token), i + 1
    raise AssertionError(f"unsupported operand: {token}")


def execute(nodes, dot, variables) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(evaluate(node[1], dot, variables)))
        elif node[0] == "set":
            variables[node[1]] = evaluate(node[2], dot, variables)
        elif node[0] == "if":
            _, branches, otherwise = node
            body = next((body for cond, body in branches if truthy(evaluate(cond, dot, variables))), otherwise)
            out.append(execute(body, dot, dict(variables)))
        else:
            _, index, value, items, body = node
            for n, item in enumerate(evaluate(items, dot, variables)):
                out.append(execute(body, item, {**variables, index: n, value: item}))
    return "".join(out)


def evaluate(expression, dot, variables):
    kind = expression[0]
    if kind == "value":
        return expression[1]
    if kind == "ref":
        name = expression[1]
        if name.startswith("$."):
            return variables["$"][name[2:]]
        if name.startswith("."):
            return dot[name[1:]]
        return variables[name]
    _, function, args = expression
    values = [evaluate(arg, dot, variables) for arg in args]
    return {
        "eq": lambda a, b: a == b,
        "len": len,
        "slice": lambda items, start: items[start:],
        "not": lambda a: not truthy(a),
    }[function](*values)


def truthy(value) -> bool:
    return bool(value)  # Go: false, 0, "" and empty lists are false


def ollama_prompt(template: str, system: str | None, messages: list[dict]) -> str:
    """What Ollama renders for a chat: SYSTEM prepended as a system message when the chat has none first
    (server/routes.go), .System the system messages joined, .Messages the conversation (template/template.go)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system_text, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return execute(parse(template), data, {"$": data})


def modelfile_parts(text: str) -> dict:
    """TEMPLATE, SYSTEM, FROM and the PARAMETER lines of a Modelfile."""
    parts = {"parameters": [], "system": None}
    for key, value in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.S | re.M):
        parts[key.lower()] = value
    parts["from"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    parts["parameters"] = re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M)
    return parts


# --- the TEMPLATE of each family's chat template against the text the pipeline builds -----------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Plan a picnic for 4 people."}],
    [{"role": "system", "content": "You are a careful cook."}, {"role": "user", "content": "Bake bread?"}],
    [
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "12 * 7 = 84"},
        {"role": "user", "content": "And 84 / 4?\nShow the steps."},
    ],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
        {"role": "user", "content": "A longer one?"},
    ],
]


def training_prompt(tokenizer, messages) -> str:
    """The prompt text training builds for `messages` (data/build.py renders chat rows this way: the tokenizer's
    own template, else lima's)."""
    _, template = resolve_chat_template(None, tokenizer)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def ollama_text(tokenizer, parts, messages) -> str:
    """The text llama.cpp tokenizes in Ollama: BOS when the GGUF adds it (exactly when the tokenizer has one,
    artifacts/gguf_vocab.py), then the rendered TEMPLATE."""
    template, system, _ = parts
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    return bos + ollama_prompt(template, system, messages)


@pytest.fixture(scope="module")
def family_parts(family_model_dir):
    """family_parts(family) -> (tokenizer, (TEMPLATE, SYSTEM, end-of-turn token)) of the family's own template."""

    def parts(family: str):
        tokenizer = AutoTokenizer.from_pretrained(family_model_dir(family))
        return tokenizer, chat_template_parts(tokenizer, family, echo=print)

    return parts


@pytest.mark.parametrize("family", FAMILIES)
def test_template_renders_the_training_prompt_per_family(family, family_parts):
    tokenizer, parts = family_parts(family)
    for messages in CONVERSATIONS:
        assert ollama_text(tokenizer, parts, messages) == training_prompt(tokenizer, messages)


def test_known_templates_read_as_expected(family_parts):
    """Qwen2.5's default system message becomes SYSTEM; the end-of-turn tokens are the templates' own."""
    expected = {
        "llama": (None, "</s>"),  # lima, the tokenizer has no template
        "llama3": ("", "<|eot_id|>"),  # its system block is written always, with an empty default
        "mistral": (None, "</s>"),
        "qwen2": ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<|im_end|>"),
    }
    found = {family: family_parts(family)[1][1:] for family in FAMILIES}
    assert found == expected
    assert family_parts("llama3")[1][0].startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")


def test_a_wrong_template_fails_the_comparison(family_parts):
    """Llama-3's TEMPLATE on a ChatML run, and ChatML's without its default SYSTEM, give another prompt."""
    qwen, qwen_parts = family_parts("qwen2")
    _, llama3_parts = family_parts("llama3")
    messages = CONVERSATIONS[0]
    assert ollama_text(qwen, llama3_parts, messages) != training_prompt(qwen, messages)
    without_system = (qwen_parts[0], None, qwen_parts[2])
    assert ollama_text(qwen, without_system, messages) != training_prompt(qwen, messages)


# a template that numbers the messages, and one that changes their text: no Go layout reproduces either
UNTRANSLATABLE = {
    "numbered": "{% for m in messages %}{{ 'Turn ' ~ loop.index ~ ' ' ~ m['role'] ~ ': ' ~ m['content'] ~ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}Turn {{ messages | length + 1 }} assistant:{% endif %}",
    "upper": "{% for m in messages %}{{ m['role'] ~ ': ' ~ m['content'] | upper ~ '\\n' }}{% endfor %}",
}


@pytest.mark.parametrize("name", UNTRANSLATABLE)
def test_a_template_without_a_go_layout_is_refused(name, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = UNTRANSLATABLE[name]

    def render(messages, generation):
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )

    with pytest.raises(Untranslatable):
        read_layout(render, tokenizer.bos_token)


@pytest.mark.parametrize("data_format", ["alpaca", "goat"])
def test_prompt_format_template_gives_the_prompt_ids_of_generate(data_format, tokenizer):
    """Alpaca and Goat: BOS + the TEMPLATE for the last user message tokenizes as `finetune generate` prompts."""
    template = prompt_go_template(FORMATS[data_format].format_prompt)
    instruction = "Add 2 and 3, then name a color."
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    for messages in ([{"role": "user", "content": instruction}], [*history, {"role": "user", "content": instruction}]):
        text = ollama_prompt(template, None, messages)
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
        assert ids == prompt_ids(tokenizer, data_format, {"instruction": instruction})
    wrong = prompt_go_template(FORMATS["goat" if data_format == "alpaca" else "alpaca"].format_prompt)
    assert ollama_prompt(wrong, None, [{"role": "user", "content": instruction}]) != text


# --- the folder of a run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ollama_export(family_lora_run):
    """(run, folder, Modelfile parts) of `finetune export --format ollama --type q8_0` of Llama-3's Alpaca run."""
    run_dir = family_lora_run("llama3")
    assert main(["export", str(run_dir), "--format", "ollama", "--type", "q8_0"]) == 0
    folder = run_dir / "export" / "ollama"
    return run_dir, folder, modelfile_parts((folder / "Modelfile").read_text())


@pytest.mark.slow
def test_the_folder_holds_the_gguf_its_modelfile_names(ollama_export):
    import gguf

    run_dir, folder, parts = ollama_export
    assert sorted(path.name for path in folder.iterdir()) == ["Modelfile", "model-q8_0.gguf"]
    assert parts["from"] == "./model-q8_0.gguf"
    reader = gguf.GGUFReader(folder / "model-q8_0.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    parameters = dict(p for p in parts["parameters"] if p[0] != "stop")
    stops = [value for name, value in parts["parameters"] if name == "stop"]
    # `finetune generate`'s defaults, the run's context, and the three EOS of Llama-3.1's generation config
    assert parameters == {"temperature": "0", "top_k": "50", "top_p": "1", "repeat_penalty": "1",
                          "num_predict": "256", "num_ctx": "128"}  # fmt: skip
    assert sorted(stops) == sorted(f'"{t}"' for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert parts["system"] is None
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    messages = [{"role": "user", "content": "Name three colors."}]
    text = ollama_prompt(parts["template"], parts["system"], messages)
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    assert ids == prompt_ids(tokenizer, "alpaca", {"instruction": "Name three colors."})


@pytest.mark.slow
@pytest.mark.gguf
def test_llama_cpp_runs_the_folder_on_the_templates_prompt(ollama_export):
    """llama.cpp tokenizes the rendered prompt as Ollama does (BOS from the GGUF, special tokens parsed) into
    the ids training gave the prompt, and answers it."""
    try:
        import llama_cpp
    except ImportError as error:
        require(False, f"llama_cpp cannot be imported ({error}); pip install -e .[gguf-test]")
    run_dir, folder, parts = ollama_export
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    text = ollama_prompt(parts["template"], None, [{"role": "user", "content": "Name three colors."}])
    llm = llama_cpp.Llama(model_path=str(folder / parts["from"]), n_ctx=128, n_threads=1, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                           special=True)  # fmt: skip
        assert ids == prompt_ids(tokenizer, "alpaca", {"instruction": "Name three colors."})
        answer = llm(text, max_tokens=8, temperature=0.0)
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


@pytest.mark.slow
def test_a_chat_run_gets_its_chat_template(tiny_run):
    """A lima run on the tiny LLaMA: lima's TEMPLATE, stopped at EOS, rendering the training prompt."""
    run_dir = tiny_run("ollama-lima", data={"format": "lima", "path": str(REPO / "data" / "lima_sample.jsonl")})
    out = run_dir.parent / "ollama"
    assert main(["export", str(run_dir), "--format", "ollama", "--out", str(out)]) == 0
    parts = modelfile_parts((out / "Modelfile").read_text())
    assert parts["from"] == "./model-f16.gguf" and (out / "model-f16.gguf").is_file()
    assert [value for name, value in parts["parameters"] if name == "stop"] == ['"</s>"']
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    for messages in CONVERSATIONS:
        assert ollama_text(tokenizer, (parts["template"], parts["system"], None), messages) == training_prompt(
            tokenizer, messages
        )
