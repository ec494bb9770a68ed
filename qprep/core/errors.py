"""qprep's exception hierarchy.

Every error qprep raises on purpose is a :class:`QprepError`; each names what it is about
(the module, the op, the source line) and, where one exists, the fix.
"""

from __future__ import annotations

__all__ = [
    "QprepError",
    "InputError",
    "TraceError",
    "PassError",
    "RewriteError",
    "NotEquivalentError",
    "GuardError",
    "InconclusiveWarning",
]


class QprepError(Exception):
    """Base class of every error qprep raises on purpose."""


class InputError(QprepError, TypeError):
    """The arguments given to qprep are wrong: not a module, bad example inputs, bad config."""


class TraceError(QprepError):
    """The model cannot be traced symbolically.

    Attributes:
        module: qualified name of the innermost module whose ``forward`` failed ("" = root).
        module_type: its class name.
        location: ``file:line`` of the user code that failed, when known.
    """

    def __init__(self, message: str, *, module: str = "", module_type: str = "", location: str = ""):
        super().__init__(message)
        self.module = module
        self.module_type = module_type
        self.location = location


class PassError(QprepError):
    """A pass of the pipeline raised; names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str = "", completed: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.completed = completed


class RewriteError(QprepError):
    """A node could not be rewritten and ``strict=True`` asked for an error instead of a skip."""


class NotEquivalentError(QprepError):
    """The prepared model does not compute what the original computes.

    Attributes:
        result: the :class:`qprep.verify.VerifyResult` that found the difference.
    """

    def __init__(self, message: str, *, result=None):
        super().__init__(message)
        self.result = result


class GuardError(QprepError):
    """A prepared model was called with inputs its specialisation does not cover.

    Tracing fixed a value that the Python code needed concretely (``if x.dim() == 2:``,
    ``range(x.size(0))``) to what the example inputs gave and recorded a guard; this call
    gives another value, so the prepared graph may not compute what the model would.

    Attributes:
        expression: the guarded expression (``"attention_mask.dim() == 2"``).
        expected: the value the prepared model was specialised to.
        actual: the value this call gave.
        location: ``file:line`` of the code that needed the value.
    """

    def __init__(self, message: str, *, expression: str = "", expected=None, actual=None, location: str = ""):
        super().__init__(message)
        self.expression = expression
        self.expected = expected
        self.actual = actual
        self.location = location


class InconclusiveWarning(UserWarning):
    """A verification that proves little: it ran on empty input tensors (ops on them compute
    nothing) or every output was empty. :attr:`qprep.VerifyResult.caveats` says which."""
