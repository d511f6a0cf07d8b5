"""Read a bash launch script far enough to find the command it runs, with its arguments expanded.

Launch scripts (Megatron-LM's ``examples/*/train_*.sh`` and their many copies) build one command
from variables, arrays, defaults and an ``if`` or two. ``find_command`` follows them the way bash
would, without running anything: assignments (``X=1``, ``export X=1``, ``A=( ... )``, ``A+=( ... )``,
``S+=" ..."``), expansions (``$X``, ``${X}``, ``${X:-default}``, ``${A[@]}``, ``"${A[@]}"``,
``$((arithmetic))``), quotes, ``\\`` continuations, comments, and ``if/elif/else/fi`` on ``[ ]``,
``[[ ]]`` string and number tests. A ``for`` loop runs once, with its first value; ``while`` and
``case`` bodies are not followed. What cannot be known without running the script (``$1`` with no
default, ``$(command)``, a file test) stays as its own text, ``${NAME}``, and is reported.
"""

from __future__ import annotations

import ast
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
FD_REDIRECTION = re.compile(r"[0-9]+(?:>&[0-9]*|>>|>|<)")
OPERATORS = ("&>>", "&>", ">>", ">&", "<<", "&&", "||", ";;", "|", "&", ";", "<", ">", "(", ")")
SEPARATORS = {";", "&", ";;"}  # end a command, as a newline does
RESERVED = {
    "if",
    "then",
    "elif",
    "else",
    "fi",
    "for",
    "while",
    "until",
    "do",
    "done",
    "case",
    "esac",
    "{",
    "}",
}
DECLARERS = {"export", "declare", "local", "readonly", "typeset"}


class ScriptError(ValueError):
    """The script cannot be read (an unterminated quote) or does not run the command looked for."""


@dataclass
class Token:
    kind: str  # "word", "op", "array" (NAME=( ... ) with its raw elements), "newline"
    text: str
    line: int
    elements: list[str] = field(default_factory=list)  # "array": the raw words between the parentheses


@dataclass
class Found:
    """The command found: its words up to the program, the arguments after it, where it is."""

    program: str
    prefix: list[str]  # the words before the program (torchrun and its options)
    arguments: list[str]
    line: int
    unresolved: list[str]  # variables and substitutions the script leaves to the caller, in order
    notes: list[str]  # what was approximated (a condition not evaluated, a loop run once)


# ---- lexing -----------------------------------------------------------------------------------------


def _skip_quoted(text: str, i: int, line: int) -> int:
    """Index after the quoted string, ``$(...)``, ``${...}`` or backquotes starting at ``text[i]``."""
    start = text[i]
    if start == "'":
        end = text.find("'", i + 1)
        if end < 0:
            raise ScriptError(f"line {line}: a single quote is never closed")
        return end + 1
    if start == "`":
        j = i + 1
        while j < len(text) and text[j] != "`":
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise ScriptError(f"line {line}: a backquote is never closed")
        return j + 1
    if start == '"':
        j = i + 1
        while j < len(text) and text[j] != '"':
            if text[j] == "\\":
                j += 2
            elif text[j] == "$" and text[j + 1 : j + 2] in ("(", "{") or text[j] == "`":
                j = _skip_quoted(text, j, line)
            else:
                j += 1
        if j >= len(text):
            raise ScriptError(f"line {line}: a double quote is never closed")
        return j + 1
    # $( ... ) or ${ ... }: to the matching bracket, quotes inside skipped
    opening, closing = ("(", ")") if text[i + 1] == "(" else ("{", "}")
    depth, j = 0, i + 1
    while j < len(text):
        char = text[j]
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return j + 1
        elif char == "\\":
            j += 1
        elif char in "'\"`":
            j = _skip_quoted(text, j, line) - 1
        j += 1
    raise ScriptError(f"line {line}: '${opening}' is never closed")


