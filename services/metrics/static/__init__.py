"""The dashboard page: HTML, JS and CSS served by the metrics service (package data)."""
