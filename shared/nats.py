"""NATS names and helpers shared by the services.

The stream and subject names here are part of freshrec's public contract: event producers
and other consumers rely on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.settings import NatsSettings, TlsSettings
from shared.supervise import forever, raise_if_cancelling, retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Pause between a starting service's JetStream account-info requests while it waits for JetStream.
JETSTREAM_POLL_S = 0.5

#: What JetStream answers while it cannot serve for now (no meta or stream leader yet, a request lost
#: in an election): worth retrying, unlike a refusal.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    ServiceUnavailableError,
    NoStreamResponseError,
)

#: Pings a server may leave unanswered before the client takes the connection as dead.
MAX_OUTSTANDING_PINGS = 2

#: JetStream's error code for a stream whose servers are all out of reach.
STREAM_OFFLINE = 10118


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says JetStream cannot serve the request for now (retry later), not that it
    refuses it."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    return isinstance(exc, ServerError) and exc.err_code == STREAM_OFFLINE


async def when_available(attempt: Callable[[], Awaitable[T]], *, what: str, retry_s: float = 1.0) -> T:
    """Awaits ``attempt`` until JetStream can serve it: retried, with a warning, while it fails on
    :func:`unavailable` errors (a stream's node down, leaders being elected after a heal)."""
    return await retry(
        attempt,
        logger=logger,
        failed=f"{what}: JetStream cannot serve it yet; retrying",
        retry_s=retry_s,
        retryable=unavailable,
        level=logging.WARNING,
    )


#: JetStream stream holding every accepted event, in acceptance order.
EVENTS_STREAM = "FRESHREC_EVENTS"
#: Accepted events are published on ``freshrec.events.accepted.<type>.<partition>``: the type in
#: lower case, the partition ``user_partition(user_id)``. Subscribe to ``freshrec.events.accepted.>``
#: for everything, ``freshrec.events.accepted.purchase.*`` for one type, or
#: ``freshrec.events.accepted.*.<p>`` for one partition (how feature replicas split users).
ACCEPTED_SUBJECT_PREFIX = "freshrec.events.accepted"
ACCEPTED_SUBJECTS = f"{ACCEPTED_SUBJECT_PREFIX}.>"
#: Number of user partitions in the subject; the most replicas that can split users between them.
EVENT_PARTITIONS = 64
#: Producers publish raw events (protobuf or JSON) here for ingestion to validate and accept.
RAW_SUBJECT = "freshrec.events.raw"
#: Messages that could not be ingested land here, with the reason in a header.
DLQ_SUBJECT = "freshrec.events.dlq"
#: The live model version changed (new export, promotion or rollback).
MODELS_PUBLISHED_SUBJECT = "freshrec.models.published"
#: Producers ask ingestion to forget a user here (NATS request-reply: a ``ForgetUserRequest``, the
#: reply a ``ForgetUserResponse`` carrying the request id), as ``IngestionService.ForgetUser`` does.
FORGET_REQUEST_SUBJECT = "freshrec.forget.request"
#: JetStream stream of forget tasks (protobuf ``ForgetTask``), published by ingestion for every
#: service to carry out with its own durable consumer; a task is erased once every service is done.
FORGET_STREAM = "FRESHREC_FORGET"
FORGET_TASKS_SUBJECT = "freshrec.forget.requests"
#: JetStream stream of progress reports (protobuf ``ForgetReport``, no personal data) that ingestion
#: records for ``GetForgetStatus``, on ``freshrec.forget.progress.<request id>.<service>`` (so anyone
#: can look up whether one service has done its part of one request).
FORGET_PROGRESS_STREAM = "FRESHREC_FORGET_PROGRESS"
FORGET_PROGRESS_SUBJECT = "freshrec.forget.progress"
FORGET_PROGRESS_SUBJECTS = f"{FORGET_PROGRESS_SUBJECT}.>"


#: JetStream stream of served lists (protobuf ``ServedList``): what every Recommend and
#: SimilarItems answer showed, published by inference off the request path, keyed by the answer's
#: ``recommendation_id`` (``Nats-Msg-Id``).
SERVED_STREAM = "FRESHREC_SERVED"
SERVED_SUBJECT = "freshrec.recommendations.served"


def forget_progress_subject(request_id: str, service: str) -> str:
    """Where ``service`` reports its part of forget request ``request_id`` done."""
    return f"{FORGET_PROGRESS_SUBJECT}.{request_id}.{service}"


# Wire and storage names (subjects, streams, durable consumers, SQL tables, metric names) keep the
# spelling "catalog" they were first published with: producers, dashboards and stored state rely
# on them. Everything else (code, settings, docs) says "catalogue", as the protos do.

#: Catalogue entries published by producers (feature service input, validated there).
CATALOGUE_ITEMS_SUBJECT = "freshrec.catalog.items"
#: JetStream stream of validated catalogue entries (protobuf ``Item``), published by the feature
#: service after each accepted upsert; the trainer and inference follow it.
CATALOGUE_STREAM = "FRESHREC_CATALOG"
CATALOGUE_ACCEPTED_SUBJECT = "freshrec.catalog.accepted"

#: The header carrying a message's idempotency key; JetStream drops repeats within its window.
MSG_ID_HEADER = "Nats-Msg-Id"
#: On every accepted event: when ingestion received the call (RPC or NATS message) that carried it,
#: in microseconds since the epoch. Events a producer sent in one call share it, which tells
#: consumers (the trainer's prequential scoring) that one answer preceded all of them.
RECEIVED_HEADER = "Freshrec-Received-Us"


def user_partition(user_id: str) -> int:
    """The partition of a user: CRC-32 (zlib, IEEE) of the UTF-8 id modulo ``EVENT_PARTITIONS``.

    Stable across processes and languages, so producers, ingestion and consumers agree.
    """
    return zlib.crc32(user_id.encode("utf-8")) % EVENT_PARTITIONS


def accepted_subject(event_type_name: str, user_id: str) -> str:
    """``EVENT_TYPE_PURCHASE``, ``alice`` -> ``freshrec.events.accepted.purchase.<partition of alice>``."""
    kind = event_type_name.removeprefix("EVENT_TYPE_").lower()
    return f"{ACCEPTED_SUBJECT_PREFIX}.{kind}.{user_partition(user_id)}"


def partition_filter_subjects(replica: int, replicas: int) -> list[str]:
    """The subject filters of replica ``replica`` (0-based) of ``replicas``: the partitions ``p``
    with ``p % replicas == replica``; one replica gets everything."""
    if not 0 <= replica < replicas <= EVENT_PARTITIONS:
        raise ValueError(f"replica {replica} of {replicas} is not valid (at most {EVENT_PARTITIONS})")
    if replicas == 1:
        return [ACCEPTED_SUBJECTS]
    return [f"{ACCEPTED_SUBJECT_PREFIX}.*.{p}" for p in range(EVENT_PARTITIONS) if p % replicas == replica]


async def connect(settings: NatsSettings, name: str) -> NatsClient:
    """Connects, trying ``connect_attempts`` times; once connected, reconnects forever.

    Raises ``ConnectionError`` with what to check when the first connection cannot be made.
    """
    # nats-py can hang after a failed TLS handshake instead of counting the attempt: bound the wait.
    give_up_after = settings.connect_attempts * (settings.connect_timeout_s + settings.reconnect_wait_s) + 2
    try:
        nc = await asyncio.wait_for(_connect(settings, name), give_up_after)
    except Exception as exc:
        raise ConnectionError(
            f"cannot connect to NATS at {settings.url} after {settings.connect_attempts} attempts ({exc!r}); "
            "check FRESHREC_NATS__URL, the credentials (FRESHREC_NATS__USER/PASSWORD/TOKEN/CREDS_FILE) "
            "and FRESHREC_NATS__TLS__CA_FILE"
        ) from exc
    # From now on ride out any outage: nats-py reads this option at every reconnection.
    nc.options["max_reconnect_attempts"] = -1
    try:
        await wait_for_jetstream(nc.jetstream(), settings.jetstream_wait_s)
    except BaseException:
        await nc.close()
        raise
    return nc


async def wait_for_jetstream(js: JetStreamContext, timeout_s: float) -> None:
    """Returns once JetStream answers an account-info request; a cluster that has just started
    answers only after it has elected its meta leader, and until then stream declarations time out.

    Raises ``ConnectionError`` with what to check when it has not answered within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            await js.account_info()
        except UNAVAILABLE_ERRORS as exc:
            if time.monotonic() + JETSTREAM_POLL_S > deadline:
                raise ConnectionError(
                    f"NATS is reachable but JetStream did not answer within {timeout_s:g} s ({exc!r}); "
                    "check that the server runs with JetStream enabled (-js) and, in a cluster, that "
                    "a majority of its nodes are up (FRESHREC_NATS__JETSTREAM_WAIT_S sets the wait)"
                ) from exc
            if not waited:
                logger.warning("JetStream is not answering yet (%r); waiting up to %g s", exc, timeout_s)
                waited = True
            await asyncio.sleep(JETSTREAM_POLL_S)
        else:
            if waited:
                logger.info("JetStream answers")
            return


async def _on_error(exc: Exception) -> None:
    logger.warning("nats error: %s", exc)


async def _on_disconnect() -> None:
    logger.warning("nats disconnected")


async def _on_reconnect() -> None:
    logger.info("nats reconnected")


async def _connect(settings: NatsSettings, name: str) -> NatsClient:
    return await nats.connect(
        servers=settings.servers,
        dont_randomize=not settings.randomize,
        name=name,
        user=settings.user,
        password=settings.password.get_secret_value() if settings.password else None,
        token=settings.token.get_secret_value() if settings.token else None,
        user_credentials=str(settings.creds_file) if settings.creds_file else None,
        nkeys_seed=str(settings.nkey_seed_file) if settings.nkey_seed_file else None,
        tls=tls_context(settings.tls),
        connect_timeout=settings.connect_timeout_s,
        reconnect_time_wait=settings.reconnect_wait_s,
        ping_interval=settings.ping_interval_s,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        max_reconnect_attempts=settings.connect_attempts,
        allow_reconnect=True,
        error_cb=_on_error,
        disconnected_cb=_on_disconnect,
        reconnected_cb=_on_reconnect,
    )


def tls_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """A client TLS context for NATS, or None for plaintext."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


#: JetStream's error code for "stream name already in use" (with a different configuration).
STREAM_NAME_IN_USE = 10058


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool = True) -> None:
    """Declares a stream idempotently: adds it, or, when a stream of that name exists with another
    configuration, brings it up to date (``update``, what the stream's owner does) or leaves it."""
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        if update:
            await js.update_stream(config)