def tokenize(text: str) -> list[Token]:
    """Words, operators, newlines and array literals of a script; comments and ``\\``-newlines dropped."""
    tokens: list[Token] = []
    i, line = 0, 1
    while i < len(text):
        char = text[i]
        if text.startswith("\\\n", i):
            i, line = i + 2, line + 1
        elif char == "\n":
            tokens.append(Token("newline", "\n", line))
            i, line = i + 1, line + 1
        elif char in " \t\r":
            i += 1
        elif char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif text.startswith("<<", i) and not text.startswith("<<<", i):
            i, line = _skip_heredoc(text, i, line, tokens)
        elif redirection := FD_REDIRECTION.match(text, i):  # 2> log, 1>&2: one operator
            tokens.append(Token("op", redirection.group(0), line))
            i = redirection.end()
        elif op := next((op for op in OPERATORS if text.startswith(op, i)), None):
            tokens.append(Token("op", op, line))
            i += len(op)
        else:
            start = i
            while i < len(text):
                char = text[i]
                if text.startswith("\\\n", i):  # a continuation inside a word ends it, as a blank does
                    break
                if char in " \t\r\n;&|<>()":
                    break
                if char == "\\":
                    i += 2
                elif char in "'\"`" or (char == "$" and text[i + 1 : i + 2] in ("(", "{")):
                    i = _skip_quoted(text, i, line)
                else:
                    i += 1
            word = text[start:i]
            if i < len(text) and text[i] == "(" and ASSIGNMENT.fullmatch(word):
                elements, i, lines = _array_elements(text, i + 1, line)
                tokens.append(Token("array", word, line, elements))
                line += lines
            else:
                tokens.append(Token("word", word, line))
                line += word.count("\n")
    return tokens


def _array_elements(text: str, i: int, line: int) -> tuple[list[str], int, int]:
    """The raw words of an array literal from ``text[i]`` to its ``)``; the index after it, the lines it spans."""
    end = i
    depth = 0
    while end < len(text):
        char = text[end]
        if char in "'\"`" or (char == "$" and text[end + 1 : end + 2] in ("(", "{")):
            end = _skip_quoted(text, end, line)
            continue
        if char == "\\":
            end += 2
            continue
        if char == "#" and (end == i or text[end - 1] in " \t\n("):
            newline = text.find("\n", end)
            end = len(text) if newline < 0 else newline
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        end += 1
    else:
        raise ScriptError(f"line {line}: the array's '(' is never closed")
    body = text[i:end]
    elements = [token.text for token in tokenize(body) if token.kind == "word"]
    return elements, end + 1, body.count("\n")


def _skip_heredoc(text: str, i: int, line: int, tokens: list[Token]) -> tuple[int, int]:
    """Skip ``<<WORD`` ... ``WORD``: the document is input to a command, not part of the launch line."""
    match = re.compile(r"<<-?\s*['\"]?([A-Za-z_0-9]+)['\"]?").match(text, i)
    if match is None:
        tokens.append(Token("op", "<<", line))
        return i + 2, line
    delimiter = match.group(1)
    end_of_line = text.find("\n", match.end())
    if end_of_line < 0:
        return len(text), line
    rest = text[end_of_line + 1 :]
    close = re.compile(rf"^[ \t]*{delimiter}[ \t]*$", re.MULTILINE).search(rest)
    skipped = rest[: close.end()] if close else rest
    tokens.append(Token("newline", "\n", line))
    return end_of_line + 1 + len(skipped), line + 1 + skipped.count("\n")


def _commands(tokens: list[Token]) -> list[list[Token]]:
    """Tokens grouped into commands (split at newlines and ; &); a reserved word starts a command of its own."""
    commands: list[list[Token]] = []
    current: list[Token] = []
    for token in tokens:
        if token.kind == "newline" or (token.kind == "op" and token.text in SEPARATORS):
            if current:
                commands.append(current)
            current = []
            continue
        if (
            not current
            and token.kind == "word"
            and token.text in ("then", "else", "do", "fi", "done", "{", "}")
        ):
            commands.append([token])
            continue
        current.append(token)
    if current:
        commands.append(current)
    return commands


# ---- expansion and execution ------------------------------------------------------------------------

