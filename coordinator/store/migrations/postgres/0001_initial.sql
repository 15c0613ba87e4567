-- Schema 1 of the PostgreSQL store: the same tables and columns as the SQLite store's schema 4,
-- with the same encoding (coordinator/store/rows.py and packing.py): times are whole
-- microseconds since the Unix epoch (UTC) in bigint columns, bodies are MessagePack in bytea.
--
-- Names and ids are compared and ordered byte by byte (COLLATE "C"), as SQLite and Python do,
-- whatever the database's locale: listings page in the same order on every store.

-- Each distinct definition content once; sagas refer to the one they started with.
CREATE TABLE definitions (
    definition_id bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text    COLLATE "C" NOT NULL,
    version       integer NOT NULL,
    digest        bytea   NOT NULL UNIQUE,
    body          bytea   NOT NULL
);

-- The registry: one stored definition per (name, version), and when it was registered.
CREATE TABLE definition_versions (
    name          text    COLLATE "C" NOT NULL,
    version       integer NOT NULL,
    definition_id bigint  NOT NULL REFERENCES definitions (definition_id),
    registered_at bigint  NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE sagas (
    saga_id             text     COLLATE "C" NOT NULL PRIMARY KEY,
    definition_id       bigint   NOT NULL REFERENCES definitions (definition_id),
    definition_name     text     COLLATE "C" NOT NULL,
    definition_version  integer  NOT NULL,
    state               text     COLLATE "C" NOT NULL CHECK (
        state IN ('RUNNING', 'COMPENSATING', 'SUCCEEDED', 'COMPENSATED', 'NEEDS_ATTENTION')
    ),
    created_at          bigint   NOT NULL,
    updated_at          bigint   NOT NULL,
    ended_at            bigint,
    version             integer  NOT NULL CHECK (version >= 1),
    -- What the creating request looked like: a retried create is recognised by it.
    fingerprint         text     NOT NULL,
    input               bytea    NOT NULL,
    failure             bytea,
    cancel_reason       text,
    trace_context       bytea    NOT NULL,
    -- Packed labels (the saga_labels rows below are their index); NULL when the saga has none.
    labels              bytea,
    -- Packed audit trail, oldest first; NULL until an operator acts on the saga.
    audit               bytea,
    deadline_exceeded   smallint NOT NULL DEFAULT 0 CHECK (deadline_exceeded IN (0, 1)),
    -- The step an unended saga waits on (its pending call's, or the one it is parked on) and
    -- that step's participant; NULL once the saga ended. Written by every commit.
    waiting_step        text     COLLATE "C",
    waiting_participant text     COLLATE "C"
);

-- Listing pages through (created_at, saga_id); the filtered listings keep that order.
CREATE INDEX sagas_by_creation ON sagas (created_at, saga_id);
CREATE INDEX sagas_by_state ON sagas (state, created_at, saga_id);
CREATE INDEX sagas_by_definition
    ON sagas (definition_name, definition_version, created_at, saga_id);
-- Only unended sagas wait on a step: these indexes stay as small as the work in flight.
CREATE INDEX sagas_waiting_on_participant ON sagas (waiting_participant, created_at, saga_id)
    WHERE waiting_participant IS NOT NULL;
CREATE INDEX sagas_waiting_on_step ON sagas (waiting_step, created_at, saga_id)
    WHERE waiting_step IS NOT NULL;
-- Parked sagas by definition and step.
CREATE INDEX sagas_parked ON sagas (definition_name, waiting_step)
    WHERE state = 'NEEDS_ATTENTION';
-- What retention may prune, oldest ending first. Terminal sagas never change again, so their
-- version (the length of their log) can be counted from here when sizing a prune.
CREATE INDEX sagas_by_ending ON sagas (ended_at, saga_id) INCLUDE (version)
    WHERE state IN ('SUCCEEDED', 'COMPENSATED');

-- One row per step of a saga; its name is the definition's.
CREATE TABLE saga_steps (
    saga_id             text     COLLATE "C" NOT NULL REFERENCES sagas (saga_id),
    step                integer  NOT NULL CHECK (step >= 0),
    state               text     NOT NULL CHECK (
        state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'REJECTED', 'FAILED', 'COMPENSATING',
                  'COMPENSATED', 'SKIPPED')
    ),
    execute_attempts    integer  NOT NULL CHECK (execute_attempts >= 0),
    compensate_attempts integer  NOT NULL CHECK (compensate_attempts >= 0),
    output              bytea,
    failure             bytea,
    next_attempt_at     bigint,
    started_at          bigint,
    ended_at            bigint,
    by_operator         smallint NOT NULL DEFAULT 0 CHECK (by_operator IN (0, 1)),
    budget_start        integer  NOT NULL DEFAULT 0 CHECK (budget_start >= 0),
    -- Packed retry policy an operator gave the step's compensation; NULL for the definition's.
    retry_override      bytea,
    PRIMARY KEY (saga_id, step)
);

-- A saga's labels, written with it at creation. created_at is the saga's (it never changes):
-- a lookup by label reads its sagas in listing order straight from the index.
CREATE TABLE saga_labels (
    saga_id    text   COLLATE "C" NOT NULL REFERENCES sagas (saga_id),
    key        text   COLLATE "C" NOT NULL,
    value      text   COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (saga_id, key)
);

CREATE INDEX saga_labels_by_value ON saga_labels (key, value, created_at, saga_id);

-- The append-only log. Every event has a position in one change feed of all sagas, taken from
-- feed_head by the write that stores it (see coordinator/store/postgres_sql.py): increasing in
-- commit order and never reused. It also records the saga's state after it.
CREATE TABLE saga_events (
    saga_id     text    COLLATE "C" NOT NULL REFERENCES sagas (saga_id),
    sequence    integer NOT NULL CHECK (sequence >= 1),
    recorded_at bigint  NOT NULL,
    type        text    NOT NULL,
    body        bytea   NOT NULL,
    state       text    CHECK (
        state IN ('RUNNING', 'COMPENSATING', 'SUCCEEDED', 'COMPENSATED', 'NEEDS_ATTENTION')
    ),
    position    bigint  NOT NULL UNIQUE CHECK (position >= 1),
    PRIMARY KEY (saga_id, sequence)
);

-- The newest position given. One row: a write takes the next position by updating it, and its
-- row lock, held until the write commits, puts writes in commit order.
CREATE TABLE feed_head (
    id       smallint PRIMARY KEY CHECK (id = 1),
    position bigint   NOT NULL CHECK (position >= 0)
);
INSERT INTO feed_head (id, position) VALUES (1, 0);

-- The highest position pruned: a consumer after a position below it may have missed changes.
-- A row of its own, so that pruning never waits for the writers' feed_head, nor they for it.
CREATE TABLE feed_horizon (
    id             smallint PRIMARY KEY CHECK (id = 1),
    pruned_through bigint   NOT NULL CHECK (pruned_through >= 0)
);
INSERT INTO feed_horizon (id, pruned_through) VALUES (1, 0);

-- How many sagas each (definition, version, state) holds, kept by every write in its own
-- transaction: counting by state costs one small read on any store size. A write adds its
-- changes with one upsert (an insert that adds to the row it meets), so total has no CHECK:
-- PostgreSQL would check the row the upsert proposes, which for a saga leaving a state is -1.
CREATE TABLE saga_counts (
    definition_name    text    COLLATE "C" NOT NULL,
    definition_version integer NOT NULL,
    state              text    COLLATE "C" NOT NULL,
    total              bigint  NOT NULL,
    PRIMARY KEY (definition_name, definition_version, state)
);

-- The log is append-only, whoever writes to the database: updates are refused always, and a
-- saga's events can be deleted only with a saga that ended SUCCEEDED or COMPENSATED.
CREATE FUNCTION saga_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'saga_events is append-only: events cannot be updated';
    END IF;
    IF coalesce((SELECT state FROM sagas WHERE saga_id = OLD.saga_id), '')
       NOT IN ('SUCCEEDED', 'COMPENSATED') THEN
        RAISE EXCEPTION 'saga_events is append-only: only the events of a saga that ended SUCCEEDED or COMPENSATED can be deleted';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER saga_events_append_only BEFORE UPDATE OR DELETE ON saga_events
    FOR EACH ROW EXECUTE FUNCTION saga_events_append_only();

CREATE FUNCTION sagas_delete_when_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state NOT IN ('SUCCEEDED', 'COMPENSATED') THEN
        RAISE EXCEPTION 'only a saga that ended SUCCEEDED or COMPENSATED can be deleted';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER sagas_delete_when_ended BEFORE DELETE ON sagas
    FOR EACH ROW EXECUTE FUNCTION sagas_delete_when_ended();
