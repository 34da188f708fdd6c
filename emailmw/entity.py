"""What publishers, subscriptions, service clients and service servers share: a
validated name, a context, a GID, a close that is idempotent, a repr, and use
as a context manager.

:class:`Entity` is a mixin: each entity class calls :meth:`Entity._setup`
first, which sets ``_name``, ``_context``, ``_gid`` and ``_closed``.

Entities with a callback (a subscription's ``callback``, a server's
``handler``) also offer :meth:`Entity._take_callback`, through which an
:class:`~emailmw.Executor` takes one queued item and the call that hands it to
user code; how many arguments that code takes is decided once, by
:func:`callback_arity`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import TracebackType
from typing import ClassVar, Literal, Self

from emailmw.context import Context, resolve_context
from emailmw.info import Gid
from emailmw.validation import validate_name
from emailmw.waitable import Waitable

__all__ = ["Entity", "callback_arity", "check_depth"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Entity:
    """Base of the four entity classes (see the module docstring)."""

    #: What the name names, for validation and errors: "topic" or "service".
    _kind: ClassVar[Literal["topic", "service"]]
    _name: str
    _context: Context
    _gid: Gid
    _closed: bool
    #: True once :meth:`close` has unregistered: nothing is queued after that.
    _unregistered: bool = False
    #: The :class:`~emailmw.Executor` this entity was added to, if any.
    _executor: object | None = None

    def _setup(self, name: str, context: Context | None) -> None:
        """Validate ``name`` and take the context (the global one if ``None``)."""
        self._name = validate_name(name, self._kind)
        self._context = resolve_context(context)
        self._context._check_wire_name(self._name, self._kind)
        self._gid = Gid.new()
        self._closed = False

    @property
    def gid(self) -> Gid:
        """This entity's unique id."""
        return self._gid

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop receiving (waiting items can still be taken). Idempotent.

        Wakes every thread waiting on this entity (an iteration over a
        subscription ends); an executor stops running its callback (one that
        is running already completes).
        """
        if not self._closed:
            self._closed = True
            if self._has_callback():
                self._context._set_callback_entity(self._as_waitable(), False)
            self._unregister()
            self._unregistered = True
            if isinstance(self, Waitable):
                self._wake()

    def _unregister(self) -> None:
        """Unregister from the context's delivery core (called once, by :meth:`close`)."""

    # -- callbacks (see emailmw.executor) -----------------------------------------------

    def _has_callback(self) -> bool:
        """True if this entity was given a callback (or handler) for an executor."""
        return False

    def _take_callback(self) -> Callable[[], object] | None:
        """Take the oldest queued item and return the call that hands it to the
        callback (run it outside every lock), or ``None`` if nothing is queued or
        the entity is closed."""
        return None

    def _callback_description(self) -> str:
        """What the user code is called in logs ("callback", "handler")."""
        return "callback"

    def _as_waitable(self) -> Waitable:
        if not isinstance(self, Waitable):
            raise TypeError(f"{type(self).__name__} cannot have a callback")
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} gid={self._gid.value}>"


def check_depth(depth: int | None, context: Context) -> int:
    """``depth`` validated, or the context's ``queue-depth`` when ``None``."""
    if depth is None:
        return context.options.queue_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return depth


def callback_arity(function: object, what: str) -> int:
    """How many arguments to pass ``function``: 2 (item, info) or 1 (item).

    The rule, decided once with :func:`inspect.signature`: a function with two
    required positional parameters is called with the item and its info;
    anything else that can be called with one positional argument gets the
    item only (``def f(message, info=None)`` and ``def f(*args)`` get one).
    A callable whose signature cannot be read gets one. Raises
    :class:`TypeError` (naming ``what``) for anything that is not callable or
    cannot be called either way.
    """
    if not callable(function):
        raise TypeError(f"{what} must be callable, got {type(function).__name__}")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins: assume one argument
        return 1
    parameters = list(signature.parameters.values())
    required = [p for p in parameters if p.kind in _POSITIONAL and p.default is p.empty]
    keyword_required = [
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty
    ]
    takes_one = bool(required) or any(
        p.kind in (*_POSITIONAL, inspect.Parameter.VAR_POSITIONAL) for p in parameters
    )
    if keyword_required or len(required) > 2 or not takes_one:
        raise TypeError(
            f"{what} must take (message) or (message, info): {function!r} has signature {signature}"
        )
    return 2 if len(required) == 2 else 1