_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.floordiv,  # bash divides integers
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _arithmetic(expression: str) -> int | None:
    """An integer expression of + - * / % ** and parentheses, or None."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            right = value(node.right)
            if isinstance(node.op, ast.Pow) and not 0 <= right <= 64:
                raise ValueError("exponent out of range")
            return _ARITHMETIC[type(node.op)](value(node.left), right)
        raise ValueError("not integer arithmetic")

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError):
        return None


class _Shell:
    """The variables of a script as it runs, and how its words expand."""

    def __init__(self, positional: Sequence[str]) -> None:
        self.scalars: dict[str, str] = {}
        self.arrays: dict[str, list[str]] = {}
        self.positional = list(positional)
        self.unresolved: list[str] = []
        self.notes: list[str] = []

    # -- variables
    def _unknown(self, name: str) -> str:
        """What cannot be known before the script runs, recorded: it stays as written (``${NAME}``)."""
        if name not in self.unresolved:
            self.unresolved.append(name)
        return name if name.startswith(("$", "`")) else "${" + name + "}"

    def lookup(self, name: str) -> str | None:
        if name.isdigit():
            index = int(name)
            if index == 0:
                return "script.sh"
            return self.positional[index - 1] if index <= len(self.positional) else None
        if name in ("@", "*"):
            return " ".join(self.positional)
        if name == "#":
            return str(len(self.positional))
        if name in self.arrays:
            return self.arrays[name][0] if self.arrays[name] else ""
        return self.scalars.get(name)

    def elements(self, name: str) -> list[str] | None:
        if name in self.arrays:
            return list(self.arrays[name])
        if name in ("@", "*"):
            return list(self.positional)
        value = self.lookup(name)
        return None if value is None else [value]

    def assign(self, name: str, value: str, append: bool) -> None:
        if name in self.arrays:
            array = self.arrays[name]
            if append and array:
                array[0] += value
            else:
                self.arrays[name] = [value] if not append else [*array, value]
            return
        self.scalars[name] = (self.scalars.get(name, "") if append else "") + value

    def assign_array(self, name: str, values: list[str], append: bool) -> None:
        current = self.arrays.get(name) or ([self.scalars.pop(name)] if name in self.scalars else [])
        self.scalars.pop(name, None)
        self.arrays[name] = [*current, *values] if append else values

    # -- expansion
    def expand(self, raw: str, split: bool = True) -> list[str]:
        """The fields a raw word expands to: quotes removed, variables substituted, unquoted ones split
        at blanks (when ``split``), ``"${A[@]}"`` one field per element."""
        fields: list[str] = []
        current: list[str] = []
        started = False

        def add(text: str) -> None:
            nonlocal started
            current.append(text)
            started = True

        def end_field() -> None:
            nonlocal started
            if started:
                fields.append("".join(current))
            current.clear()
            started = False

        def add_unquoted(text: str) -> None:
            if not split:
                add(text)
                return
            if not text:
                return
            pieces = text.split()
            if text[0].isspace():
                end_field()
            for index, piece in enumerate(pieces):
                if index:
                    end_field()
                add(piece)
            if text[-1].isspace():
                end_field()

        def add_elements(elements: list[str]) -> None:  # "${A[@]}": each element its own field
            for index, element in enumerate(elements):
                if index:
                    end_field()
                add(element)

        i = 0
        while i < len(raw):
            char = raw[i]
            if char == "\\":
                add(raw[i + 1 : i + 2])
                i += 2
            elif char == "'":
                end = raw.index("'", i + 1)
                add(raw[i + 1 : end])
                i = end + 1
            elif char == '"':
                end = _skip_quoted(raw, i, 0) - 1
                parts = self._double_quoted(raw[i + 1 : end])
                if parts != [("elements", [])]:  # "${A[@]}" of an empty array is no field at all
                    add("")  # "" is an (empty) field
                for kind, value in parts:
                    add_elements(value) if kind == "elements" else add(value)
                i = end + 1
            elif char == "$":
                kind, value, i = self._dollar(raw, i)
                if kind == "elements":
                    add_unquoted(" ".join(value))
                else:
                    add_unquoted(value) if kind == "value" else add(value)
            elif char == "`":
                end = _skip_quoted(raw, i, 0)
                add(self._unknown(raw[i:end]))
                i = end
            else:
                add(char)
                i += 1
        end_field()
        return fields

    def expand_one(self, raw: str) -> str:
        """A word expanded as one string (assignments, defaults: no splitting)."""
        return " ".join(self.expand(raw, split=False))

    def _double_quoted(self, inner: str) -> list[tuple[str, object]]:
        parts: list[tuple[str, object]] = []
        i = 0
        while i < len(inner):
            char = inner[i]
            if char == "\\" and inner[i + 1 : i + 2] == "\n":  # a continuation inside quotes: removed
                i += 2
            elif char == "\\" and inner[i + 1 : i + 2] in ('"', "\\", "$", "`"):
                parts.append(("text", inner[i + 1]))
                i += 2
            elif char == "$":
                kind, value, i = self._dollar(inner, i)
                parts.append(("elements", value) if kind == "elements" else ("text", value))
            elif char == "`":
                end = _skip_quoted(inner, i, 0)
                parts.append(("text", self._unknown(inner[i:end])))
                i = end
            else:
                parts.append(("text", char))
                i += 1
        return parts

    def _dollar(self, raw: str, i: int) -> tuple[str, object, int]:
        """Expand the ``$`` construct at ``raw[i]``: ("value", text, end), ("literal", text, end) for
        text that is not split (unknown), or ("elements", list, end) for ``${A[@]}``."""
        rest = raw[i + 1 :]
        if rest.startswith("(("):
            end = _skip_quoted(raw, i, 0)
            inner = raw[i + 3 : end - 2]
            text = " ".join(self.expand(inner.replace('"', ""), split=False))
            text = NAME.sub(lambda m: self.lookup(m.group(0)) or "0", text)
            result = _arithmetic(text)
            return (
                ("value", str(result), end)
                if result is not None
                else ("literal", self._unknown(raw[i:end]), end)
            )
        if rest.startswith("("):
            end = _skip_quoted(raw, i, 0)
            return "literal", self._unknown(raw[i:end]), end
        if rest.startswith("{"):
            end = _skip_quoted(raw, i, 0)
            return (*self._braced(raw[i + 2 : end - 1]), end)
        match = NAME.match(rest)
        if match:
            name = match.group(0)
            value = self.lookup(name)
            return (
                ("value", value, i + 1 + len(name))
                if value is not None
                else ("literal", self._unknown(name), i + 1 + len(name))
            )
        if rest[:1] and (rest[0].isdigit() or rest[0] in "@*#?$!-"):
            name = rest[0]
            if name in "@*" and self.positional:
                return "elements", list(self.positional), i + 2
            value = self.lookup(name) if name.isdigit() or name in "@*#" else None
            return ("value", value, i + 2) if value is not None else ("literal", self._unknown(name), i + 2)
        return "value", "$", i + 1

    def _braced(self, inner: str) -> tuple[str, object]:
        """``${inner}``: NAME, NAME[@], NAME[N], #NAME, NAME:-word, NAME-word, NAME:=word, NAME:+word."""
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#])\[([@*])\]", inner)
        if match:
            elements = self.elements(match.group(1))
            if elements is None:
                return "literal", self._unknown(match.group(1))
            return ("elements", elements) if match.group(2) == "@" else ("value", " ".join(elements))
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\[([0-9]+)\]", inner)
        if match:
            elements = self.elements(match.group(1))
            index = int(match.group(2))
            if elements is None:
                return "literal", self._unknown(match.group(1))
            return "value", elements[index] if index < len(elements) else ""
        if inner.startswith("#") and NAME.fullmatch(inner[1:]):
            value = self.lookup(inner[1:])
            return ("value", str(len(value))) if value is not None else ("literal", self._unknown(inner))
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#])(:?[-=+?])?(.*)", inner, re.DOTALL)
        if match is None or (match.group(2) is None and match.group(3)):
            return "literal", self._unknown(inner)  # ${X%suffix}, ${X/a/b}: not followed
        name, operation, word = match.groups()
        value = self.lookup(name)
        if operation is None:
            return ("value", value) if value is not None else ("literal", self._unknown(name))
        empty = value is None or (operation.startswith(":") and value == "")
        kind = operation[-1]
        if kind in "-=":
            if not empty:
                return "value", value
            default = self.expand_one(word)
            if kind == "=" and NAME.fullmatch(name):
                self.assign(name, default, append=False)
            return "value", default
        if kind == "+":
            return "value", "" if empty else self.expand_one(word)
        return ("value", value) if not empty else ("literal", self._unknown(name))  # ${X:?message}


