"""The outbox, the consumers' idempotency records and the dead letters."""

from __future__ import annotations

from typing import ClassVar

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from reliable_events.querysets import (
    DeadLetterQuerySet,
    OutboxQuerySet,
    ProcessedMessageQuerySet,
)

TOPIC_MAX_LENGTH = 255
KEY_MAX_LENGTH = 255
MESSAGE_ID_MAX_LENGTH = 255
NAME_MAX_LENGTH = 200


class OutboxMessage(models.Model):
    """An event waiting for (or done with) its confirmed publish to the broker.

    Rows are written by ``publish_event`` in the caller's transaction and owned by the
    system afterwards: only the relay and the retry/purge services change them.
    """

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        SENT = "sent", _("sent")
        DEAD = "dead", _("dead")

    id = models.BigAutoField(primary_key=True, help_text=_("Outbox order: the relay sends by id."))
    message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH,
        help_text=_("AMQP message id; consumers deduplicate on it."),
    )
    topic = models.CharField(
        max_length=TOPIC_MAX_LENGTH,
        help_text=_("Routing key on the events exchange (dot-separated words)."),
    )
    # NULL (not "") means "no ordering": NULL never equals NULL in the holdback query.
    key = models.CharField(  # noqa: DJ001
        max_length=KEY_MAX_LENGTH,
        null=True,
        blank=True,
        help_text=_("Ordering key: events with the same key reach the broker in publish order."),
    )
    lane = models.PositiveSmallIntegerField(
        default=0,
        help_text=_("Ordering lane derived from the key; one relay holds a lane at a time."),
    )
    queue = models.CharField(
        max_length=NAME_MAX_LENGTH,
        blank=True,
        default="",
        help_text=_(
            "Empty for a normal event. Otherwise the event goes straight to this queue "
            "(a dead-letter retry for one consumer) instead of the events exchange."
        ),
    )
    payload = models.JSONField(help_text=_("The event body, sent as JSON."))
    headers = models.JSONField(
        default=dict, blank=True, help_text=_("String-valued AMQP headers sent with the event.")
    )
    status = models.CharField(
        max_length=10,
        choices=Status.choices,
        default=Status.PENDING,
        help_text=_("pending until the broker confirms it; dead after MAX_ATTEMPTS failures."),
    )
    attempts = models.PositiveIntegerField(
        default=0, help_text=_("Publish attempts made so far (confirmed or not).")
    )
    next_attempt_at = models.DateTimeField(
        help_text=_("The relay will not publish the row before this time (delay or backoff).")
    )
    created_at = models.DateTimeField(
        db_default=Now(), help_text=_("When publish_event stored the row (database clock).")
    )
    sent_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the broker confirmed the publish.")
    )
    last_error = models.TextField(
        blank=True, default="", help_text=_("Why the last publish attempt failed.")
    )

    objects: ClassVar[OutboxQuerySet] = OutboxQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox messages")
        ordering = ("-id",)
        constraints = (
            models.UniqueConstraint(
                fields=("message_id",),
                condition=Q(queue=""),
                name="re_outbox_unique_message_id",
            ),
        )
        indexes = (
            # The relay's claim: pending rows by due time (partial, so sent history
            # does not slow it down).
            models.Index(
                fields=("next_attempt_at", "id"),
                condition=Q(status="pending"),
                name="re_outbox_due",
            ),
            # Per-key ordering checks: earlier pending rows of the same key.
            models.Index(
                fields=("key", "id"),
                condition=Q(status="pending"),
                name="re_outbox_pending_key",
            ),
            # The claim's hold-back check, once per claimed row: has the row's key a
            # pending row that is not due (delayed, backing off)?  A range of that key's
            # not-due rows, whatever the number of its due ones (a hot key's rows in
            # flight) or of other keys' not-due ones (a scheduler's delayed events).
            models.Index(
                fields=("key", "next_attempt_at"),
                condition=Q(status="pending"),
                name="re_outbox_pending_key_due",
            ),
            # The relay claims pending rows oldest id first: this walks them in id order
            # without the sent history (with only re_outbox_status, PostgreSQL may scan
            # the primary key through the history instead: measured by bench/history.py).
            models.Index(
                fields=("id",), condition=Q(status="pending"), name="re_outbox_pending_id"
            ),
            models.Index(fields=("sent_at",), condition=Q(status="sent"), name="re_outbox_sent_at"),
            models.Index(fields=("status", "id"), name="re_outbox_status"),
            # A message's timeline: the re-deliveries of retries (few rows; the originals
            # are found through re_outbox_unique_message_id).
            models.Index(
                fields=("message_id",),
                condition=~Q(queue=""),
                name="re_outbox_redelivery_id",
            ),
        )

    def __str__(self) -> str:
        return f"{self.topic} {self.message_id} ({self.status})"


