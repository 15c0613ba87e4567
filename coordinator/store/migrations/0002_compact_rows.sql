-- Schema 2: a saga is written piecemeal. A commit updates the saga's few changing columns and
-- the steps that changed, and appends one small event; the definition is stored once and
-- referred to. Times are whole microseconds since the Unix epoch (UTC); bodies are MessagePack
-- written by coordinator/store/packing.py.
--
-- The rows of schema 1 (JSON bodies) are renamed here, converted into the new tables by the
-- migration's conversion step (coordinator/store/sqlite_upgrade.py), then dropped by it.


-- Schema 1's append-only guard goes with its table; schema 2's log gets its own below.
DROP TRIGGER saga_events_no_update;
DROP TRIGGER saga_events_no_delete;
ALTER TABLE saga_events RENAME TO saga_events_v1;
ALTER TABLE sagas RENAME TO sagas_v1;
DROP INDEX sagas_by_creation;
DROP INDEX sagas_by_state;
DROP INDEX sagas_by_definition;

-- Each distinct definition content once; sagas refer to the one they started with.
CREATE TABLE definitions (
    definition_id INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    digest        BLOB    NOT NULL UNIQUE,
    body          BLOB    NOT NULL
) STRICT;

CREATE TABLE sagas (
    saga_id            TEXT    NOT NULL PRIMARY KEY,
    definition_id      INTEGER NOT NULL REFERENCES definitions (definition_id),
    definition_name    TEXT    NOT NULL,
    definition_version INTEGER NOT NULL,
    state              TEXT    NOT NULL CHECK (
        state IN ('RUNNING', 'COMPENSATING', 'SUCCEEDED', 'COMPENSATED', 'NEEDS_ATTENTION')
    ),
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    ended_at           INTEGER,
    version            INTEGER NOT NULL CHECK (version >= 1),
    -- What the creating request looked like: a retried create is recognised by it.
    fingerprint        TEXT    NOT NULL,
    input              BLOB    NOT NULL,
    failure            BLOB,
    cancel_reason      TEXT,
    trace_context      BLOB    NOT NULL
) STRICT;

-- Listing pages through (created_at, saga_id); the filtered listings keep that order.
CREATE INDEX sagas_by_creation ON sagas (created_at, saga_id);
CREATE INDEX sagas_by_state ON sagas (state, created_at, saga_id);
CREATE INDEX sagas_by_definition ON sagas (definition_name, created_at, saga_id);

-- One row per step of a saga; its name is the definition's.
CREATE TABLE saga_steps (
    saga_id             TEXT    NOT NULL REFERENCES sagas (saga_id),
    step                INTEGER NOT NULL CHECK (step >= 0),
    state               TEXT    NOT NULL CHECK (
        state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'REJECTED', 'FAILED', 'COMPENSATING',
                  'COMPENSATED', 'SKIPPED')
    ),
    execute_attempts    INTEGER NOT NULL CHECK (execute_attempts >= 0),
    compensate_attempts INTEGER NOT NULL CHECK (compensate_attempts >= 0),
    output              BLOB,
    failure             BLOB,
    next_attempt_at     INTEGER,
    started_at          INTEGER,
    ended_at            INTEGER,
    PRIMARY KEY (saga_id, step)
) STRICT, WITHOUT ROWID;

CREATE TABLE saga_events (
    saga_id     TEXT    NOT NULL REFERENCES sagas (saga_id),
    sequence    INTEGER NOT NULL CHECK (sequence >= 1),
    recorded_at INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    body        BLOB    NOT NULL,
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
