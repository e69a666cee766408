"""Size limits on the request data the reward layer accepts (``constraints``).

Each limit breaks a request with a 400 naming the offending field. They are in one place so
that the server's documentation can list them.
"""

from __future__ import annotations

#: Constraints per request.
MAX_CONSTRAINTS = 64
#: Characters in one ``regex`` constraint's pattern.
MAX_PATTERN_CHARS = 512
#: Keywords in one list: ``keywords.required``, ``keywords.forbidden``, and IFEval's
#: ``keywords`` and ``forbidden_words``.
MAX_KEYWORDS = 32
#: Characters in one keyword (and in IFEval's one-word arguments: ``keyword``,
#: ``first_word``, ``section_spliter``, ``postscript_marker``).
MAX_KEYWORD_CHARS = 100
#: Characters in an IFEval instruction id.
MAX_INSTRUCTION_ID_CHARS = 100
#: Entries in one IFEval ``kwargs`` object, null ones included.
MAX_IFEVAL_KWARGS = 32
#: Characters in IFEval's free-text arguments (``prompt_to_repeat``, ``end_phrase``).
MAX_IFEVAL_TEXT_CHARS = 8192
#: Largest IFEval count (``num_words``, ``frequency``, ...).
MAX_IFEVAL_COUNT = 100_000
