#!/bin/sh
# Runs once, on an empty data directory (the postgres image's entrypoint runs /docker-entrypoint-initdb.d):
# a role per llmp component, with the passwords this container gets from its Secret / environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     --set=prefix=llmp_ \
     --set=gateway_password="$GATEWAY_DB_PASSWORD" \
     --set=dataset_password="$DATASET_DB_PASSWORD" \
     --set=training_password="$TRAINING_DB_PASSWORD" \
     --set=registry_password="$REGISTRY_DB_PASSWORD" \
     --set=inference_password="$INFERENCE_DB_PASSWORD" \
     --file=/docker-entrypoint-initdb.d/llmp-roles.psql
