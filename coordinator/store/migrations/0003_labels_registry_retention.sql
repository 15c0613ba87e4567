-- Schema 3: what operators need. Sagas carry labels, an audit trail and the step they wait on;
-- steps carry what an operator did to them; definitions are registered by name and version;
-- sagas are counted per (definition, version, state) as they move; ended sagas can be pruned.
--
-- Columns are added, never rebuilt: on a large store this migration's SQL takes no time. The
-- migration's data step (coordinator/store/sqlite_upgrade.py) then fills what SQL cannot
-- derive: the step each unended saga waits on, and the audit trail of cancelled sagas.


-- Packed labels (the saga_labels rows below are their index); NULL when the saga has none.
ALTER TABLE sagas ADD COLUMN labels BLOB;
-- Packed audit trail, oldest first; NULL until an operator acts on the saga.
ALTER TABLE sagas ADD COLUMN audit BLOB;
ALTER TABLE sagas ADD COLUMN deadline_exceeded INTEGER NOT NULL DEFAULT 0
    CHECK (deadline_exceeded IN (0, 1));
-- The step an unended saga waits on (its pending call's, or the one it is parked on) and that
-- step's participant; NULL once the saga ended. Written by every commit.
ALTER TABLE sagas ADD COLUMN waiting_step TEXT;
ALTER TABLE sagas ADD COLUMN waiting_participant TEXT;

ALTER TABLE saga_steps ADD COLUMN by_operator INTEGER NOT NULL DEFAULT 0
    CHECK (by_operator IN (0, 1));
ALTER TABLE saga_steps ADD COLUMN budget_start INTEGER NOT NULL DEFAULT 0
    CHECK (budget_start >= 0);
-- Packed retry policy an operator gave the step's compensation; NULL for the definition's.
ALTER TABLE saga_steps ADD COLUMN retry_override BLOB;

-- Listing by definition and version keeps creation order; a listing by name alone merges the
-- versions' ranges, so no index by name alone is needed.
DROP INDEX sagas_by_definition;
CREATE INDEX sagas_by_definition ON sagas (definition_name, definition_version, created_at, saga_id);
-- Only unended sagas wait on a step: these indexes stay as small as the work in flight.
CREATE INDEX sagas_waiting_on_participant ON sagas (waiting_participant, created_at, saga_id)
    WHERE waiting_participant IS NOT NULL;
CREATE INDEX sagas_waiting_on_step ON sagas (waiting_step, created_at, saga_id)
    WHERE waiting_step IS NOT NULL;
-- Parked sagas by definition and step, counted from the index alone (state is there for the
-- partial index's own condition: SQLite checks it without reading the row).
CREATE INDEX sagas_parked ON sagas (definition_name, waiting_step, state)
    WHERE state = 'NEEDS_ATTENTION';
-- What retention may prune, oldest ending first. Terminal sagas never change again, so their
-- version (the length of their log) can be counted from here when sizing a prune.
CREATE INDEX sagas_by_ending ON sagas (ended_at, saga_id, version, state)
    WHERE state IN ('SUCCEEDED', 'COMPENSATED');

-- A saga's labels, written with it at creation. created_at is the saga's (it never changes):
-- a lookup by label reads its sagas in listing order straight from the index.
CREATE TABLE saga_labels (
    saga_id    TEXT    NOT NULL REFERENCES sagas (saga_id),
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (saga_id, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX saga_labels_by_value ON saga_labels (key, value, created_at, saga_id);

-- The registry: one stored definition per (name, version), and when it was registered.
CREATE TABLE definition_versions (
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    definition_id INTEGER NOT NULL REFERENCES definitions (definition_id),
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT, WITHOUT ROWID;

-- Every version some saga ran, registered as first seen; where one name and version was run
-- with several contents, the content of its newest saga is registered (the others stay stored
-- for the sagas that refer to them).
INSERT INTO definition_versions (name, version, definition_id, registered_at)
SELECT name, version, definition_id, first_used
FROM (
    SELECT definitions.name AS name, definitions.version AS version,
           definitions.definition_id AS definition_id, min(sagas.created_at) AS first_used,
           row_number() OVER (
               PARTITION BY definitions.name, definitions.version
               ORDER BY max(sagas.created_at) DESC, definitions.definition_id DESC
           ) AS newest
    FROM definitions JOIN sagas ON sagas.definition_id = definitions.definition_id
    GROUP BY definitions.definition_id
)
WHERE newest = 1;

-- How many sagas each (definition, version, state) holds, kept by the triggers below in the
-- same statement as the change: counting by state costs one small read on any store size.
CREATE TABLE saga_counts (
    definition_name    TEXT    NOT NULL,
    definition_version INTEGER NOT NULL,
    state              TEXT    NOT NULL,
    total              INTEGER NOT NULL CHECK (total >= 0),
    PRIMARY KEY (definition_name, definition_version, state)
) STRICT, WITHOUT ROWID;

INSERT INTO saga_counts (definition_name, definition_version, state, total)
SELECT definition_name, definition_version, state, count(*)
FROM sagas
GROUP BY definition_name, definition_version, state;

CREATE TRIGGER saga_counts_on_insert AFTER INSERT ON sagas
BEGIN
    INSERT INTO saga_counts (definition_name, definition_version, state, total)
    VALUES (new.definition_name, new.definition_version, new.state, 1)
    ON CONFLICT DO UPDATE SET total = total + 1;
END;

CREATE TRIGGER saga_counts_on_update AFTER UPDATE OF state, definition_name, definition_version
ON sagas
WHEN old.state IS NOT new.state
    OR old.definition_name IS NOT new.definition_name
    OR old.definition_version IS NOT new.definition_version
BEGIN
    UPDATE saga_counts SET total = total - 1
    WHERE definition_name = old.definition_name AND definition_version = old.definition_version
      AND state = old.state;
    INSERT INTO saga_counts (definition_name, definition_version, state, total)
    VALUES (new.definition_name, new.definition_version, new.state, 1)
    ON CONFLICT DO UPDATE SET total = total + 1;
END;

CREATE TRIGGER saga_counts_on_delete AFTER DELETE ON sagas
BEGIN
    UPDATE saga_counts SET total = total - 1
    WHERE definition_name = old.definition_name AND definition_version = old.definition_version
      AND state = old.state;
END;

-- Retention: the log stays append-only for every saga that has not ended SUCCEEDED or
-- COMPENSATED (updates are refused always); a terminal saga's log can be deleted with it.
DROP TRIGGER saga_events_no_delete;

CREATE TRIGGER saga_events_delete_when_ended BEFORE DELETE ON saga_events
WHEN coalesce((SELECT state FROM sagas WHERE saga_id = old.saga_id), '')
     NOT IN ('SUCCEEDED', 'COMPENSATED')
BEGIN
    SELECT RAISE(ABORT, 'saga_events is append-only: only the events of a saga that ended SUCCEEDED or COMPENSATED can be deleted');
END;

CREATE TRIGGER sagas_delete_when_ended BEFORE DELETE ON sagas
WHEN old.state NOT IN ('SUCCEEDED', 'COMPENSATED')
BEGIN
    SELECT RAISE(ABORT, 'only a saga that ended SUCCEEDED or COMPENSATED can be deleted');
END;