# ---- conditions ---------------------------------------------------------------------------------------


def _test(words: list[str]) -> bool | None:
    """``[ words ]`` / ``[[ words ]]`` for string and number tests; None where it cannot be known."""
    if any("${" in word or "$(" in word or "`" in word for word in words):
        return None
    for joiner, combine in (("||", any), ("-o", any), ("&&", all), ("-a", all)):
        if joiner in words:
            parts, current = [], []
            for word in words:
                if word == joiner:
                    parts.append(current)
                    current = []
                else:
                    current.append(word)
            parts.append(current)
            results = [_test(part) for part in parts]
            if None in results:
                return None
            return combine(results)
    if words and words[0] == "!":
        result = _test(words[1:])
        return None if result is None else not result
    if len(words) == 1:
        return words[0] != ""
    if len(words) == 2 and words[0] in ("-z", "-n"):
        return (words[1] == "") == (words[0] == "-z")
    if len(words) == 3:
        left, test, right = words
        if test in ("=", "=="):
            return left == right
        if test == "!=":
            return left != right
        numeric = {"-eq": operator.eq, "-ne": operator.ne, "-lt": operator.lt, "-le": operator.le,
                   "-gt": operator.gt, "-ge": operator.ge}  # fmt: skip
        if test in numeric:
            try:
                return numeric[test](int(left), int(right))
            except ValueError:
                return None
    return None


