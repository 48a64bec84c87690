"""Security: JSON only (never pickle), no broker password anywhere, the payload size cap on
both sides, and who may retry or discard dead letters (admin and API).

Runs on SQLite + the embedded transport too: the failing broker here is a closed port.
The same checks against the real RabbitMQ (a wrong password) are in
``tests/integration/test_security_rabbitmq.py``.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client
from django.urls import reverse
from kombu import Connection, Producer
from rest_framework.test import APIClient

import reliable_events
from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import (
    PERMANENT_ERROR,
    RETRIES_EXHAUSTED,
    TOO_LARGE,
    WRONG_CONTENT_TYPE,
    Worker,
)
from reliable_events.exceptions import InvalidEvent, PermanentError
from reliable_events.models import DeadLetter, OutboxMessage
from tests.support.consumer_support import applied, make_consumer
from tests.support.deadletter_factory import dead_letter, staff_user
from tests.support.producer_support import free_port, with_port
from tests.support.security_support import (
    SECRET,
    broker_failure_surfaces,
    consumer_class,
    leaks,
    pickled_body,
    run_command,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("triage_consumers")]

LIBRARY = Path(reliable_events.__file__).resolve().parent
MEMORY = "memory://"
JSON_TYPES = {"application/json", "json"}


def library_modules() -> list[tuple[Path, ast.Module]]:
    files = sorted(p for p in LIBRARY.rglob("*.py") if "migrations" not in p.parts)
    assert len(files) > 20, "the library sources were not found"
    return [(path, ast.parse(path.read_text(), str(path))) for path in files]


# -- JSON only, never pickle --------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
UNSAFE_MODULES |= {"jsonpickle", "yaml", "msgpack"}


def test_no_library_module_imports_a_code_executing_serializer() -> None:
    found = []
    for path, tree in library_modules():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.Constant) and node.value in ("pickle", "yaml", "msgpack"):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert found == []


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_kombu_consumer_and_serializer_in_the_library_is_json_only() -> None:
    """Every kombu ``Consumer``/``SimpleQueue`` the library builds lists what it accepts,
    JSON only; every ``serializer=``/``accept=`` argument is JSON."""
    consumers = 0
    problems = []
    for path, tree in library_modules():
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            accept = _keyword(call, "accept")
            if name in ("Consumer", "SimpleQueue", "SimpleBuffer"):
                consumers += 1
                if accept is None:
                    problems.append(f"{path.name}:{call.lineno}: {name} without accept=")
            if accept is not None:
                values = ast.literal_eval(accept)
                if not set(values) <= JSON_TYPES or not values:
                    problems.append(f"{path.name}:{call.lineno}: accept={values!r}")
            serializer = _keyword(call, "serializer")
            if serializer is not None and ast.literal_eval(serializer) not in (None, "json"):
                problems.append(f"{path.name}:{call.lineno}: serializer=")
    assert consumers >= 1, "no kombu Consumer found: the check looks at nothing"
    assert problems == []


def test_the_embedded_consumer_accepts_json_only(clean_registry: Any) -> None:
    consumer = make_consumer(clean_registry)
    worker = Worker([consumer], url=MEMORY)
    try:
        worker.transport.connect()
        kombu_consumers = worker.transport._consumers  # type: ignore[attr-defined]
        assert kombu_consumers
        assert all(c.accept == {"application/json"} for c in kombu_consumers)
    finally:
        worker.close()


def test_a_pickled_body_is_dead_lettered_never_unpickled(
    clean_registry: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled.marker"
    body = pickled_body(marker)
    consumer = make_consumer(clean_registry)
    worker = Worker([consumer], url=MEMORY)
    worker.transport.connect()
    with Connection(MEMORY) as conn:
        producer = Producer(conn.default_channel, serializer=None, auto_declare=False)
        for message_id, content_type in (
            ("pickled", "application/x-python-serialize"),
            ("pickled-as-json", "application/json"),
        ):
            producer.publish(
                body,
                exchange="events",
                routing_key="orders.created",
                content_type=content_type,
                content_encoding="binary",
                message_id=message_id,
                type="orders.created",
            )
        producer.publish(
            b"{}",
            exchange="events",
            routing_key="orders.created",
            content_type="application/json",
            content_encoding="utf-8",
            message_id="good",
            type="orders.created",
        )
    stats = worker.run(until_idle=0.5)

    assert not marker.exists(), "a consumer unpickled a message body"
    letters = {d.message_id: d for d in DeadLetter.objects.all()}
    assert set(letters) == {"pickled", "pickled-as-json"}
    assert letters["pickled"].reason == WRONG_CONTENT_TYPE
    assert "application/x-python-serialize" in letters["pickled"].error_message
    assert letters["pickled-as-json"].reason == WRONG_CONTENT_TYPE  # content encoding binary
    assert letters["pickled"].payload is None
    assert letters["pickled"].raw_body  # kept as text for the operator, never decoded
    assert applied(consumer, "good") == 1
    assert stats.poison == 2
    assert not marker.exists()


def test_the_demo_celery_app_accepts_and_sends_json_only() -> None:
    from celery import Celery

    demo = importlib.import_module("demo_project.settings")
    app = Celery("demo-check", set_as_current=False)
    app.config_from_object(demo, namespace="CELERY")
    conf = app.conf
    assert list(demo.CELERY_ACCEPT_CONTENT) == ["json"]
    assert set(conf.accept_content) == {"json"}
    assert set(conf.result_accept_content or conf.accept_content) == {"json"}
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.event_serializer == "json"


# -- the payload size cap, both sides ----------------------------------------------------
def test_publish_event_refuses_a_payload_over_the_cap_and_writes_nothing(re_settings: Any) -> None:
    re_settings(MAX_PAYLOAD_BYTES=1000)
    at_cap = {"pad": "x" * (1000 - len(json.dumps({"pad": ""}, separators=(",", ":"))))}
    with transaction.atomic():
        publish_event("orders.created", at_cap)
    over = {"pad": at_cap["pad"] + "x"}
    with transaction.atomic(), pytest.raises(InvalidEvent, match="MAX_PAYLOAD_BYTES"):
        publish_event("orders.created", over)
    assert OutboxMessage.objects.count() == 1


def test_the_consumer_dead_letters_a_body_over_the_cap(
    clean_registry: Any, re_settings: Any
) -> None:
    re_settings(MAX_PAYLOAD_BYTES=1000)
    consumer = make_consumer(clean_registry)
    worker = Worker([consumer], url=MEMORY)
    worker.transport.connect()
    with Connection(MEMORY) as conn:
        producer = Producer(conn.default_channel, serializer=None, auto_declare=False)
        for message_id, size in (("at-cap", 1000), ("over", 1001), ("after", 2)):
            body = b'"' + b"x" * (size - 2) + b'"'
            assert len(body) == size
            producer.publish(
                body,
                exchange="events",
                routing_key="orders.created",
                content_type="application/json",
                content_encoding="utf-8",
                message_id=message_id,
                type="orders.created",
            )
    worker.run(until_idle=0.5)
    letter = DeadLetter.objects.get()
    assert (letter.message_id, letter.reason) == ("over", TOO_LARGE)
    assert "1001 bytes" in letter.error_message
    assert applied(consumer, "at-cap") == applied(consumer, "after") == 1


# -- the broker password --------------------------------------------------------------
@pytest.fixture
def secret_url(re_settings: Any) -> str:
    """A broker URL with a password, on a port where nothing listens."""
    url = with_port("amqp://guest:guest@127.0.0.1//", free_port(), password=SECRET)
    re_settings(BROKER_URL=url, CONNECT_TIMEOUT=2, CONSUMER_RECONNECT_MAX=0.5)
    return url


def test_the_broker_password_never_appears_when_the_broker_is_unreachable(
    secret_url: str, clean_registry: Any, admin_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="reliable_events")
    admin = User.objects.get(username="admin")
    api = APIClient()
    api.force_authenticate(admin)
    surfaces = broker_failure_surfaces(
        secret_url, consumer_class(clean_registry), admin_client, api
    )
    assert "Connection refused" in surfaces["OutboxMessage.last_error"] or (
        "refused" in surfaces["OutboxMessage.last_error"].lower()
    )
    assert any(r.name.startswith("reliable_events") for r in caplog.records)
    assert leaks(SECRET, surfaces, caplog.text) == []


def test_declare_topology_with_a_url_argument_keeps_its_password_out(
    clean_registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL given on the command line is not the configured one: redacted all the same."""
    caplog.set_level(logging.DEBUG)
    url = with_port("amqp://guest:guest@127.0.0.1//", free_port(), password=SECRET)
    code, text = run_command("declare_topology", "--url", url)
    assert code == 1
    assert "127.0.0.1" in text
    assert SECRET not in text
    assert SECRET not in caplog.text


