#!/usr/bin/env bash
# Create the Secrets that infra/mlflow/k8s/*.yaml and the Ray pods (infra/k8s/*.yaml) reference.
# Nothing secret is committed: passwords are generated here (or taken from your environment) and
# go straight into the cluster. Copy this file, do not commit your copy if you type values in it.
#
#   NS=ssd bash infra/mlflow/k8s/secrets.example.sh
#
# Secrets (all in namespace $NS):
#   mlflow-postgres      the MLflow backend store (keys POSTGRES_USER, POSTGRES_PASSWORD and
#                        POSTGRES_DB; postgres.yaml creates the database with them, mlflow.yaml
#                        connects)
#   minio-root           MinIO's admin (keys MINIO_ROOT_USER and MINIO_ROOT_PASSWORD; minio.yaml)
#   ssd-s3-credentials   the S3 user of the MLflow server (artifacts) and of every Ray pod (shards,
#                        checkpoints), keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. With MinIO
#                        the job in minio.yaml creates this user; with AWS S3 instead, export your
#                        own keys before running this and skip minio.yaml.
#   ssd-ray              the Ray token of the RayCluster ssd-ray (infra/k8s/raycluster.yaml; key
#                        auth_token: KubeRay 1.5.1 reads the Secret named after the cluster).
#                        RayJobs' clusters get their own token from KubeRay.
# Passwords are hex: they go into a postgresql:// URL unescaped.
# Read one back: kubectl -n ssd get secret mlflow-postgres -o jsonpath='{.data.POSTGRES_PASSWORD}' | base64 -d
set -euo pipefail

NS="${NS:-ssd}"
POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-$(openssl rand -hex 24)}"
MINIO_ROOT_PASSWORD="${MINIO_ROOT_PASSWORD:-$(openssl rand -hex 24)}"
AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-ssd-ray}"
AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-$(openssl rand -hex 24)}"

create() {  # create NAME ...: an existing Secret is kept (PostgreSQL and MinIO keep the password
            # they were first started with; to change one, delete the Secret and its data volume)
    if kubectl -n "$NS" get secret "$1" >/dev/null 2>&1; then
        echo "secret $1: exists, kept"
    else
        kubectl -n "$NS" create secret generic "$@"
    fi
}

create mlflow-postgres \
    --from-literal=POSTGRES_USER=mlflow \
    --from-literal=POSTGRES_PASSWORD="$POSTGRES_PASSWORD" \
    --from-literal=POSTGRES_DB=mlflow

create minio-root \
    --from-literal=MINIO_ROOT_USER=minio-admin \
    --from-literal=MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD"

create ssd-s3-credentials \
    --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"

create ssd-ray --from-literal=auth_token="$(openssl rand -hex 32)"

echo "secrets mlflow-postgres, minio-root, ssd-s3-credentials and ssd-ray are in namespace $NS"
