"""Regular expressions that run in time linear in the text they search, on RE2.

Every pattern the reward layer runs is matched against model output, and some come from
requests (``regex`` constraints, IFEval keywords that IFEval's checkers splice into their
own patterns). With a backtracking engine such as Python's ``re`` one request can pin a
core for minutes: ``(a+)+$`` against a run of ``a``, or even IFEval's own ``\\[.*?\\]``
against a long run of ``[``. RE2 (``google-re2``) never backtracks: a search costs
O(len(pattern) x len(text)) whatever the pattern, so no pattern heuristics and no time
limits are needed. What it cannot do, because it needs backtracking (backreferences such as
``\\1``, lookahead and lookbehind), fails to compile with :class:`PatternError`.

Differences from ``re`` that a pattern author may meet: ``\\w``, ``\\d``, ``\\s`` and ``\\b``
are ASCII-only, and ``\\Z`` is spelled ``\\z``. A compiled pattern may use at most
:data:`MAX_PATTERN_MEMORY` bytes; RE2 refuses larger programs, and past that budget at
search time it falls back from its DFA to its NFA, which is slower but still linear.

:data:`stdlib_re` offers the part of the ``re`` module's API that IFEval's checkers use,
on RE2, so that they can be pointed at it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import re2

#: Memory budget of one compiled pattern (RE2's own default is 8 MiB).
MAX_PATTERN_MEMORY = 1 << 20

_SUPPORTED_FLAGS = re.IGNORECASE | re.MULTILINE


class PatternError(ValueError):
    """RE2 cannot compile the pattern; the message says why."""


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # the error is reported to the caller; no stderr noise
    return options


_OPTIONS = _options()


def compile_pattern(pattern: str, flags: int = 0) -> Any:
    """``pattern`` compiled by RE2; ``flags`` may hold ``re.IGNORECASE`` and ``re.MULTILINE``.

    Raises :class:`PatternError` when RE2 cannot compile it.
    """
    if flags & ~_SUPPORTED_FLAGS:
        raise ValueError(f"unsupported regular expression flags: {flags!r}")
    inline = ("i" if flags & re.IGNORECASE else "") + ("m" if flags & re.MULTILINE else "")
    try:
        return re2.compile(f"(?{inline}){pattern}" if inline else pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(str(reason)) from None
    except UnicodeEncodeError:
        raise PatternError("the pattern contains a lone surrogate, which is not text") from None


def well_formed(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD, so that it can be encoded as UTF-8.

    RE2 searches UTF-8; JSON strings can carry lone surrogates, which have no UTF-8 form.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Through UTF-16, each lone surrogate becomes exactly one U+FFFD.
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


@lru_cache(maxsize=128)
def _cached(pattern: str, flags: int) -> Any:
    return compile_pattern(pattern, flags)


def _compiled(pattern: Any, flags: int) -> Any:
    if isinstance(pattern, str):
        return _cached(pattern, flags)
    if flags:
        raise ValueError("flags cannot be added to a compiled pattern")
    return pattern


class _StdlibRe:
    """``re``'s ``compile``, ``search``, ``findall``, ``split`` and ``sub``, on RE2."""

    IGNORECASE = re.IGNORECASE
    MULTILINE = re.MULTILINE

    @staticmethod
    def compile(pattern: str, flags: int = 0) -> Any:
        return _compiled(pattern, flags)

    @staticmethod
    def search(pattern: Any, string: str, flags: int = 0) -> Any:
        return _compiled(pattern, flags).search(well_formed(string))

    @staticmethod
    def findall(pattern: Any, string: str, flags: int = 0) -> list[Any]:
        return _compiled(pattern, flags).findall(well_formed(string))

    @staticmethod
    def split(pattern: Any, string: str, maxsplit: int = 0, flags: int = 0) -> list[Any]:
        return _compiled(pattern, flags).split(well_formed(string), maxsplit)

    @staticmethod
    def sub(pattern: Any, repl: Any, string: str, count: int = 0, flags: int = 0) -> str:
        return _compiled(pattern, flags).sub(repl, well_formed(string), count)


#: Drop-in for the ``re`` module in code that uses only the functions above.
stdlib_re = _StdlibRe()
