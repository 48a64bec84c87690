"""Run the whole demo: set up, start web + relay + consumers, seed orders, report, stop.

``scripts/demo`` prepares the virtualenv and then runs ``python -m demo_project.supervisor``.

Processes (each in its own process group, logs in ``$DEMO_VAR_DIR/logs/``):

* ``web``: ``manage.py runserver`` - admin, the orders API (publishes on commit) and the
  triage API;
* the relay, one of:

  * ``relay``: ``manage.py relay_outbox`` - the relay daemon (pipelined runs; idle, it
    polls every ``RELAY_IDLE_SECONDS``, or wakes on ``NOTIFY`` on PostgreSQL), on the
    embedded default and whenever the broker is not RabbitMQ;
  * ``worker``: ``celery -A demo_project worker -B`` - on RabbitMQ (``DEMO_BROKER_URL``),
    the Celery deployment: beat on the DatabaseScheduler runs the relay task every 2
    seconds (and the purge hourly);

* ``consumers``: ``manage.py consume_events`` - ``inventory.reserve-stock`` and
  ``notifications.send-confirmation``.

Every one of them goes through the production code paths; with no environment they run
on SQLite and the database transport (``db://``), with ``DEMO_PG_NAME`` /
``DEMO_BROKER_URL`` on PostgreSQL / RabbitMQ.  Celery only ever runs on RabbitMQ: kombu's
server-less transports are not safe across processes.

Exit codes: 0 ran and stopped cleanly (Ctrl-C, SIGTERM or ``--seconds``); 1 setup
failed (port taken, database unreachable, migrations); 2 a process of the system died
or would not start; 3 a process had to be killed at shutdown; 4 the demo could not
place its orders through the API (the web server refused them: then nothing it printed
works either).
"""

from __future__ import annotations

import argparse
import http.cookiejar
import io
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from demo_project.children import Child, stop_children
from demo_project.hosts import WILDCARD_BINDS, allowed_hosts, local_url_host

ROOT = Path(__file__).resolve().parent.parent
ADMIN_USER = "admin"
VIEWER_USER = "viewer"
DOMAINS = [
    ("shop.example", "ok"),
    ("flaky.example", "flaky"),
    ("down.example", "down"),
    ("bounce.example", "bounces"),
]
#: One order in eight goes to each failing domain; the rest succeed.
DOMAIN_CYCLE = ["shop.example"] * 5 + ["flaky.example", "down.example", "bounce.example"]
SKUS = ["BOOK-1", "MUG-2", "TSHIRT-3"]
RELAY_EVERY = 2

EXIT_SETUP = 1
EXIT_CHILD_DIED = 2
EXIT_KILLED = 3
EXIT_SEED_FAILED = 4


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


# -- setup -------------------------------------------------------------------------------------
def ensure_postgres_database() -> None:
    name = os.environ.get("DEMO_PG_NAME")
    if not name:
        return
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=os.environ.get("DEMO_PG_HOST", "127.0.0.1"),
        port=os.environ.get("DEMO_PG_PORT", "5432"),
        user=os.environ.get("DEMO_PG_USER", "postgres"),
        password=os.environ.get("DEMO_PG_PASSWORD", ""),
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            say(f"created PostgreSQL database {name}")


def admin_password(var_dir: Path) -> str:
    path = var_dir / "admin-password.txt"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(9)
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password


def uses_celery() -> bool:
    """Whether the relay is Celery's worker with beat: only when the settings give Celery a
    broker of its own (RabbitMQ); otherwise it is the ``relay_outbox`` daemon."""
    from django.conf import settings

    return bool(getattr(settings, "CELERY_BROKER_URL", ""))


