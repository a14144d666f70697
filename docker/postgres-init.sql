-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d/):
-- a second database for MLflow's users and permissions (basic auth), beside the tracking store.
CREATE DATABASE mlflow_auth;