class ProcessedMessage(models.Model):
    """A message a consumer has applied, written in the same transaction as its effects."""

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    consumer = models.CharField(
        max_length=NAME_MAX_LENGTH, help_text=_("Name of the consumer that processed it.")
    )
    message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH, help_text=_("The processed message's id.")
    )
    topic = models.CharField(
        max_length=TOPIC_MAX_LENGTH, blank=True, default="", help_text=_("The event's topic.")
    )
    processed_at = models.DateTimeField(
        db_default=Now(), help_text=_("When the handler's transaction committed.")
    )

    objects: ClassVar[ProcessedMessageQuerySet] = ProcessedMessageQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        verbose_name = _("processed message")
        verbose_name_plural = _("processed messages")
        ordering = ("-id",)
        constraints = (
            models.UniqueConstraint(fields=("consumer", "message_id"), name="re_processed_unique"),
        )
        indexes = (models.Index(fields=("processed_at",), name="re_processed_at"),)

    def __str__(self) -> str:
        return f"{self.consumer}: {self.message_id}"


class DeadLetter(models.Model):
    """A message a consumer gave up on, kept for staff to inspect, retry or discard."""

    class Status(models.TextChoices):
        OPEN = "open", _("open")
        RETRIED = "retried", _("retried")
        DISCARDED = "discarded", _("discarded")

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    consumer = models.CharField(
        max_length=NAME_MAX_LENGTH, help_text=_("The consumer that gave up on the message.")
    )
    queue = models.CharField(
        max_length=NAME_MAX_LENGTH, blank=True, default="", help_text=_("The consumer's queue.")
    )
    message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH,
        blank=True,
        default="",
        help_text=_("The message's id (empty when the message had none)."),
    )
    topic = models.CharField(
        max_length=TOPIC_MAX_LENGTH, blank=True, default="", help_text=_("The event's topic.")
    )
    key = models.CharField(
        max_length=KEY_MAX_LENGTH, blank=True, default="", help_text=_("The event's ordering key.")
    )
    payload = models.JSONField(
        null=True, blank=True, help_text=_("The decoded payload (empty when it was not JSON).")
    )
    raw_body = models.TextField(
        blank=True,
        default="",
        help_text=_("The body as received, when it could not be decoded (truncated)."),
    )
    headers = models.JSONField(default=dict, blank=True, help_text=_("The message's headers."))
    reason = models.CharField(
        max_length=50,
        help_text=_(
            "Why it was dead-lettered: retries-exhausted, permanent-error or a poison kind."
        ),
    )
    error_type = models.CharField(
        max_length=200, blank=True, default="", help_text=_("Qualified name of the last exception.")
    )
    error_message = models.TextField(
        blank=True, default="", help_text=_("Message of the last exception.")
    )
    traceback = models.TextField(
        blank=True, default="", help_text=_("Traceback of the last failure.")
    )
    fingerprint = models.CharField(
        max_length=64,
        blank=True,
        default="",
        db_index=True,
        help_text=_("Groups alike failures: error type and first application frame."),
    )
    attempts = models.PositiveIntegerField(
        default=1, help_text=_("Handler attempts made before giving up.")
    )
    history = models.JSONField(
        default=list, blank=True, help_text=_("One entry per failed attempt: time and error.")
    )
    first_failed_at = models.DateTimeField(help_text=_("Time of the first failed attempt."))
    last_failed_at = models.DateTimeField(help_text=_("Time of the last failed attempt."))
    status = models.CharField(
        max_length=10,
        choices=Status.choices,
        default=Status.OPEN,
        help_text=_("open until staff retry or discard it."),
    )
    resolved_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When it was retried or discarded.")
    )
    resolved_by = models.CharField(
        max_length=150, blank=True, default="", help_text=_("Who retried or discarded it.")
    )
    note = models.TextField(blank=True, default="", help_text=_("Why it was discarded or retried."))
    created_at = models.DateTimeField(
        db_default=Now(), help_text=_("When the dead letter was written.")
    )

    objects: ClassVar[DeadLetterQuerySet] = DeadLetterQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        verbose_name = _("dead letter")
        verbose_name_plural = _("dead letters")
        ordering = ("-id",)
        permissions = (
            ("retry_deadletter", "Can retry dead letters"),
            ("discard_deadletter", "Can discard dead letters"),
            ("edit_deadletter", "Can edit a dead letter's payload and retry the copy"),
        )
        indexes = (
            models.Index(fields=("status", "consumer"), name="re_deadletter_status"),
            models.Index(fields=("message_id",), name="re_deadletter_message_id"),
            models.Index(fields=("created_at",), name="re_deadletter_created"),
        )

    def __str__(self) -> str:
        return f"{self.consumer}: {self.message_id or '(no id)'} ({self.status})"