def _condition(shell: _Shell, tokens: list[Token]) -> bool | None:
    """The exit status of an ``if``/``elif`` condition as true/false; None where it cannot be known."""
    groups: list[tuple[str, list[Token]]] = []  # (joining operator, tokens)
    joiner, current = "", []
    inside = False  # within [[ ... ]], && and || join tests of the one command
    for token in tokens:
        if token.kind == "word" and token.text in ("[[", "]]"):
            inside = token.text == "[["
        if inside and token.kind == "op" and token.text in ("&&", "||"):
            current.append(Token("word", token.text, token.line))
        elif token.kind == "op" and token.text in ("&&", "||"):
            groups.append((joiner, current))
            joiner, current = token.text, []
        else:
            current.append(token)
    groups.append((joiner, current))
    result: bool | None = None
    for joiner, group in groups:
        words = [w for token in group if token.kind == "word" for w in shell.expand(token.text)]
        negate = bool(words) and words[0] == "!"
        words = words[1:] if negate else words
        if words[:1] in (["["], ["test"]) or words[:1] == ["[["]:
            inner = words[1:-1] if words[0] != "test" else words[1:]
            value = _test(inner)
        elif words in (["true"], [":"]):
            value = True
        elif words == ["false"]:
            value = False
        else:
            value = None
        if value is not None and negate:
            value = not value
        if joiner == "":
            result = value
        elif joiner == "&&":
            result = (
                False if result is False or value is False else (None if None in (result, value) else True)
            )
        else:
            result = True if result is True or value is True else (None if None in (result, value) else False)
    return result


# ---- running ------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    kind: str  # "if", "loop", "skip"
    parent_active: bool
    active: bool
    taken: bool = False


