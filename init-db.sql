-- Sample source database: the tables the old Flink CDC job captured, a CDC user and a publication.
-- Loaded by docker-compose (docker-entrypoint-initdb.d) and by ./scripts/demo.sh.

CREATE TABLE IF NOT EXISTS public.users (
    id          bigserial PRIMARY KEY,
    email       text        NOT NULL UNIQUE,
    full_name   text,
    status      text        NOT NULL DEFAULT 'active',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.orders (
    id          bigserial PRIMARY KEY,
    user_id     bigint        NOT NULL REFERENCES public.users (id),
    amount      numeric(12,2) NOT NULL,
    currency    char(3)       NOT NULL DEFAULT 'EUR',
    items       jsonb         NOT NULL DEFAULT '[]',
    tags        text[],
    placed_at   timestamptz   NOT NULL DEFAULT now()
);

-- The capture's user: REPLICATION for the replication connection, SELECT for the snapshot and
-- the start-up checks, and ownership-free access to the publication.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_user') THEN
        CREATE ROLE cdc_user WITH LOGIN REPLICATION PASSWORD 'cdc_password';
    END IF;
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO cdc_user', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO cdc_user;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO cdc_user;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO cdc_user;
-- Heartbeats are logical messages (pg_logical_emit_message), which needs EXECUTE only.
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO cdc_user;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'cdc_publication') THEN
        CREATE PUBLICATION cdc_publication FOR TABLE public.users, public.orders;
    END IF;
END
$$;

INSERT INTO public.users (email, full_name) VALUES
    ('ada@example.com', 'Ada Lovelace'),
    ('grace@example.com', 'Grace Hopper')
ON CONFLICT (email) DO NOTHING;