class QueuedMessage(models.Model):
    """A message waiting in a queue of the database transport (``BROKER_URL = "db://"``).

    Written by the relay (one row per queue the topic is bound to) and by consumers
    scheduling a retry; a consumer deletes it in the transaction that applies it.  See
    :mod:`reliable_events.broker.database`.
    """

    id = models.BigAutoField(primary_key=True, help_text=_("Queue order: consumers claim by id."))
    queue = models.CharField(
        max_length=NAME_MAX_LENGTH, help_text=_("The consumer queue (or the unrouted queue).")
    )
    message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH, help_text=_("The message's id (consumers deduplicate).")
    )
    topic = models.CharField(
        max_length=TOPIC_MAX_LENGTH, blank=True, default="", help_text=_("The event's topic.")
    )
    key = models.CharField(  # noqa: DJ001
        max_length=KEY_MAX_LENGTH, null=True, blank=True, help_text=_("The event's ordering key.")
    )
    headers = models.JSONField(default=dict, blank=True, help_text=_("The message's headers."))
    body = models.BinaryField(help_text=_("The message body as published (JSON bytes)."))
    attempt = models.PositiveIntegerField(
        default=1, help_text=_("Handler attempt this delivery is (retries count up).")
    )
    available_at = models.DateTimeField(
        db_default=Now(), help_text=_("Consumers do not take it before this time (retry delay).")
    )
    published_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the event was first stored.")
    )
    created_at = models.DateTimeField(
        db_default=Now(), help_text=_("When this row was written (database clock).")
    )

    class Meta:
        verbose_name = _("queued message")
        verbose_name_plural = _("queued messages")
        ordering = ("id",)
        indexes = (
            # The claim walks a queue in id order; the idle look finds the next due time.
            models.Index(fields=("queue", "id"), name="re_queued_claim"),
            models.Index(fields=("queue", "available_at"), name="re_queued_due"),
        )

    def __str__(self) -> str:
        return f"{self.queue}: {self.message_id}"


class TriageEntry(models.Model):
    """The audit trail of dead-letter triage: one row per letter per retry, discard or edit.

    Written by :mod:`reliable_events.deadletters` in the transaction that changes the
    letter, whoever asked (admin, API, management command); never changed afterwards.
    It keeps the letter's id and message id as plain values, so it outlives a purge.
    """

    class Action(models.TextChoices):
        RETRY = "retry", _("retry")
        DISCARD = "discard", _("discard")
        EDIT_RETRY = "edit-retry", _("edit and retry")

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    dead_letter_id = models.BigIntegerField(help_text=_("The dead letter acted on."))
    consumer = models.CharField(
        max_length=NAME_MAX_LENGTH, help_text=_("The dead letter's consumer.")
    )
    message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH, blank=True, default="", help_text=_("Its message id.")
    )
    action = models.CharField(max_length=20, choices=Action.choices, help_text=_("What was done."))
    user = models.CharField(max_length=150, blank=True, default="", help_text=_("Who did it."))
    source = models.CharField(
        max_length=50,
        blank=True,
        default="",
        help_text=_("Where: admin, admin group, api, command."),
    )
    at = models.DateTimeField(db_default=Now(), help_text=_("When (database clock)."))
    note = models.TextField(blank=True, default="", help_text=_("The note given."))
    outbox_id = models.BigIntegerField(
        null=True, blank=True, help_text=_("The outbox row carrying the re-delivery.")
    )
    copy_message_id = models.CharField(
        max_length=MESSAGE_ID_MAX_LENGTH,
        blank=True,
        default="",
        help_text=_("Edit and retry: the new message id of the edited copy."),
    )
    changes = models.JSONField(
        default=dict,
        blank=True,
        help_text=_("Edit and retry: the payload before and after."),
    )

    class Meta:
        verbose_name = _("triage entry")
        verbose_name_plural = _("triage entries")
        ordering = ("id",)
        indexes = (
            models.Index(fields=("dead_letter_id", "id"), name="re_triage_letter"),
            models.Index(fields=("message_id",), name="re_triage_message_id"),
            models.Index(fields=("copy_message_id",), name="re_triage_copy_id"),
        )

    def __str__(self) -> str:
        return f"{self.action} of dead letter {self.dead_letter_id} by {self.user or 'system'}"