def test_handler_errors_quoting_the_broker_url_are_redacted_in_dead_letters(
    secret_url: str, clean_registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="reliable_events")

    def quote_the_url(consumer: EventConsumer, event: Event) -> None:
        try:
            raise OSError(f"cannot reach {secret_url}")
        except OSError as exc:
            if event.payload.get("permanent"):
                raise PermanentError(f"gave up on {secret_url}") from exc
            raise RuntimeError(f"handler failed talking to {secret_url}") from exc

    consumer = make_consumer(clean_registry, max_retries=0, behaviour=quote_the_url)
    worker = Worker([consumer], url=MEMORY)  # consumes in-process; BROKER_URL has the secret
    worker.transport.connect()
    with Connection(MEMORY) as conn:
        producer = Producer(conn.default_channel, serializer=None, auto_declare=False)
        for message_id, payload in (("m-1", {}), ("m-2", {"permanent": True})):
            producer.publish(
                json.dumps(payload).encode(),
                exchange="events",
                routing_key="orders.created",
                content_type="application/json",
                content_encoding="utf-8",
                message_id=message_id,
                type="orders.created",
            )
    worker.run(until_idle=0.5)
    letters = {d.message_id: d for d in DeadLetter.objects.all()}
    assert letters["m-1"].reason == RETRIES_EXHAUSTED
    assert letters["m-2"].reason == PERMANENT_ERROR
    for letter in letters.values():
        stored = json.dumps(
            [
                letter.error_message,
                letter.traceback,
                letter.history,
                letter.headers,
                letter.payload,
                letter.error_type,
            ]
        )
        assert "127.0.0.1" in stored  # the error is there...
        assert SECRET not in stored  # ...without the password
        assert "OSError" in letter.traceback  # the cause is kept
    assert SECRET not in caplog.text


