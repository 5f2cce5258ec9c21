"""Bus throughput: events/s produced and consumed through one KafkaBus (or the in-process bus).

    python -m benchmarks.bus [--messages 100000] [--batch 1000] [--max-batch 500] [--memory]
                             [--json PATH]

Needs AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (from `make up`) unless --memory. Prints figures;
asserts nothing. `--json PATH` also writes them as one flat JSON object: messages,
produced_per_s, consumed_per_s, produce_cpu_ms_per_1000, consume_cpu_ms_per_1000 (CPU time of
this process per 1,000 messages), peak_rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
import uuid
from collections.abc import Sequence

from shared.bus import Bus, Message, OutMessage


async def delete_topics(bootstrap: str, prefix: str) -> int:
    """Delete the topics whose name starts with `prefix`: a broker kept by `make up` would
    otherwise gather the partitions of every run."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if ours:
            await admin.delete_topics(ours, timeout_ms=30_000)
        return len(ours)
    finally:
        await admin.close()


async def run(bus: Bus, topic: str, messages: int, batch: int, max_batch: int) -> dict[str, float]:
    await bus.start()
    try:
        await bus.ensure_topics([topic])
        payload = b"x" * 480
        started, cpu = time.perf_counter(), time.process_time()
        for first in range(0, messages, batch):
            await bus.publish(
                [
                    OutMessage(topic, f"user-{i % 1000}", payload + f"{i:020d}".encode())
                    for i in range(first, min(first + batch, messages))
                ]
            )
        produce_s = time.perf_counter() - started
        produce_cpu = time.process_time() - cpu

        seen = 0
        done = asyncio.Event()

        async def count(received: Sequence[Message]) -> None:
            nonlocal seen
            seen += len(received)
            if seen >= messages:
                done.set()

        consumer = bus.consumer(f"bench-{topic}", [topic], count, max_batch=max_batch)
        started, cpu = time.perf_counter(), time.process_time()
        await consumer.start()
        await asyncio.wait_for(done.wait(), timeout=600)
        consume_s = time.perf_counter() - started
        consume_cpu = time.process_time() - cpu
        await consumer.stop()
    finally:
        await bus.stop()
    return {
        "produced_per_s": messages / produce_s,
        "consumed_per_s": messages / consume_s,
        # CPU of this process (the broker is another): steadier than rates on a shared machine.
        "produce_cpu_ms_per_1000": produce_cpu * 1e6 / messages,
        "consume_cpu_ms_per_1000": consume_cpu * 1e6 / messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="messages per publish call")
    parser.add_argument("--max-batch", type=int, default=500, help="messages per handler call")
    parser.add_argument("--memory", action="store_true", help="the in-process bus instead")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    bus: Bus
    bootstrap: str | None = None
    if args.memory:
        from shared.bus.memory import InProcessBus

        bus, kind = InProcessBus(), "in-process"
    else:
        from shared.bus.kafka import KafkaBus

        bootstrap = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            raise SystemExit("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS is not set (run `make up`)")
        bus, kind = KafkaBus(bootstrap, client_id="bench-bus"), f"Kafka at {bootstrap}"
    topic = f"bench-bus-{uuid.uuid4().hex[:8]}"
    try:
        figures = asyncio.run(run(bus, topic, args.messages, args.batch, args.max_batch))
    finally:
        if bootstrap:
            asyncio.run(delete_topics(bootstrap, topic))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bus: {kind}, {args.messages:,} messages of 500 bytes, 1,000 keys, one process")
    produced, consumed = figures["produced_per_s"], figures["consumed_per_s"]
    produce_cpu, consume_cpu = (
        figures["produce_cpu_ms_per_1000"],
        figures["consume_cpu_ms_per_1000"],
    )
    print(
        f"  produced  {produced:>10,.0f} events/s (publish batches of {args.batch}), "
        f"CPU {produce_cpu:.1f} ms per 1,000"
    )
    print(
        f"  consumed  {consumed:>10,.0f} events/s (handler batches of {args.max_batch}), "
        f"CPU {consume_cpu:.1f} ms per 1,000"
    )
    print(f"  peak RSS  {peak_mb:>10,.0f} MB")
    if args.json:
        report = {"messages": args.messages, **figures, "peak_rss_mb": round(peak_mb, 1)}
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
