"""Integration tests against real servers (PostgreSQL, Kafka) and real SQLite files."""
