-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as
-- POSTGRES_USER (mlflow), so mlflow owns it. The tracking store is POSTGRES_DB (mlflow); this second
-- database holds the basic-auth app's users and permissions (cluster/mlflow/basic_auth.ini).
CREATE DATABASE mlflow_auth;