# -- who may retry and discard -------------------------------------------------------------
RETRY = ("retry", "retry_deadletter")
DISCARD = ("discard", "discard_deadletter")
OPERATIONS = [RETRY, DISCARD]
#: who -> the permission codenames they hold (None: anonymous).
WHO: dict[str, tuple[str, ...] | None] = {
    "anonymous": None,
    "staff-without-permission": (),
    "staff-with-view-only": ("view_deadletter",),
    "staff-with-the-other-permission": ("view_deadletter",),  # + the other op's, below
    "staff-with-permission": ("view_deadletter",),  # + this op's, below
}
DONE = {"retry": DeadLetter.Status.RETRIED, "discard": DeadLetter.Status.DISCARDED}


def _codenames(who: str, op: str, permission: str) -> tuple[str, ...] | None:
    base = WHO[who]
    if base is None:
        return None
    other = DISCARD[1] if op == "retry" else RETRY[1]
    if who == "staff-with-the-other-permission":
        return (*base, other)
    if who == "staff-with-permission":
        return (*base, permission)
    return base


def _api_client(codenames: tuple[str, ...] | None) -> APIClient:
    client = APIClient()
    if codenames is not None:
        client.force_authenticate(staff_user("someone", *codenames))
    return client


def _admin_client(codenames: tuple[str, ...] | None) -> Client:
    client = Client()
    if codenames is not None:
        client.force_login(staff_user("someone", *codenames))
    return client


def _expect_state(letters: list[DeadLetter], allowed: bool, op: str) -> None:
    for letter in letters:
        letter.refresh_from_db()
        assert letter.status == (DONE[op] if allowed else DeadLetter.Status.OPEN), op
    retries = OutboxMessage.objects.filter(queue__gt="").count()
    assert retries == (len(letters) if allowed and op == "retry" else 0)


