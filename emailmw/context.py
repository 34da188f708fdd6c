"""The context: options, sender, receiver, polling manager and handlers, with a
clear lifecycle (created → running → shut down).

A process usually uses the global context through :func:`init` and
:func:`shutdown`; every entity also accepts an explicit ``context=``, so one
process can hold several independent contexts.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import weakref
from types import TracebackType

from emailmw.dispatch.handlers import ServiceHandler, SubscriptionHandler
from emailmw.dispatch.polling import PollingManager
from emailmw.errors import ContextError
from emailmw.options import Options
from emailmw.security import AdmissionPolicy
from emailmw.stats import Stats, StatsCounters
from emailmw.transport import EmailReceiver, EmailSender, create_transport
from emailmw.waitable import Waitable, Waiter

__all__ = ["Context", "ContextState", "get_global_context", "init", "shutdown", "stats"]

logger = logging.getLogger(__name__)

OptionsLike = Options | str | os.PathLike[str] | None


class ContextState(enum.Enum):
    """Where a context is in its life."""

    CREATED = "created"
    RUNNING = "running"
    SHUT_DOWN = "shut down"


def _resolve_options(options: OptionsLike) -> Options:
    if options is None:
        return Options.load()
    if isinstance(options, Options):
        return options
    if isinstance(options, (str, os.PathLike)):
        return Options.from_file(options)
    raise TypeError(f"options must be Options, a path or None, not {type(options).__name__}")


class Context:
    """Holds everything a set of entities shares.

    ``Context(options)`` only reads the configuration; :meth:`init` connects to
    the servers (raising a :class:`~emailmw.TransportError` if it cannot) and
    starts the polling thread. As a context manager it initializes on entry (if
    needed) and shuts down on exit::

        with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
            pub = emailmw.Publisher("/chatter", context=ctx)
    """

    def __init__(self, options: OptionsLike = None) -> None:
        self._options = _resolve_options(options)
        self._lock = threading.Lock()
        self._state = ContextState.CREATED
        self._stats = StatsCounters()
        self._waiters: set[Waiter] = set()
        self._waitables: weakref.WeakSet[Waitable] = weakref.WeakSet()
        self._sender: EmailSender | None = None
        self._receiver: EmailReceiver | None = None
        self._polling_manager: PollingManager | None = None
        self.subscription_handler = SubscriptionHandler(
            self._stats, reorder_window=self._options.reorder_window
        )
        self.service_handler = ServiceHandler(self._stats)

    # -- lifecycle -----------------------------------------------------------------

    def init(self) -> Context:
        """Connect the transport and start the polling thread; returns ``self``."""
        with self._lock:
            if self._state is not ContextState.CREATED:
                raise ContextError(f"cannot init a context that is {self._state.value}")
            key = self._options.resolve_signing_key()  # a ConfigError before any connection
            sender, receiver = create_transport(self._options, self._stats)
            try:
                sender.connect()
                receiver.connect()
            except BaseException:
                sender.close()
                receiver.close()
                raise
            sender.set_signing_key(key)
            admission = AdmissionPolicy(
                key,
                max_age=self._options.max_age,
                allowed_senders=self._options.allowed_senders,
            )
            polling_manager = PollingManager(receiver, self._stats, admission)
            polling_manager.register_handler(self.subscription_handler)
            polling_manager.register_handler(self.service_handler)
            self._sender, self._receiver = sender, receiver
            self._polling_manager = polling_manager
            self._state = ContextState.RUNNING
            polling_manager.start()
        logger.info(
            "context running (%s)",
            "intraprocess" if self._options.intraprocess else "SMTP/IMAP",
        )
        return self

    def shutdown(self) -> bool:
        """Stop the polling thread, close the transport and wake every waiter.

        Returns True if this call shut the context down, False if it was not
        running. Anything used afterwards raises :class:`~emailmw.ContextError`.
        """
        with self._lock:
            if self._state is not ContextState.RUNNING:
                self._state = ContextState.SHUT_DOWN
                return False
            self._state = ContextState.SHUT_DOWN
            waiters = list(self._waiters)
            waitables = list(self._waitables)
        for waiter in waiters:
            waiter.set()
        for waitable in waitables:
            waitable._wake()
        if self._polling_manager is not None:
            self._polling_manager.shutdown(timeout=1.0)
        for closeable in (self._receiver, self._sender):
            if closeable is not None:
                try:
                    closeable.close()
                except Exception:
                    logger.exception("error while closing %r", closeable)
        logger.info("context shut down")
        return True

    def __enter__(self) -> Context:
        if self._state is ContextState.CREATED:
            self.init()
        else:
            self._check()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- accessors -----------------------------------------------------------------

    @property
    def state(self) -> ContextState:
        """The lifecycle state."""
        return self._state

    @property
    def ok(self) -> bool:
        """True while the context is running."""
        return self._state is ContextState.RUNNING

    @property
    def options(self) -> Options:
        """The configuration."""
        return self._options

    @property
    def sender(self) -> EmailSender:
        """The email sender (raises :class:`ContextError` unless running)."""
        self._check()
        assert self._sender is not None
        return self._sender

    @property
    def receiver(self) -> EmailReceiver:
        """The email receiver (raises :class:`ContextError` unless running)."""
        self._check()
        assert self._receiver is not None
        return self._receiver

    @property
    def polling_manager(self) -> PollingManager:
        """The polling manager (raises :class:`ContextError` unless running)."""
        self._check()
        assert self._polling_manager is not None
        return self._polling_manager

    @property
    def stats_counters(self) -> StatsCounters:
        """The live counters (see :meth:`stats` for a snapshot)."""
        return self._stats

    def stats(self) -> Stats:
        """A snapshot of the counters: sent, received, delivered, dropped by reason..."""
        return self._stats.snapshot()

    def __repr__(self) -> str:
        mode = "intraprocess" if self._options.intraprocess else "email"
        return f"<Context {mode} {self._state.value}>"

    # -- internal: used by entities and waiting ----------------------------------------

    def _check(self) -> None:
        if self._state is not ContextState.RUNNING:
            if self._state is ContextState.CREATED:
                raise ContextError("context is not initialized: call init() first")
            raise ContextError("context is shut down")

    def _attach_waiter(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.add(waiter)
            if self._state is ContextState.SHUT_DOWN:
                waiter.set()

    def _detach_waiter(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)

    def _register_waitable(self, waitable: Waitable) -> None:
        """Have :meth:`shutdown` wake whoever waits on ``waitable``."""
        with self._lock:
            self._waitables.add(waitable)


_global_lock = threading.Lock()
_global_context: Context | None = None


def init(options: OptionsLike = None) -> Context:
    """Initialize the global context and return it.

    ``options`` is an :class:`Options`, a path to a YAML config file, or
    ``None`` to find the config file (``$EMAIL_CONFIG_FILE``, ``./email.yml``,
    ``~/email.yml``). Raises :class:`ContextError` if already initialized.
    """
    global _global_context
    with _global_lock:
        if _global_context is not None and _global_context.ok:
            raise ContextError("emailmw is already initialized: call shutdown() first")
        context = Context(options)
        context.init()
        _global_context = context
        return context


def shutdown() -> bool:
    """Shut the global context down. True the first time, False after (or if never
    initialized)."""
    with _global_lock:
        context = _global_context
    return False if context is None else context.shutdown()


def get_global_context() -> Context:
    """The global context; raises :class:`ContextError` if :func:`init` was never called."""
    context = _global_context
    if context is None:
        raise ContextError("emailmw is not initialized: call emailmw.init() or pass context=")
    return context


def stats() -> Stats:
    """A snapshot of the global context's counters."""
    return get_global_context().stats()


def resolve_context(context: Context | None) -> Context:
    """``context`` itself, or the global one; raises unless it is running."""
    ctx = get_global_context() if context is None else context
    ctx._check()
    return ctx