def find_command(
    text: str, is_program: Callable[[str], bool], positional: Sequence[str] = (), where: str = "script"
) -> Found:
    """The first command the script runs whose words include one for which ``is_program`` is true
    (e.g. a word ending in ``pretrain_gpt.py``); ScriptError if it runs none."""
    shell = _Shell(positional)
    frames: list[_Frame] = []
    for command in _commands(tokenize(text)):
        active = all(frame.active for frame in frames)
        first = command[0]
        keyword = first.text if first.kind == "word" else ""
        line = first.line
        if keyword in ("if", "elif"):
            if keyword == "if":
                frames.append(_Frame("if", active, False))
            if not frames or frames[-1].kind != "if":
                raise ScriptError(f"{where}, line {line}: 'elif' without 'if'")
            frame = frames[-1]
            result = _condition(shell, command[1:]) if frame.parent_active and not frame.taken else False
            if result is None:
                words = " ".join(token.text for token in command[1:])
                shell.notes.append(f"line {line}: could not evaluate `{keyword} {words}`: took it as false")
            take = bool(result) and frame.parent_active and not frame.taken
            frame.active, frame.taken = take, frame.taken or take
        elif keyword == "else":
            if not frames or frames[-1].kind != "if":
                raise ScriptError(f"{where}, line {line}: 'else' without 'if'")
            frame = frames[-1]
            frame.active, frame.taken = frame.parent_active and not frame.taken, True
        elif keyword in ("fi", "done", "esac"):
            if not frames:
                raise ScriptError(f"{where}, line {line}: '{keyword}' without its opening keyword")
            frames.pop()
        elif keyword == "for":
            words = [token.text for token in command[1:] if token.kind == "word"]
            values = [v for raw in words[2:] for v in shell.expand(raw)] if words[1:2] == ["in"] else []
            runs = active and bool(words) and bool(values)
            if runs:
                shell.assign(words[0], values[0], append=False)
                if len(values) > 1:
                    shell.notes.append(
                        f"line {line}: the loop over {words[0]} was followed once, for {values[0]!r}"
                    )
            frames.append(_Frame("loop", active, runs))
        elif keyword in ("while", "until", "case"):
            if active:
                shell.notes.append(f"line {line}: the body of '{keyword}' was not followed")
            frames.append(_Frame("skip", active, False))
        elif keyword in ("then", "do", "{", "}"):
            continue
        elif active:
            found = _run(shell, command, is_program, where)
            if found is not None:
                return found
            if keyword == "exit":
                break
    raise ScriptError(f"{where}: no command runs a pretrain_*.py script")


def _run(shell: _Shell, command: list[Token], is_program: Callable[[str], bool], where: str) -> Found | None:
    """Carry out one simple command's assignments; the Found if it is the command looked for."""
    # the simple command ends at the first operator (a pipe, a redirection, && ...)
    end = next((i for i, token in enumerate(command) if token.kind == "op"), len(command))
    simple = command[:end]
    index = 0
    while index < len(simple) and (simple[index].kind == "array" or ASSIGNMENT.match(simple[index].text)):
        index += 1
    assignments, rest = simple[:index], simple[index:]
    if rest and rest[0].text in DECLARERS:
        options = [token for token in rest[1:] if token.kind == "word" and token.text.startswith("-")]
        declared = [
            token
            for token in rest[1 + len(options) :]
            if token.kind == "array" or ASSIGNMENT.match(token.text)
        ]
        if declared:
            assignments, rest = assignments + declared, []
    if not rest:  # assignments alone set the script's variables
        for token in assignments:
            name, append = ASSIGNMENT.match(token.text).groups()
            if token.kind == "array":
                values = [value for raw in token.elements for value in shell.expand(raw)]
                shell.assign_array(name, values, bool(append))
            else:
                value = token.text[ASSIGNMENT.match(token.text).end() :]
                shell.assign(name, shell.expand_one(value) if value else "", bool(append))
        return None
    if rest[0].text == "unset":
        for token in rest[1:]:
            shell.scalars.pop(token.text, None)
            shell.arrays.pop(token.text, None)
        return None
    expanded = [value for token in rest if token.kind == "word" for value in shell.expand(token.text)]
    for position, word in enumerate(expanded):
        if is_program(word):
            return Found(
                program=word,
                prefix=expanded[:position],
                arguments=expanded[position + 1 :],
                line=rest[0].line,
                unresolved=list(shell.unresolved),
                notes=list(shell.notes),
            )
    for word in expanded:  # bash -c "torchrun ... pretrain_gpt.py ...": the command inside a string
        if " " in word and any(is_program(part) for part in word.split()):
            try:
                inner = find_command(word, is_program, shell.positional, where)
            except ScriptError:
                return None
            inner.line = rest[0].line
            inner.unresolved = [
                *shell.unresolved,
                *(u for u in inner.unresolved if u not in shell.unresolved),
            ]
            inner.notes = [*shell.notes, *inner.notes]
            return inner
    return None


def is_script_word(pattern: str) -> Callable[[str], bool]:
    """A test that a word names a script file matching ``pattern`` (a regex on its base name)."""
    compiled = re.compile(pattern)
    return lambda word: bool(compiled.fullmatch(os.path.basename(word)))