def relay_child(python: str, manage: str, logs: Path) -> Child:
    if uses_celery():
        return Child(
            "worker",
            [
                python,
                "-m",
                "celery",
                "-A",
                "demo_project",
                "worker",
                "-B",
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            logs / "worker.log",
        )
    return Child("relay", [python, manage, "relay_outbox"], logs / "relay.log")


def relay_description() -> str:
    if uses_celery():
        return f"Celery worker with beat (relay task every {RELAY_EVERY} s, on RabbitMQ)"
    return "relay_outbox daemon (manage.py relay_outbox)"


def prepare(var_dir: Path, password: str) -> None:
    """Migrations, users, demo data, beat schedule (Celery only), broker topology (in this
    process)."""
    from django.contrib.auth.models import Permission, User
    from django.core.management import call_command
    from django.db import connections

    from demo_project.notifications.models import MailDomain
    from reliable_events.broker import is_amqp_url
    from reliable_events.conf import app_settings
    from reliable_events.schedule import install_beat_schedule

    call_command("migrate", interactive=False, verbosity=0)
    admin, _ = User.objects.get_or_create(username=ADMIN_USER)
    admin.is_staff = admin.is_superuser = True
    admin.set_password(password)
    admin.save()
    viewer, _ = User.objects.get_or_create(username=VIEWER_USER)
    viewer.is_staff = True
    viewer.is_superuser = False
    viewer.set_password(password)
    viewer.save()
    viewer.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="reliable_events", codename__startswith="view_"
        )
    )
    for name, behaviour in DOMAINS:
        MailDomain.objects.update_or_create(name=name, defaults={"behaviour": behaviour})
    if uses_celery():  # without Celery no beat runs: no schedule to show in the admin
        install_beat_schedule(relay_every=RELAY_EVERY)
    if is_amqp_url(str(app_settings.BROKER_URL)):
        call_command("declare_topology", stdout=io.StringIO())
    connections.close_all()


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_http(url: str, timeout: float, children: list[Child]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(not c.alive() for c in children):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    return False


# -- traffic ---------------------------------------------------------------------------------
class Seeder:
    """Places orders through the orders API, logged in once with a session (like a browser)."""

    def __init__(self, base_url: str, password: str) -> None:
        self.base_url = base_url
        self.password = password
        self.placed = 0
        self.errors: list[str] = []
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.csrf = ""

    def _cookie(self, name: str) -> str:
        return next((c.value or "" for c in self.cookies if c.name == name), "")

    def login(self) -> bool:
        url = f"{self.base_url}/admin/login/"
        try:
            self.opener.open(url, timeout=30).close()
            body = urllib.parse.urlencode(
                {
                    "username": ADMIN_USER,
                    "password": self.password,
                    "csrfmiddlewaretoken": self._cookie("csrftoken"),
                    "next": "/admin/",
                }
            ).encode()
            request = urllib.request.Request(url, data=body, headers={"Referer": url})
            self.opener.open(request, timeout=30).close()
        except (urllib.error.URLError, OSError) as exc:
            self.errors.append(f"login: {exc}")
            return False
        self.csrf = self._cookie("csrftoken")
        if not self._cookie("sessionid"):
            self.errors.append("login: no session")
            return False
        return True

    def place(self, index: int) -> None:
        domain = DOMAIN_CYCLE[index % len(DOMAIN_CYCLE)]
        body = json.dumps(
            {
                "customer_email": f"customer{index}@{domain}",
                "sku": SKUS[index % len(SKUS)],
                "quantity": 1 + index % 3,
            }
        ).encode()
        url = f"{self.base_url}/api/orders/"
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-CSRFToken": self.csrf, "Referer": url},
        )
        try:
            with self.opener.open(request, timeout=30) as response:
                if response.status == 201:
                    self.placed += 1
                    return
                self.errors.append(f"HTTP {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            self.errors.append(str(exc))

    def trickle(self, start: int, every: float, stop: threading.Event) -> None:
        index = start
        while not stop.wait(every):
            self.place(index)
            index += 1


def seed(seeder: Seeder, orders: int) -> int | None:
    """Log in and place ``orders`` orders; ``EXIT_SEED_FAILED`` when none could be placed
    because the API refused (then nothing the demo printed works)."""
    if seeder.login():
        for index in range(orders):
            seeder.place(index)
    say(f"placed {seeder.placed} orders through the API ({len(seeder.errors)} errors)")
    return EXIT_SEED_FAILED if seeder.errors and not seeder.placed else None


# -- figures ---------------------------------------------------------------------------------
def summary() -> dict[str, Any]:
    from django.db import connections
    from django.db.models import Count

    from demo_project.inventory.models import Reservation
    from demo_project.notifications.models import Notification
    from demo_project.orders.models import Order
    from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage

    try:
        order_ids = set(Order.objects.values_list("id", flat=True))
        reserved = set(Reservation.objects.values_list("order_id", flat=True))
        data = {
            "orders": len(order_ids),
            "reservations": len(reserved),
            "orders_without_reservation": len(order_ids - reserved),
            "notifications": Notification.objects.count(),
            "notifications_after_retries": Notification.objects.filter(attempt__gt=1).count(),
            "processed": dict(
                ProcessedMessage.objects.order_by()
                .values_list("consumer")
                .annotate(n=Count("id"))
                .values_list("consumer", "n")
            ),
            "dead_letters_open": DeadLetter.objects.open().counts_by_consumer(),
            "dead_letters_by_reason": dict(
                DeadLetter.objects.order_by()
                .values_list("reason")
                .annotate(n=Count("id"))
                .values_list("reason", "n")
            ),
            "outbox": OutboxMessage.objects.status_counts(),
        }
    finally:
        connections.close_all()
    return data


def status_line(data: dict[str, Any]) -> str:
    dead = sum(data["dead_letters_open"].values())
    return (
        f"orders={data['orders']} reserved={data['reservations']} "
        f"notified={data['notifications']} (after retries: {data['notifications_after_retries']}) "
        f"open dead letters={dead} outbox pending={data['outbox']['pending']}"
    )


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description="Run the reliable_events demo (web, relay, consumers)."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="Run this long once the system is up, then stop everything (default: until Ctrl-C).",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--orders", type=int, default=24, help="Orders placed at start.")
    parser.add_argument(
        "--trickle",
        type=float,
        default=5.0,
        help="Seconds between further orders (0: none). Stops 15 s before --seconds ends.",
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.orders < 0 or args.trickle < 0:
        parser.error("--orders and --trickle must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    # The settings accept this host (ALLOWED_HOSTS), here and in every child process.
    os.environ["DEMO_HOST"] = args.host
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    import django
    from django.conf import settings

    django.setup()
    var_dir = Path(getattr(settings, "VAR_DIR"))  # noqa: B009 - demo-only setting
    logs = var_dir / "logs"
    for folder in (var_dir, logs):
        folder.mkdir(parents=True, exist_ok=True)
    from reliable_events.broker import safe_url
    from reliable_events.conf import app_settings

    database = settings.DATABASES["default"]
    say(f"database: {str(database['ENGINE']).rsplit('.', 1)[-1]} {database['NAME']}")
    say(f"broker:   {safe_url(str(app_settings.BROKER_URL))}")
    say(f"relay:    {relay_description()}")
    if not port_free(args.host, args.port):
        say(f"port {args.port} is taken: pass --port or set DEMO_PORT")
        return EXIT_SETUP
    password = admin_password(var_dir)
    try:
        ensure_postgres_database()
        prepare(var_dir, password)
    except Exception as exc:  # any setup failure: say what and stop
        say(f"setup failed: {type(exc).__name__}: {exc}")
        return EXIT_SETUP

    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "demo_project.settings",
            "DEMO_VAR_DIR": str(var_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    python = sys.executable
    manage = str(ROOT / "manage.py")
    relay = relay_child(python, manage, logs)
    children = [
        Child(
            "web",
            # --insecure: serve the admin's static files with DEBUG off (the default).
            [python, manage, "runserver", f"{args.host}:{args.port}", "--noreload", "--insecure"],
            logs / "web.log",
        ),
        relay,
        Child("consumers", [python, manage, "consume_events"], logs / "consumers.log"),
    ]
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    trickle_stop = threading.Event()
    code = 0
    up = 0.0
    base_url = f"http://{local_url_host(args.host)}:{args.port}"
    seeder = Seeder(base_url, password)
    try:
        for child in children:
            child.start(env, ROOT)
        if not wait_http(f"{base_url}/admin/login/", 90, children):
            for child in children:
                if not child.alive():
                    say(f"{child.name} exited early:\n{child.tail()}")
            say("the web server did not come up; see " + str(logs / "web.log"))
            return EXIT_CHILD_DIED
        up = time.monotonic() - began
        say(f"up in {up:.1f} s (pids: " + ", ".join(f"{c.name}={c.pid}" for c in children) + ")")
        say("")
        say(f"  overview      {base_url}/admin/reliable_events/deadletter/overview/")
        say(f"  dead letters  {base_url}/admin/reliable_events/deadletter/")
        say(f"  orders API    {base_url}/api/orders/")
        say(f"  triage API    {base_url}/api/events/dead-letters/")
        say(f"  log in as     {ADMIN_USER} / {password}   (view-only: {VIEWER_USER} / same)")
        say(f"  logs          {logs}")
        if args.host in WILDCARD_BINDS:
            local = {*allowed_hosts("127.0.0.1"), "0.0.0.0"}
            others = [h for h in allowed_hosts(args.host) if h not in local]
            say(f"  also as       {', '.join(f'http://{h}:{args.port}/' for h in others)}")
            say("  (reachable from your network, over plain HTTP: keep it on a trusted one)")
        say("")
        if seed(seeder, args.orders) is not None:
            say(f"seeding failed: {seeder.errors[0]}; see {logs / 'web.log'}")
            code = EXIT_SEED_FAILED
            stop.set()
        trickle = None
        if args.trickle:
            trickle = threading.Thread(
                target=seeder.trickle,
                args=(args.orders, args.trickle, trickle_stop),
                name="trickle",
                daemon=True,
            )
            trickle.start()
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        say(
            "running until Ctrl-C"
            if deadline is None
            else f"running for {args.seconds:g} s, then stopping everything"
        )
        next_status = time.monotonic() + 10
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None:
                if now >= deadline:
                    break
                if deadline - now <= 15:
                    trickle_stop.set()  # let what is in flight drain before the end
            dead = [c for c in children if not c.alive()]
            if dead:
                for child in dead:
                    exit_code = child.process.poll() if child.process else None
                    say(f"{child.name} died (exit {exit_code}):")
                    say(child.tail())
                code = EXIT_CHILD_DIED
                break
            if now >= next_status:
                say(status_line(summary()))
                next_status = now + 10
            stop.wait(0.5)
        trickle_stop.set()
        if trickle is not None:
            trickle.join(timeout=35)
    finally:
        trickle_stop.set()
        say("stopping " + ", ".join(c.name for c in children))
        stopping = time.monotonic()
        clean = stop_children(children)
        say(
            f"stopped in {time.monotonic() - stopping:.1f} s: "
            + ", ".join(
                f"{c.name} exit {c.exit_code}"
                + (" (killed)" if c.killed else "")
                + (" (left processes behind: killed)" if c.stragglers else "")
                for c in children
            )
        )
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not clean and code == 0:
        code = EXIT_KILLED
    if seeder.errors and code == 0:
        say(f"{len(seeder.errors)} orders could not be placed: {seeder.errors[0]}")
        code = EXIT_SEED_FAILED
    data = summary()
    data.update(
        {
            "startup_seconds": round(up, 2),
            "run_seconds": round(time.monotonic() - began, 2),
            "orders_placed_by_demo": seeder.placed,
            "seed_errors": seeder.errors[:10],
            "relay": relay.name,
            "exit_codes": {c.name: c.exit_code for c in children},
            "killed": [c.name for c in children if c.killed or c.stragglers],
            "pids": {c.name: c.pid for c in children},
        }
    )
    (var_dir / "summary.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    say("summary: " + status_line(data))
    say(f"dead letters by reason: {data['dead_letters_by_reason']}")
    say(f"processed per consumer: {data['processed']}")
    say(f"written to {var_dir / 'summary.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
