# The server's Prometheus metrics, one registry per running server (so that
# several servers in one process, as in the tests, never mix their numbers).

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.connections = Gauge("sectionchat_connections", "Open WebSocket connections", registry=registry)
        self.subscriptions = Gauge(
            "sectionchat_subscriptions", "Section subscriptions of open connections", registry=registry
        )
        self.sessions_created = Counter(
            "sectionchat_sessions_created", "Sessions created and stored", registry=registry
        )
        self.messages_stored = Counter("sectionchat_messages_stored", "Messages stored", registry=registry)
        self.events_delivered = Counter(
            "sectionchat_events_delivered", "Event frames queued to subscribers (one per subscriber)", registry=registry
        )
        self.errors = Counter("sectionchat_errors", "Error frames sent, by code", ["code"], registry=registry)
        self.request_seconds = Histogram(
            "sectionchat_request_seconds",
            "Time to handle a request, by type",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.storage_write_seconds = Histogram(
            "sectionchat_storage_write_seconds",
            "Time for one durable storage write",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fsync_batch_size = Histogram(
            "sectionchat_fsync_batch_size",
            "Appends made durable by one fsync (group commit)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.storage_failures = Counter(
            "sectionchat_storage_failures",
            "Times storage stopped acknowledging writes until it had recovered",
            registry=registry,
        )
        self.slow_consumers = Counter(
            "sectionchat_slow_consumer_disconnects",
            "Connections closed with 4008 for not keeping up",
            registry=registry,
        )
        self.rate_limit_closes = Counter(
            "sectionchat_rate_limit_disconnects",
            "Connections closed with 1008 for sustained rate abuse",
            registry=registry,
        )
        self.webhook_backlog = Gauge(
            "sectionchat_webhook_backlog",
            "Events of the section being delivered still waiting for the webhook, by URL",
            ["url"],
            registry=registry,
        )
        self.webhook_failures = Counter(
            "sectionchat_webhook_failures",
            "Webhook attempts that failed (to be retried), by URL",
            ["url"],
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
