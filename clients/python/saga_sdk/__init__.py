"""Python SDK for the saga coordinator: clients, and participants with an idempotency barrier."""
