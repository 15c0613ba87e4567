-- Schema 4: the change feed. Every event gets a position in one feed of all sagas: increasing
-- in commit order and never reused, even once old events are pruned (feed_horizon keeps the
-- highest position pruned, and new positions start above it). Each event also records the
-- saga's state after it, for the feed's state filter.

ALTER TABLE saga_events ADD COLUMN position INTEGER;
ALTER TABLE saga_events ADD COLUMN state TEXT CHECK (
    state IS NULL
    OR state IN ('RUNNING', 'COMPENSATING', 'SUCCEEDED', 'COMPENSATED', 'NEEDS_ATTENTION')
);

-- The events recorded before the feed existed take their insertion order as their position.
DROP TRIGGER saga_events_no_update;
UPDATE saga_events SET position = rowid;
CREATE TRIGGER saga_events_no_update BEFORE UPDATE ON saga_events
BEGIN
    SELECT RAISE(ABORT, 'saga_events is append-only: events cannot be updated');
END;

CREATE UNIQUE INDEX saga_events_by_position ON saga_events (position);

CREATE TABLE feed_horizon (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL CHECK (pruned_through >= 0)
) STRICT;
INSERT INTO feed_horizon (id, pruned_through) VALUES (1, 0);
