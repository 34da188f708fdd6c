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
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

from emailmw.aio import AsyncContextMixin
from emailmw.dispatch.core import DeliveryCore
from emailmw.dispatch.polling import PollingManager
from emailmw.durable import DurableCursor
from emailmw.errors import AuthenticationError, ConfigError, ContextError, InvalidMessageError
from emailmw.metrics import ConnectionState, Histogram, Metrics
from emailmw.options import Options
from emailmw.security import AdmissionPolicy
from emailmw.state_store import StateStore
from emailmw.stats import Stats, StatsCounters
from emailmw.transport import EmailReceiver, EmailSender, IntraEmailReceiver, IntraEmailSender
from emailmw.transport.codec import rmw_email_body_problem
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders
from emailmw.transport.receiver import Backlog, History
from emailmw.transport.signing import SigningSender
from emailmw.validation import validate_rmw_email_name
from emailmw.waitable import Waitable, Waiter

if TYPE_CHECKING:
    from emailmw.metrics_http import MetricsServer
    from emailmw.transport.mailbox import Progress, PruneResult

__all__ = ["Context", "ContextState", "get_global_context", "init", "shutdown", "stats"]

logger = logging.getLogger(__name__)

OptionsLike = Options | str | os.PathLike[str] | None


class ContextState(enum.Enum):
    """Where a context is in its life: created → starting (connecting) → running →
    shut down."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    SHUT_DOWN = "shut down"


def _create_transport(options: Options, stats: StatsCounters) -> tuple[EmailSender, EmailReceiver]:
    """The sender and receiver that ``options`` asks for (not yet connected)."""
    if options.intraprocess:
        receiver = IntraEmailReceiver(options.history_depth)
        return IntraEmailSender(receiver, stats=stats, wire_format=options.wire_format), receiver
    from emailmw.transport.imap import ImapEmailReceiver
    from emailmw.transport.smtp import SmtpEmailSender
    from emailmw.transport.smtp_pool import SmtpSenderPool

    sender: EmailSender
    if options.smtp_connections > 1:
        sender = SmtpSenderPool(options.smtp_settings(), options.smtp_connections, stats)
    else:
        sender = SmtpEmailSender(options.smtp_settings(), stats)
    return sender, ImapEmailReceiver(options.imap_settings(), stats)


def _replay_key(options: Options) -> str:
    """The replay slot of the account and mailbox that ``options`` read:
    ``imap://<username, %-quoted>@<host>:<port>/<mailbox>``."""
    assert options.user is not None
    server = options.user.imap
    host = f"[{server.host}]" if ":" in server.host else server.host
    mailbox = "INBOX" if options.mailbox.upper() == "INBOX" else options.mailbox
    return f"imap://{quote(options.user.username, safe='')}@{host.lower()}:{server.port}/{mailbox}"


def _resolve_options(options: OptionsLike) -> Options:
    if options is None:
        return Options.load()
    if isinstance(options, Options):
        return options
    if isinstance(options, (str, os.PathLike)):
        return Options.from_file(options)
    raise TypeError(f"options must be Options, a path or None, not {type(options).__name__}")