@pytest.mark.parametrize(("op", "permission"), OPERATIONS, ids=["retry", "discard"])
@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("bulk", [False, True], ids=["one", "bulk"])
def test_api_retry_and_discard_permissions(who: str, op: str, permission: str, bulk: bool) -> None:
    letter = dead_letter()
    client = _api_client(_codenames(who, op, permission))
    url = (
        f"/api/events/dead-letters/{op}/" if bulk else f"/api/events/dead-letters/{letter.pk}/{op}/"
    )
    body: dict[str, Any] = {"note": "checked"}
    if bulk:
        body["ids"] = [letter.pk]
    response = client.post(url, body, format="json")
    allowed = who == "staff-with-permission"
    if who == "anonymous":
        assert response.status_code in (401, 403)
    elif allowed:
        assert response.status_code == 200, response.content
    else:
        assert response.status_code == 403
        assert f"reliable_events.{permission}" in response.json()["detail"]
    _expect_state([letter], allowed, op)


def _admin_attempt(client: Client, surface: str, op: str, letter: DeadLetter) -> Any:
    note = {"note": "checked"}
    if surface == "action":
        return client.post(
            reverse("admin:reliable_events_deadletter_changelist"),
            {
                "action": f"{op}_selected",
                "_selected_action": [letter.pk],
                "confirm": "yes",
                **note,
            },
        )
    if surface == "detail":
        return client.post(
            reverse("admin:reliable_events_deadletter_triage", args=[letter.pk]),
            {"op": op, **note},
        )
    return client.post(
        reverse("admin:reliable_events_deadletter_group_action"),
        {
            "consumer": letter.consumer,
            "fingerprint": letter.fingerprint,
            # The group as the page showed it: this one letter.
            "upto": letter.pk,
            "seen": 1,
            "op": op,
            **note,
        },
    )


@pytest.mark.parametrize(("op", "permission"), OPERATIONS, ids=["retry", "discard"])
@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("surface", ["action", "detail", "group"])
def test_admin_retry_and_discard_permissions(
    who: str, op: str, permission: str, surface: str
) -> None:
    letter = dead_letter()
    client = _admin_client(_codenames(who, op, permission))
    response = _admin_attempt(client, surface, op, letter)
    allowed = who == "staff-with-permission"
    if who == "anonymous":
        assert response.status_code == 302
        assert reverse("admin:login") in response["Location"]
    elif allowed:
        assert response.status_code == 302, response.content[:500]
    elif surface == "action" and WHO[who]:
        # The changelist is visible, but the action is not offered: nothing runs.
        assert response.status_code in (200, 302)
    else:
        assert response.status_code == 403
    _expect_state([letter], allowed, op)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("amqp://ops:S3cr/etI9@127.0.0.1:5672//", "S3cr/etI9"),  # base64 has "/"
        ("amqp://ops:p@ss#wo?rd@127.0.0.1:5672/vh", "p@ss#wo?rd"),
        ("amqp://ops:ok-pass@h1:5672//;amqp://ops:Z9/x+y7q@h2:5672//", "Z9/x+y7q"),
        ("amqp://ops:pa%2Fss-word@127.0.0.1//", "pa/ss-word"),  # encoded: kombu decodes it
    ],
)
def test_a_password_with_a_character_the_url_parser_cuts_at_stays_out(
    url: str, secret: str
) -> None:
    """A raw ``/`` in a password made ``urlsplit`` find none, so nothing was masked, and
    kombu's error quoted the piece before it ("Port could not be cast to integer value as
    'S3cr'") on the overview, the stats API and ``outbox_status --json``."""
    from reliable_events.broker_url import safe_url
    from reliable_events.sanitize import describe_error, redact

    shown = safe_url(url)
    try:
        Connection(url.split(";")[-1], connect_timeout=0.1).connect()
    except Exception as exc:  # whatever kombu raises for it: refused, unparsable
        error = describe_error(exc, url)
    else:  # pragma: no cover - nothing listens there
        raise AssertionError("connected")
    for text in (shown, error, redact(f"{url} / {secret} / {url.replace(secret, 'x')}", url)):
        for piece in (secret, *(p for p in secret.replace("#", "/").split("/") if len(p) >= 3)):
            assert piece not in text, (piece, text)
    assert shown.count("ops:**@") == url.count("ops:")  # each node, its user name kept
