#!/bin/sh
# Run once by the postgres service of deploy/compose.yaml, as the PostgreSQL superuser, when it
# starts on an empty volume (/docker-entrypoint-initdb.d); on a database host of its own, run it
# by hand once (docs/deploy.md). It does what only a superuser may:
#   - the NOLOGIN group roles of shared/roles.py, so that `openacct db roles`, run by the migrate
#     service as the owner's login, finds them and does the rest (the schema and its objects handed
#     to openacct_owner, CONNECT, the grants, the ledger's row policies);
#   - the database handed to openacct_owner, whose members may then grant on it and its schema;
#   - one login per process, each a member of the one group its process needs, with the passwords
#     of deploy/.env (\getenv: no password on a command line).
# It runs on an empty volume only: a password changed in .env later is changed by hand
# (docker compose exec postgres psql -U postgres -c "ALTER ROLE charger PASSWORD '...'").
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${MIGRATE_DB_PASSWORD:?}" "${CHARGER_DB_PASSWORD:?}" \
  "${REFUNDER_DB_PASSWORD:?}" "${REPORTER_DB_PASSWORD:?}" "${BEAT_DB_PASSWORD:?}" "${RELAY_DB_PASSWORD:?}" \
  "${ADMISSION_DB_PASSWORD:?}" "${ADMIN_DB_PASSWORD:?}" "${API_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" --no-psqlrc <<'SQL'
\getenv database POSTGRES_DB
\getenv migrate MIGRATE_DB_PASSWORD
\getenv charger CHARGER_DB_PASSWORD
\getenv refunder REFUNDER_DB_PASSWORD
\getenv reporter REPORTER_DB_PASSWORD
\getenv beat BEAT_DB_PASSWORD
\getenv relay RELAY_DB_PASSWORD
\getenv admission ADMISSION_DB_PASSWORD
\getenv admin ADMIN_DB_PASSWORD
\getenv api API_DB_PASSWORD

CREATE ROLE openacct_owner NOLOGIN;
CREATE ROLE openacct_reader NOLOGIN;
CREATE ROLE openacct_charger NOLOGIN;
CREATE ROLE openacct_admission NOLOGIN;
CREATE ROLE openacct_admin NOLOGIN;
CREATE ROLE openacct_api NOLOGIN;
ALTER DATABASE :"database" OWNER TO openacct_owner;

-- openacct db upgrade and db roles (the migrate service)
CREATE ROLE migrate LOGIN PASSWORD :'migrate' IN ROLE openacct_owner;
-- the workers, and beat (it sends the reporter's scheduled tasks)
CREATE ROLE charger LOGIN PASSWORD :'charger' IN ROLE openacct_charger;
CREATE ROLE refunder LOGIN PASSWORD :'refunder' IN ROLE openacct_charger;
CREATE ROLE reporter LOGIN PASSWORD :'reporter' IN ROLE openacct_charger;
CREATE ROLE beat LOGIN PASSWORD :'beat' IN ROLE openacct_charger;
-- the scheduler host's processes (deploy/systemd/, deploy/env/relay.env and admission.env)
CREATE ROLE relay LOGIN PASSWORD :'relay' IN ROLE openacct_reader;
CREATE ROLE admission LOGIN PASSWORD :'admission' IN ROLE openacct_admission;
-- administrators' CLI (the cli service, or deploy/env/admin.env)
CREATE ROLE admin LOGIN PASSWORD :'admin' IN ROLE openacct_admin;
-- the API and portal (deploy/systemd/openacct-api.service, deploy/env/api.env)
CREATE ROLE api LOGIN PASSWORD :'api' IN ROLE openacct_api;
SQL
