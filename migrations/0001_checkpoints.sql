-- The PostgreSQL checkpoint store (src/checkpoint/postgres.rs). A row is one
-- snapshot of a replica's state at `position` of the update log `log`; it is
-- written in one INSERT, so a reader sees all of it or nothing. Equal
-- positions hold equal contents, so whichever replica writes first wins.
CREATE TABLE checkpoints (
    model            TEXT             NOT NULL, -- model.name
    log              TEXT             NOT NULL, -- the updates topic the position is in
    position         BIGINT           NOT NULL,
    written_at       TIMESTAMPTZ      NOT NULL DEFAULT now(),
    bytes            BIGINT           NOT NULL,
    examples_learned BIGINT           NOT NULL,
    progressive_loss DOUBLE PRECISION,          -- NULL before the first example
    writer           TEXT             NOT NULL, -- replica_id
    content          BYTEA            NOT NULL, -- the encoded state, checksummed
    PRIMARY KEY (model, log, position)
);
