# PostgreSQL 16 with the wal2json logical decoding plugin (for [sources.postgres_cdc]).
# The official image's apt sources include apt.postgresql.org, which ships the plugin.
FROM postgres:16
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-16-wal2json \
 && rm -rf /var/lib/apt/lists/*
