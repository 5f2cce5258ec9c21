"""The Kafka bus picks, for every key, the partition Kafka's default partitioner picks.

Other producers (Java's, aiokafka's `send`) must put a key on the same partition as
we do, or a key's messages could be split across partitions and lose their order. The
bus hashes with the `murmurhash2` extension; aiokafka's pure-Python `murmur2` (a port
of Java's `Utils.murmur2`) is the reference here and only here.
"""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import example, given, settings
from hypothesis import strategies as st
from murmurhash2 import murmurhash2

from shared.bus.kafka import KAFKA_MURMUR2_SEED, partition_index


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


# From Kafka's own UtilsTest.testMurmur2 (Java ints, so signed).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_MURMUR2.items())
def test_hash_is_javas_murmur2(key: bytes, expected: int) -> None:
    assert _signed(murmurhash2(key, KAFKA_MURMUR2_SEED)) == expected
    assert _signed(murmur2(key)) == expected


@settings(max_examples=2000, deadline=None)
@given(key=st.binary(max_size=300))
@example(key=b"")
@example(key=b"\x00")
@example(key=b"\xff\xff\xff")
@example(key=b"\x80\x81\x82\x83\x84")
def test_hash_matches_aiokafka_for_any_bytes(key: bytes) -> None:
    assert murmurhash2(key, KAFKA_MURMUR2_SEED) == murmur2(key)


@settings(max_examples=2000, deadline=None)
@given(key=st.text(max_size=80), partitions=st.integers(min_value=1, max_value=256))
@example(key="", partitions=4)
@example(key="é", partitions=4)
@example(key="用户-42", partitions=12)
@example(key="👩‍👩‍👧", partitions=7)
@example(key="user-00000000-0000-0000-0000-000000000000", partitions=4)
def test_partition_matches_kafkas_default_partitioner(key: str, partitions: int) -> None:
    # Keys are text, encoded as the bus encodes them; partition ids as the cluster lists them.
    data = key.encode("utf-8")
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(data, all_partitions, all_partitions)
    assert all_partitions[partition_index(data, partitions)] == expected
