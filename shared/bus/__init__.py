from shared.bus.base import (
    Backoff,
    BatchHandler,
    Bus,
    BusObserver,
    Consumer,
    ConsumerStats,
    Headers,
    Message,
    OutMessage,
    PublishError,
)

__all__ = [
    "Backoff",
    "BatchHandler",
    "Bus",
    "BusObserver",
    "Consumer",
    "ConsumerStats",
    "Headers",
    "Message",
    "OutMessage",
    "PublishError",
]
