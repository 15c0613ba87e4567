-- Schema 2 of the PostgreSQL store: leases, as schema 5 of the SQLite store. One replica at a
-- time moves a saga forward: the one that holds it, at the saga's current epoch, while the
-- replica's own lease runs. Leases are judged by the database's clock (clock_timestamp(), in
-- microseconds since 1970), never a replica's. Taking a saga over moves its epoch on, so every
-- write of the replica that held it before is refused.

CREATE TABLE replicas (
    replica_id  text   COLLATE "C" NOT NULL PRIMARY KEY,
    lease_until bigint NOT NULL
);

ALTER TABLE sagas ADD COLUMN owner text COLLATE "C";
ALTER TABLE sagas ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- A saga is held only while it moves (its owner is cleared once it ends or parks): the index
-- stays as small as the sagas in flight.
CREATE INDEX sagas_by_owner ON sagas (owner) WHERE owner IS NOT NULL;
