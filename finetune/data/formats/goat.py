"""Goat arithmetic: the generator, the row adapter and the answer parser.

Reproduces the task design of Goat (Liu & Low 2023, "Goat: Fine-tuned LLaMA Outperforms GPT-4 on
Arithmetic Tasks"): addition and subtraction answered directly, multiplication by a one-digit number
answered directly, and multi-digit multiplication and division decomposed into steps a model can
learn (chain of thought). The instruction phrasings are this project's own.

>>> print(multiplication_steps(397, 4429))
397 * 4429
= 4429 * (300 + 90 + 7)
= 4429 * 300 + 4429 * 90 + 4429 * 7
= 1328700 + 398610 + 31003
= 1727310 + 31003
= 1758313
>>> print(division_steps(8914, 64))
8914 - 64 * 100 = 8914 - 6400 = 2514
2514 - 64 * 30 = 2514 - 1920 = 594
594 - 64 * 9 = 594 - 576 = 18
Therefore, 8914 / 64 = 139 R 18

As in Goat's own data, a division with no remainder ends in the quotient alone:

>>> print(division_steps(768, 32))
768 - 32 * 20 = 768 - 640 = 128
128 - 32 * 4 = 128 - 128 = 0
Therefore, 768 / 32 = 24
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from finetune.data.conversation import Conversation, Segment, expect_object, text_field
from finetune.recipe.schema import GoatSpec

OPERATIONS = ("add", "sub", "mul", "div")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
UNDEFINED = "undefined"

# {a} and {b} are the operands; {op} is an operator word or symbol drawn from OPERATOR_WORDS.
PHRASINGS = (
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "Compute {a} {op} {b}",
    "Work out {a} {op} {b}, please.",
    "Find the value of {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "{a}{op}{b}=?",
    "Tell me the result of {a} {op} {b}.",
    "Evaluate: {a} {op} {b}",
    "I need to know {a} {op} {b}.",
)
OPERATOR_WORDS = {
    "add": ("+", "plus", "added to"),
    "sub": ("-", "minus", "take away"),
    "mul": ("*", "x", "times", "multiplied by"),
    "div": ("/", "divided by", "over"),
}


@dataclass(frozen=True)
class Limits:
    """Largest operand lengths, in digits, for each kind of question."""

    add_sub: int = 16
    mul_by_digit: int = 16
    mul_multi: int = 5
    div_dividend: int = 8
    div_divisor: int = 5


def digits(n: int) -> int:
    return len(str(abs(n)))


def answer(op: str, a: int, b: int) -> str:
    """The exact answer, as the model must write it: an integer, `q R r` (`q` when r is 0), or `undefined`."""
    if op == "add":
        return str(a + b)
    if op == "sub":
        return str(a - b)
    if op == "mul":
        return str(a * b)
    if b == 0:
        return UNDEFINED
    return quotient_text(*divmod(a, b))


def quotient_text(quotient: int, remainder: int) -> str:
    """`139 R 18`, or `384` for an exact division, as Goat writes them."""
    return f"{quotient} R {remainder}" if remainder else str(quotient)


def place_value_terms(n: int) -> list[int]:
    """397 -> [300, 90, 7]; zero digits are skipped."""
    text = str(n)
    return [int(d) * 10 ** (len(text) - i - 1) for i, d in enumerate(text) if d != "0"]


def multiplication_steps(a: int, b: int) -> str:
    """Split the smaller factor into place-value terms, multiply, then fold the partial products."""
    small, large = sorted((a, b))
    terms = place_value_terms(small)
    lines = [f"{a} * {b}"]
    if len(terms) > 1:
        lines.append(f"= {large} * ({' + '.join(map(str, terms))})")
    lines.append("= " + " + ".join(f"{large} * {t}" for t in terms))
    partials = [large * t for t in terms]
    while len(partials) > 1:
        lines.append("= " + " + ".join(map(str, partials)))
        partials = [partials[0] + partials[1], *partials[2:]]
    lines.append(f"= {partials[0]}")
    return "\n".join(lines)


def division_steps(a: int, b: int) -> str:
    """Subtract the largest `b * d * 10^k` that fits, until less than `b` is left."""
    lines, left, quotient = [], a, 0
    while left >= b:
        scale = 10 ** (digits(left) - digits(b))
        if b * scale > left:
            scale //= 10
        digit = left // (b * scale)
        chunk = b * digit * scale
        lines.append(f"{left} - {b} * {digit * scale} = {left} - {chunk} = {left - chunk}")
        left -= chunk
        quotient += digit * scale
    lines.append(f"Therefore, {a} / {b} = {quotient_text(quotient, left)}")
    return "\n".join(lines)


def solution(op: str, a: int, b: int) -> str:
    """The training target: direct where Goat found it learnable, step by step otherwise."""
    expression = f"{a} {SYMBOL[op]} {b}"
    if op == "div" and b == 0:
        return f"{expression} is undefined: division by zero"
    if op == "mul" and min(a, b) >= 10:
        return multiplication_steps(a, b)
    if op == "div" and b >= 10:
        return division_steps(a, b)
    return f"{expression} = {answer(op, a, b)}"


def random_operand(rng: random.Random, n_digits: int) -> int:
    if n_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def sample_problem(rng: random.Random, op: str, limits: Limits) -> tuple[int, int]:
    """Operands whose digit lengths are drawn uniformly, so every length cell is covered alike."""
    if op in ("add", "sub"):
        return random_operand(rng, rng.randint(1, limits.add_sub)), random_operand(rng, rng.randint(1, limits.add_sub))
    if op == "mul":
        if rng.random() < 0.5:
            a, b = random_operand(rng, rng.randint(1, limits.mul_by_digit)), random_operand(rng, 1)
            return (a, b) if rng.random() < 0.5 else (b, a)
        return (
            random_operand(rng, rng.randint(2, limits.mul_multi)),
            random_operand(rng, rng.randint(2, limits.mul_multi)),
        )
    divisor_digits = rng.randint(1, limits.div_divisor)
    dividend_digits = rng.randint(divisor_digits, limits.div_dividend)
    divisor = 0 if rng.random() < 0.01 else random_operand(rng, divisor_digits)
    return random_operand(rng, dividend_digits), divisor


def phrase(rng: random.Random, op: str, a: int, b: int) -> str:
    template = rng.choice(PHRASINGS)
    word = rng.choice(OPERATOR_WORDS[op])
    if "{a}{op}{b}" in template and " " in word:
        word = SYMBOL[op]  # spaces removed only around symbols: "12plus3" is not a question
    return template.format(a=a, b=b, op=word)


def generate(n: int, seed: int, ops: tuple[str, ...] = OPERATIONS, limits: Limits = Limits()) -> Iterator[dict]:
    """`n` Goat rows (`instruction`, `input`, `output`, `answer`), the same for the same seed.

    Operations take turns, so each has n / len(ops) rows.
    """
    rng = random.Random(seed)
    for i in range(n):
        op = ops[i % len(ops)]
        a, b = sample_problem(rng, op, limits)
        yield {
            "instruction": phrase(rng, op, a, b),
            "input": f"{a} {SYMBOL[op]} {b}",
            "output": solution(op, a, b),
            "answer": answer(op, a, b),
        }


def digit_split_problem(tokenizer) -> str | None:
    """Why this tokenizer makes arithmetic hard, with the numbers, or None when it writes one digit per token.

    Goat's finding: LLaMA learns arithmetic because its tokenizer splits numbers into single digits,
    so the same digit is always the same token; tokenizers that merge digit runs do not give that
    (Llama-3's byte-level BPE groups up to three digits; Qwen2's and LLaMA's SentencePiece split them).
    """
    example = "8914 / 64 = 139 R 18"
    pieces = [tokenizer.convert_tokens_to_string([piece]).strip() for piece in tokenizer.tokenize(example)]
    merged = [piece for piece in pieces if _digit_count(piece) > 1]
    if not merged:
        return None
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    grouped, total = sum(map(_digit_count, merged)), _digit_count(example)
    widest = max(map(_digit_count, merged))
    return (
        f"tokenizer {name} merges digits: {grouped} of the {total} digits of {example!r} share a token with "
        f"another digit (pieces {merged}, up to {widest} digits in one token); Goat relies on one digit per token"
    )


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def generate_from_spec(spec: GoatSpec) -> Iterator[dict]:
    """The rows a recipe's `data.goat` section asks for."""
    limits = Limits(
        add_sub=spec.add_sub_digits,
        mul_by_digit=spec.add_sub_digits,
        mul_multi=spec.mul_digits,
        div_dividend=spec.div_dividend_digits,
        div_divisor=spec.div_divisor_digits,
    )
    return generate(spec.n, spec.seed, tuple(spec.ops), limits)


def format_prompt(instruction: str) -> str:
    return f"{instruction}\nAnswer:"


def to_conversation(row: dict, ref: str, *, train_on_prompt: bool = False) -> Conversation:
    """A Goat row -> [`{instruction}\\nAnswer:` (masked), `{output}` + EOS (trained)].

    Raises:
        RowError: `instruction` or `output` missing, empty or not a string.
    """
    expect_object(row, "instruction", "output")
    prompt = format_prompt(text_field(row, "instruction", required=True))
    output = text_field(row, "output", required=True)
    return Conversation(
        (Segment(prompt, trained=train_on_prompt), Segment(output, trained=True)), row=ref, group=problem_of(row)
    )


def problem_of(row: dict) -> str | None:
    """The problem a row states (`48 + 55`), whatever its phrasing; None when the row does not say."""
    problem = row.get("input")
    return problem.strip() if isinstance(problem, str) and problem.strip() else None


_FINAL = re.compile(r"(-?\d+(?: R \d+)?|undefined)\s*$")


def parse_answer(text: str) -> str | None:
    """The final answer a model wrote: the number (or `q R r`, or `undefined`) at the end of its last line.

    `q R 0` reads as `q`, so a model trained on rows written before exact divisions ended in `q` is not
    marked wrong for a right answer.

    >>> parse_answer("8914 - 64 * 100 = ...\\nTherefore, 8914 / 64 = 139 R 18")
    '139 R 18'
    >>> parse_answer("12 + 30 = 42")
    '42'
    >>> parse_answer("768 / 2 = 384 R 0")
    '384'
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1].split("=")[-1].strip().rstrip(".")
    if last.endswith("division by zero"):
        return UNDEFINED
    match = _FINAL.search(last)
    return same_as_goat(match.group(1)) if match else None


def same_as_goat(answer: str) -> str:
    """An answer as Goat writes it: `384 R 0` (how rows were once written) -> `384`."""
    return answer.removesuffix(" R 0")


def operation_of(expression: str) -> tuple[str, int, int] | None:
    """`"397 * 4429"` -> ("mul", 397, 4429): the row's `input`, for grouping results by operation and digits."""
    match = re.fullmatch(r"\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*", expression)
    if not match:
        return None
    op = {symbol: name for name, symbol in SYMBOL.items()}[match.group(2)]
    return op, int(match.group(1)), int(match.group(3))