class LaneLease(models.Model):
    """Which relay holds an ordering lane, until when, with which fencing token.

    Written only by :mod:`reliable_events.relay.leases`, in short transactions: no
    session state, so it works through a transaction-pooling pooler.  On SQLite the row of
    lane 0 is the one lease that lets one relay at a time publish.
    ``token`` grows each time the lane changes hands; a relay's claims and sent-marks
    check the token it got, so a relay whose lease ran out cannot claim or mark the
    lane's rows any more.
    """

    lane = models.IntegerField(primary_key=True, help_text=_("The ordering lane."))
    owner = models.CharField(
        max_length=64, blank=True, default="", help_text=_("The holding relay ('' = free).")
    )
    expires_at = models.DateTimeField(
        db_default=Now(), help_text=_("The lease ends then unless renewed (database clock).")
    )
    token = models.BigIntegerField(
        default=0, help_text=_("Fencing token: incremented at each acquisition.")
    )

    class Meta:
        verbose_name = _("lane lease")
        verbose_name_plural = _("lane leases")
        ordering = ("lane",)

    def __str__(self) -> str:
        return f"lane {self.lane}: {self.owner or 'free'}"


class RelayPresence(models.Model):
    """A running relay, renewed while it lives: relays count the unexpired rows to
    share the lanes.  Written only by :mod:`reliable_events.relay.leases`."""

    owner = models.CharField(max_length=64, primary_key=True, help_text=_("The relay's id."))
    process = models.CharField(
        max_length=255, blank=True, default="", help_text=_("Host and process id.")
    )
    expires_at = models.DateTimeField(
        db_default=Now(), help_text=_("It stops counting then unless renewed (database clock).")
    )

    class Meta:
        verbose_name = _("relay presence")
        verbose_name_plural = _("relay presences")
        ordering = ("owner",)

    def __str__(self) -> str:
        return f"relay {self.owner} ({self.process})"


class Heartbeat(models.Model):
    """One relay or consumer process: who it is, what it runs, when it was last seen.

    Written only by :mod:`reliable_events.liveness` (a row per process, updated every
    ``HEARTBEAT_SECONDS``); read by the admin overview, ``outbox_status``, the health
    command and endpoint, and the metrics.  Rows of stopped or vanished processes are
    deleted by ``purge_outbox`` after ``HEARTBEAT_RETENTION_DAYS``.
    """

    class Kind(models.TextChoices):
        RELAY = "relay", _("relay")
        CONSUMER = "consumer", _("consumer")

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    kind = models.CharField(max_length=20, choices=Kind.choices, help_text=_("Process kind."))
    host = models.CharField(max_length=255, help_text=_("Host name."))
    pid = models.IntegerField(help_text=_("Process id."))
    consumers = models.JSONField(
        default=list, blank=True, help_text=_("Names of the consumers it runs.")
    )
    started_at = models.DateTimeField(help_text=_("When the process started beating."))
    last_seen = models.DateTimeField(db_index=True, help_text=_("Its last heartbeat."))
    stopped = models.BooleanField(default=False, help_text=_("It stopped cleanly."))
    counters = models.JSONField(
        default=dict, blank=True, help_text=_("Its counters at the last heartbeat.")
    )
    topology = models.JSONField(
        default=dict,
        blank=True,
        help_text=_("The queues and exchanges of each consumer it runs, by consumer name."),
    )

    class Meta:
        verbose_name = _("heartbeat")
        verbose_name_plural = _("heartbeats")
        ordering = ("kind", "host", "pid")

    def __str__(self) -> str:
        return f"{self.kind} {self.host}:{self.pid}"


