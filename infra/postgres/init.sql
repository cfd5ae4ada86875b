-- Runs once, on an empty data volume, as POSTGRES_USER: MLflow uses POSTGRES_DB (mlflow),
-- the Prefect server gets its own database.
CREATE DATABASE prefect;
