"""A transparent estimate of a prompt's complexity, used when the caller gives no hint.

Rules, in order (the prompt is the text of every non-assistant message):

1. ``complex`` when the prompt carries code (a fenced block or two code-like lines), names a
   technology (a language, framework, "algorithm", "database"...: ``_TECH_TERMS``), pairs a
   generic programming word with a build verb ("write a function"), carries math (an equation,
   an expression over digits or variables, a math term such as "integral" or "divided by"),
   or a reasoning-puzzle phrasing ("step by step", "what is the probability"...);
2. otherwise points are added up: length (over 40, 120, 300 words: +1 each), each distinct
   analysis verb (explain why, compare, evaluate, design...: +1, at most 2), several questions
   or a numbered/bulleted list of asks (+1 each), constraint words (must, at least, exactly...:
   +0.5 each, at most 1), and a generation or transformation task verb (write, draft, summarize,
   rewrite, extract, translate...: +1);
3. points >= 3.5: ``complex``; >= 1: ``medium``; else ``simple`` (a short question or request).

The thresholds are round numbers and the word lists generic; they were checked against the
labelled set that ``ops/bench_complexity.py`` builds from the shared data (labelling rule there),
not fitted to it. Measured there: 77% overall agreement (simple 95%, medium 54%, complex 63%);
13% of complex prompts are estimated simple, mostly Arena-Hard writing and advice prompts
without technical markers. ``explain`` returns the features behind a decision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_WORD = re.compile(r"[A-Za-z0-9_']+")
_FENCE = re.compile(r"```|~~~")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|#include|public |private |function\b|const |let |var |return\b"
    r"|for\s*\(|while\s*\(|if\s*\(|SELECT\b|CREATE TABLE|<\w+[^>]*>|\$\s|[\w.]+\([^()]*\)\s*[;{]|.*[;{]\s*$)",
    re.MULTILINE,
)
_TECH_TERMS = re.compile(
    r"(?<![\w+#])(c\+\+|c#)(?![\w+#])|"
    r"\b(python|javascript|typescript|golang|rust|kotlin|php|ruby|scala|haskell|sql|regex|"
    r"regular expression|bash|shell script|powershell|html|css|react|angular|vue|django|flask|fastapi|"
    r"node\.?js|pandas|numpy|pytorch|tensorflow|keras|scikit-learn|sklearn|matplotlib|seaborn|docker|"
    r"kubernetes|terraform|ansible|linux|nginx|postgres\w*|mysql|mongodb|redis|kafka|spark|hadoop|aws|azure|"
    r"gcp|lambda function|android|ios app|swiftui|jetpack|unity|unreal|vba|excel formula|json|yaml|xml|"
    r"api endpoint|rest api|graphql|git|github|compiler|kernel|gpu|cuda|neural network|machine learning|"
    r"deep learning|llm|transformer model|dataset|database|algorithm|data structure|recursion|big-o|array|"
    r"cron|assembly language|x86|arm64|shader|bytecode|mutex|multithreading|async|asynchronous)s?\b",
    re.IGNORECASE,
)
_CODE_TERMS = re.compile(
    r"\b(function|method|class|code|program|script|library|framework|module|bug|stack trace|exception|"
    r"implementation|unit test|api|query|loop|variable)s?\b", re.IGNORECASE)
_BUILD_VERBS = re.compile(
    r"\b(write|implement|create|build|develop|fix|debug|refactor|optimi[sz]e|generate|convert|"
    r"port|design|make)\b", re.IGNORECASE)
_MATH_EXPR = re.compile(
    r"(\d\s*[\+\*/\^×÷]\s*\(?\d|\b[a-z]\s*\^\s*\d|\b\d*[a-z]\s*[\+\-\*/]\s*\d*[a-z]?\s*=\s*\d*[a-z(]|"
    r"\\frac|\\int|\\sum|∫|√|∑|\b[fgh]\s*\(\s*[a-z0-9]\s*\)\s*=|\b[xyzn]\s*=\s*-?\d)")
_MATH_TERMS = re.compile(
    r"\b(integral|derivative|differentiate|integrate|equation|inequality|polynomial|matrix|matrices|"
    r"eigen\w*|theorem|lemma|proof|prove that|probability|expected value|variance|combinatorics|permutations?|"
    r"prime numbers?|modulo|divided by|logarithm|geometric|arithmetic sequence|triangle|vertices|"
    r"radius|solve for|calculate|compute)\b", re.IGNORECASE)
_PUZZLE = re.compile(
    r"\b(step[- ]by[- ]step|think carefully|reasoning|riddle|puzzle|paradox|how many \w+ (are|do|does|will)|"
    r"what is the probability|which of the following|deduce|infer)\b", re.IGNORECASE)
_ANALYSIS = (
    re.compile(r"\bexplain (why|how)\b", re.I), re.compile(r"\b(compare|contrast)\b", re.I),
    re.compile(r"\b(evaluate|assess|critique|critically)\b", re.I), re.compile(r"\b(analy[sz]e|analysis)\b", re.I),
    re.compile(r"\b(design|architect\w*|strategy|plan for)\b", re.I),
    re.compile(r"\b(trade-?offs?|pros and cons|advantages and disadvantages)\b", re.I),
    re.compile(r"\b(justify|derive|optimi[sz]e)\b", re.I),
)
_TASK_VERBS = re.compile(
    r"\b(write|compose|draft|create|generate|summari[sz]e|rewrite|rephrase|paraphrase|translate|extract|"
    r"classify|describe|outline|list|suggest|recommend|imagine|pretend|act as|role-?play|edit|proofread|"
    r"explain|discuss|tell me about|brainstorm|develop|identify|provide)\b", re.IGNORECASE)
_CONSTRAINTS = re.compile(
    r"\b(must|should|at least|at most|no more than|exactly|without|ensure|format|in the style of|"
    r"limit(ed)? to|within \d+)\b", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[-*•]|[a-z][.)])\s+\S", re.MULTILINE)

SIMPLE_BELOW = 1.0
COMPLEX_FROM = 3.5


@dataclass(frozen=True)
class Estimate:
    """A complexity label and the evidence behind it."""

    label: str
    points: float
    reasons: tuple[str, ...] = field(default_factory=tuple)


def prompt_text(messages: Iterable[Mapping[str, str]]) -> str:
    """The text that is judged: every message except earlier assistant answers."""
    return "\n".join(str(m.get("content") or "") for m in messages if m.get("role") != "assistant")


def explain(text: str) -> Estimate:
    """The label of ``text`` with the features that decided it."""
    words = len(_WORD.findall(text))
    code_lines = len(_CODE_LINE.findall(text))
    if _FENCE.search(text) or code_lines >= 2:
        return Estimate("complex", COMPLEX_FROM, ("code block",))
    if _TECH_TERMS.search(text) or (_CODE_TERMS.search(text) and _BUILD_VERBS.search(text)):
        return Estimate("complex", COMPLEX_FROM, ("technical or programming task",))
    if _MATH_EXPR.search(text) or _MATH_TERMS.search(text):
        return Estimate("complex", COMPLEX_FROM, ("math",))
    if _PUZZLE.search(text):
        return Estimate("complex", COMPLEX_FROM, ("reasoning",))

    points = 0.0
    reasons: list[str] = []
    for limit in (40, 120, 300):
        if words > limit:
            points += 1
            reasons.append(f">{limit} words")
    analysis = sum(1 for pattern in _ANALYSIS if pattern.search(text))
    if analysis:
        points += min(analysis, 2)
        reasons.append(f"{analysis} analysis verb(s)")
    if text.count("?") >= 2:
        points += 1
        reasons.append("several questions")
    if len(_LIST_ITEM.findall(text)) >= 3:
        points += 1
        reasons.append("list of asks")
    constraints = len(_CONSTRAINTS.findall(text))
    if constraints:
        points += min(0.5 * constraints, 1.0)
        reasons.append(f"{constraints} constraint(s)")
    if _TASK_VERBS.search(text):
        points += 1
        reasons.append("task verb")
    if points >= COMPLEX_FROM:
        label = "complex"
    elif points >= SIMPLE_BELOW:
        label = "medium"
    else:
        label = "simple"
    return Estimate(label, points, tuple(reasons))


def estimate_complexity(messages: Iterable[Mapping[str, str]]) -> str:
    """``simple``, ``medium`` or ``complex`` for an OpenAI-style message list."""
    return explain(prompt_text(messages)).label
