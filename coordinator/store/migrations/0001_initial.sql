-- Sagas (one row each, the current state) and their append-only event logs.
-- Times are fixed-width ISO-8601 UTC text ("2025-03-01T12:00:00.000000Z"): text order is time
-- order. Bodies are JSON written by coordinator/store/codec.py.

CREATE TABLE sagas (
    saga_id            TEXT    NOT NULL PRIMARY KEY,
    definition_name    TEXT    NOT NULL,
    definition_version INTEGER NOT NULL,
    state              TEXT    NOT NULL CHECK (
        state IN ('RUNNING', 'COMPENSATING', 'SUCCEEDED', 'COMPENSATED', 'NEEDS_ATTENTION')
    ),
    created_at         TEXT    NOT NULL,
    updated_at         TEXT    NOT NULL,
    version            INTEGER NOT NULL CHECK (version >= 1),
    -- What the creating request looked like: a retried create is recognised by it.
    fingerprint        TEXT    NOT NULL,
    body               TEXT    NOT NULL
) STRICT;

-- Listing pages through (created_at, saga_id); the filtered listings keep that order.
CREATE INDEX sagas_by_creation ON sagas (created_at, saga_id);
CREATE INDEX sagas_by_state ON sagas (state, created_at, saga_id);
CREATE INDEX sagas_by_definition ON sagas (definition_name, created_at, saga_id);

CREATE TABLE saga_events (
    saga_id     TEXT    NOT NULL REFERENCES sagas (saga_id),
    sequence    INTEGER NOT NULL CHECK (sequence >= 1),
    recorded_at TEXT    NOT NULL,
    type        TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    PRIMARY KEY (saga_id, sequence)
) STRICT;

-- The log is append-only, whoever writes to the file: the database itself refuses changes.
CREATE TRIGGER saga_events_no_update BEFORE UPDATE ON saga_events
BEGIN
    SELECT RAISE(ABORT, 'saga_events is append-only: events cannot be updated');
END;

CREATE TRIGGER saga_events_no_delete BEFORE DELETE ON saga_events
BEGIN
    SELECT RAISE(ABORT, 'saga_events is append-only: events cannot be deleted');
END;
