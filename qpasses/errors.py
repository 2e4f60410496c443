"""Error types.  Every failure the engine reports on purpose is a :class:`QPassesError`.

Rule-file errors carry the file, line and column they refer to and, when the name
looked like a typo, the nearest valid name.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


def nearest(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The closest candidate to ``name`` (difflib ratio >= 0.6), or None."""
    hits = difflib.get_close_matches(str(name), sorted(set(map(str, candidates))), n=1, cutoff=0.6)
    return hits[0] if hits else None


class QPassesError(Exception):
    """Base class of every error qpasses raises deliberately."""


class TraceError(QPassesError):
    """The model could be traced neither by torch.fx nor by torch.export."""


class OptionError(QPassesError):
    """An unknown option, or an option value outside its allowed range."""

    def __init__(self, message: str, suggestion: Optional[str] = None):
        if suggestion:
            message = f"{message} (did you mean {suggestion!r}?)"
        super().__init__(message)
        self.suggestion = suggestion


class Location:
    """Where something was written: file, 1-based line and column."""

    __slots__ = ("file", "line", "col")

    def __init__(self, file: Optional[str] = None, line: Optional[int] = None, col: Optional[int] = None):
        self.file, self.line, self.col = file, line, col

    def __str__(self) -> str:
        parts = [self.file or "<rules>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.col is not None:
                parts.append(str(self.col))
        return ":".join(parts)

    def shifted(self, dline: int = 0, col: Optional[int] = None) -> "Location":
        return Location(self.file, (self.line or 1) + dline, col if col is not None else self.col)


class RuleError(QPassesError):
    """An error in a rule file or a Rule object; names file:line:col."""

    def __init__(self, message: str, loc: Optional[Location] = None, suggestion: Optional[str] = None):
        self.loc = loc or Location()
        self.suggestion = suggestion
        self.bare_message = message
        text = f"{self.loc}: {message}"
        if suggestion:
            text += f" (did you mean {suggestion!r}?)"
        super().__init__(text)


class RuleSyntaxError(RuleError):
    """The rule file, or a pattern / call inside it, does not parse."""


class RuleSchemaError(RuleSyntaxError):
    """A rule file parses as YAML but a value has the wrong type or form for its key
    (``where: 5``, ``version: 1.0``, a ``!!python/...`` tag, a duplicate stage name)."""


class RuleLimitError(RuleSyntaxError):
    """A rule file (or a pattern in it) is larger or nests deeper than the stated limits
    (see ``qpasses.lang.rules.LIMITS``), or its aliases expand beyond the budget."""


class ArgumentError(RuleSyntaxError):
    """An action, constraint or data-step argument that its registration does not allow
    (unknown name, wrong type, out of range, not one of the choices); names the call's file:line:col."""


class UnknownNameError(RuleError):
    """An op class, constraint, action, data step, rule family or recipe that does not exist."""


class MissingParameterError(RuleError):
    """A ``${param}`` that no recipe, rule family or option defines."""


class MatchError(QPassesError):
    """Raised by ``explain`` when asked about a node that is not in the graph."""


class RewriteError(QPassesError):
    """An action failed while rewriting; the input graph is left untouched."""


class StepError(QPassesError):
    """A data step (calibrate, distill, search, ...) could not run."""


class VerifyError(QPassesError):
    """``verify=True`` found that a stage changed the numerics beyond its tolerance."""