async def bind_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The KV bucket ``config`` names, created with ``config`` when it does not exist yet."""
    try:
        return await js.key_value(config.bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(config)


async def bind_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    """The Object Store bucket ``config`` names, created with ``config`` when it does not exist yet."""
    assert config.bucket
    try:
        return await js.object_store(config.bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(config.bucket, config)


def kept_stream_config(
    name: str,
    subject: str,
    *,
    replicas: int = 1,
    max_age_s: float | None = None,
    duplicate_window_s: float = 120.0,
) -> StreamConfig:
    """A stream of one subject kept on file: limits retention, the oldest messages go first, kept
    ``max_age_s`` (forever when None), repeats of a ``Nats-Msg-Id`` dropped within the window
    (which JetStream requires to be no longer than the age limit)."""
    if max_age_s is not None:
        duplicate_window_s = min(duplicate_window_s, max_age_s)
    return StreamConfig(
        num_replicas=replicas,
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        duplicate_window=duplicate_window_s,
    )


async def ensure_events_stream(
    js: JetStreamContext,
    duplicate_window_s: float = 120.0,
    *,
    owner: bool = False,
    replicas: int = 1,
    max_age_s: float | None = None,
) -> None:
    """Declares ``FRESHREC_EVENTS`` idempotently at start, keeping events ``max_age_s`` (the
    retention; forever when None).

    Consumers call it so they can start before ingestion; only the owner (ingestion) brings
    an existing stream's configuration (its age limit included) up to date.
    """
    config = kept_stream_config(
        EVENTS_STREAM,
        ACCEPTED_SUBJECTS,
        replicas=replicas,
        duplicate_window_s=duplicate_window_s,
        max_age_s=max_age_s,
    )
    await ensure_stream(js, config, update=owner)


async def ensure_catalogue_stream(js: JetStreamContext, *, owner: bool = False, replicas: int = 1) -> None:
    """Declares ``FRESHREC_CATALOG`` idempotently (the feature service owns it; followers such as
    the trainer and inference may call it too so they can start first). Every accepted catalogue
    entry is kept, with no age limit, so a follower can rebuild the catalogue from sequence 1."""
    config = kept_stream_config(CATALOGUE_STREAM, CATALOGUE_ACCEPTED_SUBJECT, replicas=replicas)
    await ensure_stream(js, config, update=owner)


class StreamReader:
    """Reads a stream in order from a position its owner keeps (committed with the owner's effects).

    JetStream redelivers an unacknowledged message only after the ack wait, behind newer ones; a
    consumer that applies "sequence > last applied" would then skip it for good (a crash between
    delivery and commit lost events that way). So the reader seats a durable pull consumer at
    ``position + 1`` whenever its owner (re)starts or rolls back, accepts deliveries only in
    consumer-sequence order, skips redeliveries of what it already returned, and re-seats itself at
    the last position it returned when a delivery gap shows up. Acks (AckPolicy.ALL, one per
    committed batch) only tidy the server side; correctness rests on the owner's position.
    """

    def __init__(
        self,
        js: JetStreamContext,
        durable: str,
        *,
        stream: str = EVENTS_STREAM,
        filter_subjects: list[str] | None = None,
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 100_000,
    ) -> None:
        self.js = js
        self.durable = durable
        self.stream = stream
        self.filter_subjects = filter_subjects or [ACCEPTED_SUBJECTS]
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        #: The stream sequence of the last message returned by ``fetch``.
        self.position = 0
        self._delivered = 0
        self._psub: JetStreamContext.PullSubscription | None = None

    async def seat(self, position: int) -> None:
        """(Re)creates the durable consumer so the next message is the first after ``position``."""
        await self.close()
        try:
            await self.js.delete_consumer(self.stream, self.durable)
        except NotFoundError:
            pass
        several = len(self.filter_subjects) > 1
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if position else DeliverPolicy.ALL,
            opt_start_seq=position + 1 if position else None,
            filter_subject=None if several else self.filter_subjects[0],
            filter_subjects=self.filter_subjects if several else None,
        )
        self._psub = await self.js.pull_subscribe(
            self.filter_subjects[0], durable=self.durable, stream=self.stream, config=config
        )
        self.position = position
        self._delivered = 0

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """The next messages after ``position``, in stream order, without gaps or repeats."""
        if self._psub is None:
            raise RuntimeError("StreamReader.seat() must be called before fetch()")
        out: list[Msg] = []
        for msg in await fetch_batch(self._psub, batch, timeout_s):
            sequence = msg.metadata.sequence
            if sequence.consumer == self._delivered + 1:
                self._delivered = sequence.consumer
                if sequence.stream > self.position:
                    self.position = sequence.stream
                    out.append(msg)
            elif sequence.consumer <= self._delivered and sequence.stream <= self.position:
                continue  # a redelivery of something already returned
            else:
                logger.warning(
                    "%s: delivery gap (consumer sequence %d after %d); re-seating after stream sequence %d",
                    self.durable,
                    sequence.consumer,
                    self._delivered,
                    self.position,
                )
                await self.seat(self.position)
                break
        return out

    async def close(self) -> None:
        """Stops fetching; the durable consumer stays (a pull subscription left open stalls drain)."""
        if self._psub is not None:
            psub, self._psub = self._psub, None
            try:
                await psub.unsubscribe()
            except Exception as exc:  # the connection may already be gone
                logger.debug("unsubscribing %s: %s", self.durable, exc)


async def fetch_batch(psub: JetStreamContext.PullSubscription, batch: int, timeout_s: float) -> list[Msg]:
    """Fetches up to ``batch`` messages; an empty list when none arrive within the timeout."""
    try:
        return await psub.fetch(batch, timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError):
        # nats-py turns a cancellation during fetch into a timeout: let the cancellation through.
        raise_if_cancelling()
        return []


#: How long a follower waits for the rest of a batch once its first message has come.
AVAILABLE_S = 0.05


class DeliveryGap(Exception):
    """A follower's consumer skipped a delivery (a fetch answer lost on the way)."""


async def follow_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    position: Callable[[], Awaitable[int]],
    apply: Callable[[list[Msg]], Awaitable[None]],
    name: str,
    batch: int = 500,
    wait_s: float = 5.0,
    retry_s: float = 1.0,
) -> NoReturn:
    """Applies a stream's messages in order, from just after ``position()``, until cancelled.

    The one way freshrec follows a stream whose position the follower keeps itself, with what it
    applied (a SQL row, a checkpoint, memory): the catalogue, in the feature service, inference
    and the trainer. An ephemeral pull consumer without acks delivers from ``position() + 1``, up
    to ``batch`` messages at a time, so a backlog never waits in memory beyond one batch; a new
    message is passed on as it arrives (an idle follower sends one pull request per ``wait_s``).
    A delivery gap (the consumer's sequence skipping: an answer lost in transit), a failure (NATS
    down, the consumer gone, ``apply`` raising), each makes the follower subscribe again from
    ``position()``: nothing is skipped, a batch ``apply`` did not record comes again, and
    nothing at or below what was received is passed on twice.
    """

    async def follow_once() -> None:
        received = await position()
        psub = await js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=received + 1,
                inactive_threshold=300.0,
            ),
        )
        logger.info("%s follows %s from sequence %d", name, stream, received + 1)
        delivered = 0
        try:
            while True:
                raise_if_cancelling()
                # One lingering request until a message comes (an idle follower asks every
                # ``wait_s``), then what else is there at once, up to ``batch``.
                msgs = await fetch_batch(psub, 1, timeout_s=wait_s)
                if msgs and batch > 1:
                    msgs += await fetch_batch(psub, batch - 1, timeout_s=AVAILABLE_S)
                fresh = []
                for msg in msgs:
                    sequence = msg.metadata.sequence
                    if sequence.consumer != delivered + 1:
                        raise DeliveryGap(f"delivery {sequence.consumer} came after {delivered}")
                    delivered = sequence.consumer
                    if sequence.stream > received:
                        received = sequence.stream
                        fresh.append(msg)
                if fresh:
                    await apply(fresh)
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await psub.unsubscribe()

    failed = f"{name}: following {stream} failed; subscribing again from the recorded position"
    await forever(follow_once, logger=logger, failed=failed, retry_s=retry_s)