class Context(AsyncContextMixin):
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
        # Entities with a callback or handler, for emailmw.spin() (see executor.py):
        # held weakly; watchers are woken when one comes or goes.
        self._callback_entities: weakref.WeakSet[Waitable] = weakref.WeakSet()
        self._callback_watchers: set[Waiter] = set()
        self._callback_generation = 0
        self._spin_executor: object | None = None  # emailmw.spin()'s, made on first use
        self._sender: EmailSender | None = None
        self._receiver: EmailReceiver | None = None
        self._core: DeliveryCore | None = None
        self._polling_manager: PollingManager | None = None
        # opened by the first durable subscription, or by init() for the replay memory
        self._state_store_: StateStore | None = None
        self._admission: AdmissionPolicy | None = None
        self._durable_cursors: weakref.WeakSet[DurableCursor] = weakref.WeakSet()
        self._metrics_server: MetricsServer | None = None
        self._ran = False  # it was running once (connection_state: closed, not failed)
        self._auth_failed = False  # init() failed on the credentials
        self._started_at = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------

    def init(self) -> Context:
        """Connect the transport and start the polling thread; returns ``self``.

        The connection is made without holding the context's lock: a
        :meth:`shutdown` from another thread meanwhile aborts it, and this call
        then raises :class:`~emailmw.ContextError`.
        """
        with self._lock:
            if self._state is not ContextState.CREATED:
                raise ContextError(f"cannot init a context that is {self._state.value}")
            # configuration errors (a ConfigError) come before any connection
            key = self._options.resolve_signing_key()
            if not self._options.intraprocess:
                self._options.resolve_password()
            sender, receiver = _create_transport(self._options, self._stats)
            self._sender, self._receiver = sender, receiver
            self._state = ContextState.STARTING
        try:
            self._start_metrics_server()
            admission = self._admission_policy(key)
            sender.connect()
            receiver.connect()
        except BaseException as exc:
            with self._lock:
                aborted = self._state is ContextState.SHUT_DOWN
                self._state = ContextState.SHUT_DOWN
                self._auth_failed = isinstance(exc, AuthenticationError)
            self._close_transport()
            self._close_state()
            if aborted:
                raise ContextError("context was shut down while connecting") from None
            raise
        if key is not None:
            sender = SigningSender(sender, key)
            self._sender = sender
        core = DeliveryCore(
            self._stats,
            reorder_window=self._options.reorder_window,
            horizon_ns=receiver.start_time_ns,
            admission=admission,
        )
        polling_manager = PollingManager(receiver, core)
        with self._lock:
            if self._state is not ContextState.STARTING:  # shut down meanwhile
                aborted = True
            else:
                aborted = False
                self._core = core
                self._polling_manager = polling_manager
                self._state = ContextState.RUNNING
                self._ran = True
                self._started_at = time.monotonic()
                if self._options.intraprocess:
                    self._stats.connections.set("intraprocess", ConnectionState.CONNECTED)
                polling_manager.start()
        if aborted:
            self._close_transport()
            self._close_state()
            raise ContextError("context was shut down while connecting")
        logger.info(
            "context running (%s)",
            "intraprocess" if self._options.intraprocess else "SMTP/IMAP",
        )
        return self

    def shutdown(self) -> bool:
        """Stop the polling thread, close the transport and wake every waiter.

        Returns True if this call shut the context down, False if it was not
        running (or starting). Prompt: a ``publish()`` stuck on a silent server
        is aborted (it raises), a receive in progress is aborted, and the
        polling thread is gone when this returns (within about a second).
        Anything used afterwards raises :class:`~emailmw.ContextError`.
        """
        with self._lock:
            previous = self._state
            self._state = ContextState.SHUT_DOWN
            if previous not in (ContextState.RUNNING, ContextState.STARTING):
                return False
            waiters = list(self._waiters)
            waitables = list(self._waitables)
            polling_manager = self._polling_manager
        for waiter in waiters:
            waiter.set()
        for waitable in waitables:
            waitable._wake()
        if polling_manager is not None:
            polling_manager.stop()
        self._close_transport()
        if polling_manager is not None:
            polling_manager.shutdown(timeout=1.0)
        self._close_state()
        logger.info("context shut down")
        return True

    def _start_metrics_server(self) -> None:
        """Serve the metrics over HTTP if ``metrics-port`` is set (:mod:`emailmw.metrics_http`)."""
        port = self._options.metrics_port
        if port is None:
            return
        from emailmw.metrics_http import start_metrics_server

        self._metrics_server = start_metrics_server(
            self.metrics, self._options.metrics_address, port
        )

    def _close_transport(self) -> None:
        """Close sender and receiver (each aborts what it has in progress), and stop
        serving the metrics."""
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.close()
        if self._options.intraprocess and self._ran:
            self._stats.connections.close("intraprocess")
        for closeable in (self._sender, self._receiver):
            if closeable is not None:
                try:
                    closeable.close()
                except Exception:
                    logger.exception("error while closing %r", closeable)

    def _admission_policy(self, key: bytes | None) -> AdmissionPolicy:
        """The admission policy of received emails. With a key, on a mail server, its
        replay memory is kept in the state store's replay slot for the account and
        mailbox if no other context holds it (else in memory only)."""
        options = self._options
        slot = None
        if key is not None and not options.intraprocess and options.user is not None:
            store = self._state_store()
            slot = store.claim_replay(_replay_key(options))
        admission = AdmissionPolicy(
            key,
            max_age=options.max_age,
            allowed_senders=options.allowed_senders,
            journal=slot,
        )
        with self._lock:
            self._admission = admission
        return admission

    def _state_store(self) -> StateStore:
        """The state store (opened on first use, at ``state-dir``)."""
        with self._lock:
            store = self._state_store_
            if store is None:
                store = self._state_store_ = StateStore(self._options.resolved_state_dir())
            return store

    def _close_state(self) -> None:
        """Release the durable subscriptions' names and the replay slot (writing the
        replay memory), and close the state store."""
        with self._lock:
            cursors = list(self._durable_cursors)
            admission, self._admission = self._admission, None
            store, self._state_store_ = self._state_store_, None
        for cursor in cursors:
            cursor.close()
        if admission is not None:
            admission.close()
        if store is not None:
            store.close()

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

    def stats(self) -> Stats:
        """A snapshot of the counters: sent, received, delivered, dropped by reason..."""
        return self._stats.snapshot()

    @property
    def connection_state(self) -> ConnectionState:
        """How the context's connections stand: ``disconnected`` before :meth:`init`,
        ``connecting`` during it, then the most troubled state of its SMTP and IMAP
        connections (``auth_failed``, else ``reconnecting``, else ``connected``;
        always ``connected`` on the intraprocess transport), and ``closed`` after
        :meth:`shutdown`. An :meth:`init` that failed leaves ``auth_failed`` if the
        server refused the credentials, else ``disconnected``."""
        state = self._state
        if state is ContextState.CREATED:
            return ConnectionState.DISCONNECTED
        worst = self._stats.connections.worst()
        if state is ContextState.SHUT_DOWN:
            if self._ran:
                return ConnectionState.CLOSED
            if self._auth_failed or worst is ConnectionState.AUTH_FAILED:
                return ConnectionState.AUTH_FAILED
            return ConnectionState.DISCONNECTED
        if state is ContextState.STARTING:
            if worst is ConnectionState.AUTH_FAILED:
                return worst
            return ConnectionState.CONNECTING
        return ConnectionState.CONNECTED if worst is None else worst

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics are served over HTTP (``metrics-address``, and the port
        bound: the one of ``metrics-port``, or the one the system chose for 0), or
        None when they are not."""
        server = self._metrics_server
        return None if server is None else server.address

    def metrics(self) -> Metrics:
        """A snapshot of the counters, gauges, latency histograms and connection states
        (see :class:`~emailmw.metrics.Metrics` for each name). Cheap enough to call
        on every scrape; works in any lifecycle state."""
        stats = self._stats.snapshot()
        receiver = self._receiver
        counters = {
            "sent": stats.sent,
            "send_retries": stats.send_retries,
            "send_failures": stats.send_failures,
            "received": stats.received,
            "delivered": stats.delivered,
            "reconnects": stats.reconnects,
            "callback_errors": stats.callback_errors,
            "resyncs": stats.resyncs,
            "dropped": stats.dropped_total,
            "imap_commands": int(getattr(receiver, "commands_sent", 0)),
            "imap_bytes_received": int(getattr(receiver, "bytes_received", 0)),
        }
        core = self._core
        running = self._state is ContextState.RUNNING
        gauges = {
            "held_messages": float(core.held_count if core is not None else 0),
            "publisher_streams": float(core.stream_count if core is not None else 0),
            "uptime_seconds": time.monotonic() - self._started_at if running else 0.0,
        }
        imap = {name: h.snapshot() for name, h in sorted(self._stats.imap_round_trips().items())}
        histograms = {
            "send_seconds": self._stats.send_latency.snapshot(),
            "delivery_seconds": self._stats.delivery_latency.snapshot(),
            "imap_command_seconds": Histogram.merge(list(imap.values())),
        }
        return Metrics(
            connection_state=self.connection_state,
            connections=self._stats.connections.states(),
            counters=counters,
            dropped=dict(stats.dropped),
            gauges=gauges,
            histograms=histograms,
            imap_commands=imap,
        )

    def prune(
        self,
        older_than: float | None = None,
        *,
        max_count: int | None = None,
        topic: str | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> PruneResult:
        """Apply the retention to the mailbox folder: delete the emailmw emails whose
        ``Source-Timestamp`` is older than ``older_than`` seconds (default:
        ``retention.max-age``) and all but the newest ``max_count`` of each topic
        (default: ``retention.max-count``); only ``topic``'s if given. ``dry_run``
        deletes nothing. Returns what was examined, deleted and kept, per topic.
        ``progress(phase, done, total)`` is told how far it got after each batch
        (phases ``listing`` and ``deleting``).

        Works on an IMAP session of its own (read-write), whatever the context's
        state; readers of the folder keep working. Foreign mail is never deleted.
        Raises :class:`~emailmw.ConfigError` when no limit is set (neither
        argument nor ``retention`` key), :class:`~emailmw.ImapError` when the
        server lacks UIDPLUS. An intraprocess context stores nothing: the result
        is empty.
        """
        from emailmw.transport.mailbox import PruneResult, open_admin_session
        from emailmw.transport.mailbox import prune as prune_folder

        retention = self._options.retention
        older_than = retention.max_age if older_than is None else older_than
        max_count = retention.max_count if max_count is None else max_count
        if older_than is None and max_count is None:
            raise ConfigError(
                "nothing to prune: set email.retention.max-age or email.retention.max-count "
                "(or give older_than / max_count)",
                key="email.retention",
            )
        if self._options.intraprocess:
            return PruneResult(dry_run=dry_run)
        session = open_admin_session(self._options.imap_settings())
        try:
            return prune_folder(
                session,
                older_than=older_than,
                max_count=max_count,
                topic=topic,
                dry_run=dry_run,
                progress=progress,
            )
        finally:
            session.close(polite=True)

    def __repr__(self) -> str:
        mode = "intraprocess" if self._options.intraprocess else "email"
        return f"<Context {mode} {self._state.value}>"

    # -- internal: used by the entities (pubsub, service) and by waiting ------------------

    @property
    def _counters(self) -> StatsCounters:
        """The live counters (see :meth:`stats` for a snapshot)."""
        return self._stats

    @property
    def _delivery(self) -> DeliveryCore:
        """The delivery core that entities register with (raises unless it was started)."""
        core = self._core
        if core is None:
            self._check()
            raise ContextError("context is shut down")
        return core

    def _history(self, topic_name: str, count: int) -> History:
        """The last ``count`` messages on ``topic_name`` the receiver already read
        (see :meth:`EmailReceiver.history`)."""
        receiver = self._receiver
        if receiver is None or self._state is not ContextState.RUNNING:
            self._check()
        assert receiver is not None
        return receiver.history(topic_name, count)

    def _durable_cursor(self, name: str, topic_name: str) -> DurableCursor:
        """Claim the durable subscription ``name`` on ``topic_name`` in the state store
        (opened on first use, at ``state-dir``)."""
        with self._lock:
            if self._state is not ContextState.RUNNING:
                self._check()
            store = self._state_store_
            if store is None:
                store = self._state_store_ = StateStore(self._options.resolved_state_dir())
            cursor = DurableCursor(store, name, topic_name, self._stats)
            self._durable_cursors.add(cursor)
        return cursor

    def _backlog(self, topic_name: str, uidvalidity: int | None, after_uid: int) -> Backlog:
        """What the receiver read on ``topic_name`` after ``after_uid`` (see
        :meth:`EmailReceiver.backlog`)."""
        receiver = self._receiver
        if receiver is None or self._state is not ContextState.RUNNING:
            self._check()
        assert receiver is not None
        return receiver.backlog(topic_name, uidvalidity, after_uid)

    def _send(self, content: EmailContent, headers: EmailHeaders) -> str:
        """Send a new email through the context's sender; return its Message-ID."""
        sender = self._sender
        if sender is None or self._state is not ContextState.RUNNING:
            self._check()
        assert sender is not None
        started = time.perf_counter()
        message_id = sender.send(content, headers)
        self._stats.send_latency.observe(time.perf_counter() - started)
        return message_id

    def _reply(self, content: EmailContent, original: EmailData, headers: EmailHeaders) -> str:
        """Send a reply to ``original``; return its Message-ID."""
        sender = self._sender
        if sender is None or self._state is not ContextState.RUNNING:
            self._check()
        assert sender is not None
        started = time.perf_counter()
        message_id = sender.reply(content, original, headers)
        self._stats.send_latency.observe(time.perf_counter() - started)
        return message_id

    def _check_wire_name(self, name: str, kind: str) -> None:
        """Raise :class:`~emailmw.InvalidNameError` if ``name`` cannot be the Subject of
        an email in the configured wire format (``rmw-email``: see
        :func:`~emailmw.validation.rmw_email_name_problem`)."""
        if self._options.wire_format == "emailmw":
            return
        sender = self._sender
        utf8 = sender is None or sender.offers("smtputf8")
        validate_rmw_email_name(name, kind, utf8=utf8)

    def _check_wire_body(self, body: str, what: str) -> None:
        """Raise :class:`~emailmw.InvalidMessageError` if ``body`` cannot be sent in
        the configured wire format (``rmw-email``: see
        :func:`~emailmw.transport.codec.rmw_email_body_problem`); the codec checks
        it again, this is for callers that must refuse before they count a send."""
        if self._options.wire_format == "emailmw":
            return
        sender = self._sender
        eight_bit = sender is None or sender.offers("8bitmime")
        problem = rmw_email_body_problem(body, eight_bit=eight_bit)
        if problem is not None:
            raise InvalidMessageError(
                f"{what} cannot be sent in the rmw-email wire format (no transfer "
                f"encoding): {problem}"
            )

    def _check(self) -> None:
        if self._state is not ContextState.RUNNING:
            if self._state is ContextState.CREATED:
                raise ContextError("context is not initialized: call init() first")
            if self._state is ContextState.STARTING:
                raise ContextError("context is still connecting: wait for init() to return")
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

    def _set_callback_entity(self, entity: Waitable, present: bool) -> None:
        """Add ``entity`` (an entity with a callback) to the entities that
        :func:`emailmw.spin` runs, or remove it; wake the watchers either way."""
        with self._lock:
            if present:
                self._callback_entities.add(entity)
            else:
                self._callback_entities.discard(entity)
            self._callback_generation += 1
            watchers = list(self._callback_watchers)
        for waiter in watchers:
            waiter.set()

    def _callback_entity_list(self) -> tuple[int, list[Waitable]]:
        """The entities with a callback, and a number that changes whenever they do."""
        with self._lock:
            return self._callback_generation, list(self._callback_entities)

    def _watch_callback_entities(self, waiter: Waiter, watch: bool) -> None:
        """Set ``waiter`` whenever an entity with a callback comes or goes (or stop)."""
        with self._lock:
            if watch:
                self._callback_watchers.add(waiter)
            else:
                self._callback_watchers.discard(waiter)


_global_lock = threading.Lock()
_global_context: Context | None = None


def init(options: OptionsLike = None) -> Context:
    """Initialize the global context and return it.

    ``options`` is an :class:`Options`, a path to a YAML config file, or
    ``None`` to find the config file (``$EMAIL_CONFIG_FILE``, ``./email.yml``,
    ``~/email.yml``). Raises :class:`ContextError` if already initialized (or
    being initialized by another thread). The connection is made without
    holding the global lock, so :func:`shutdown` can abort it.
    """
    global _global_context
    context = Context(options)
    with _global_lock:
        previous = _global_context
        if previous is not None and previous.state in (
            ContextState.STARTING,
            ContextState.RUNNING,
        ):
            raise ContextError("emailmw is already initialized: call shutdown() first")
        _global_context = context
    try:
        context.init()
    except BaseException:
        with _global_lock:
            if _global_context is context:
                _global_context = previous
        raise
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