class KeyHold(models.Model):
    """A key an ordered consumer holds: its head event was dead-lettered, so its later
    events are parked (:class:`ParkedEvent`) until the dead letter is retried or
    discarded (``state`` then says which; a consumer process releases them in order).

    Written by the consumer (dead-lettering, releasing) and by the dead-letter service
    (:mod:`reliable_events.deadletters`: retry, discard).  See
    :mod:`reliable_events.consumer.ordering`.
    """

    class State(models.TextChoices):
        HELD = "held", _("held")
        RETRY = "retry", _("released: retry the dead letter, then the parked events")
        DISCARD = "discard", _("released: the parked events only")

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    consumer = models.CharField(max_length=NAME_MAX_LENGTH, help_text=_("The ordered consumer."))
    key = models.CharField(  # noqa: DJ001
        max_length=KEY_MAX_LENGTH,
        null=True,
        blank=True,
        help_text=_("The held ordering key (none: a keyless dead letter being retried)."),
    )
    dead_letter_id = models.BigIntegerField(help_text=_("The dead letter at the key's head."))
    state = models.CharField(
        max_length=10, choices=State.choices, default=State.HELD, help_text=_("Held or released.")
    )
    created_at = models.DateTimeField(
        db_default=Now(), help_text=_("When the key was first held (database clock).")
    )
    updated_at = models.DateTimeField(
        db_default=Now(), help_text=_("Last change of state (database clock).")
    )

    class Meta:
        verbose_name = _("held key")
        verbose_name_plural = _("held keys")
        ordering = ("id",)
        constraints = (
            models.UniqueConstraint(fields=("consumer", "key"), name="re_keyhold_consumer_key"),
        )
        indexes = (models.Index(fields=("state", "consumer"), name="re_keyhold_state"),)

    def __str__(self) -> str:
        return f"{self.consumer}: {self.key} ({self.state})"


class ParkedEvent(models.Model):
    """An event of a held key, kept in arrival order until its key is released."""

    id = models.BigAutoField(primary_key=True, help_text=_("Arrival order: released by id."))
    consumer = models.CharField(max_length=NAME_MAX_LENGTH, help_text=_("The ordered consumer."))
    key = models.CharField(max_length=KEY_MAX_LENGTH, help_text=_("The held ordering key."))
    message_id = models.CharField(max_length=MESSAGE_ID_MAX_LENGTH, help_text=_("The message id."))
    topic = models.CharField(
        max_length=TOPIC_MAX_LENGTH, blank=True, default="", help_text=_("The event's topic.")
    )
    payload = models.JSONField(null=True, blank=True, help_text=_("The event body."))
    headers = models.JSONField(default=dict, blank=True, help_text=_("The message's headers."))
    published_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the event was first stored.")
    )
    parked_at = models.DateTimeField(
        db_default=Now(), help_text=_("When it was parked (database clock).")
    )

    class Meta:
        verbose_name = _("parked event")
        verbose_name_plural = _("parked events")
        ordering = ("id",)
        constraints = (
            models.UniqueConstraint(
                fields=("consumer", "message_id"), name="re_parked_consumer_message"
            ),
        )
        indexes = (models.Index(fields=("consumer", "key", "id"), name="re_parked_key"),)

    def __str__(self) -> str:
        return f"{self.consumer}: {self.key} / {self.message_id}"


class ConsumerMember(models.Model):
    """A live consumer process running an ordered consumer (its heartbeat): the processes
    share the consumer's partitions (:mod:`reliable_events.consumer.partitions`)."""

    id = models.BigAutoField(primary_key=True, help_text=_("Row id."))
    consumer = models.CharField(max_length=NAME_MAX_LENGTH, help_text=_("The ordered consumer."))
    member = models.CharField(max_length=100, help_text=_("host:pid:random of the process."))
    heartbeat_at = models.DateTimeField(
        db_default=Now(), help_text=_("Last heartbeat (database clock).")
    )

    class Meta:
        verbose_name = _("ordered consumer process")
        verbose_name_plural = _("ordered consumer processes")
        ordering = ("consumer", "member")
        constraints = (
            models.UniqueConstraint(
                fields=("consumer", "member"), name="re_member_consumer_member"
            ),
        )

    def __str__(self) -> str:
        return f"{self.consumer}: {self.member}"
