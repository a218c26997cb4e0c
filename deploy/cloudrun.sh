#!/usr/bin/env bash
# Build the Bento, containerize it and deploy it to Google Cloud Run.
# Not run in this project's CI (no Docker engine, no cloud access there): it is the
# documented path, with every setting it needs as an environment variable.
#
#   PROJECT_ID=my-project REGION=europe-west1 deploy/cloudrun.sh
#
# Settings (all optional but PROJECT_ID):
#   REGION            Cloud Run region                       (europe-west1)
#   REPOSITORY        Artifact Registry Docker repository     (inspection)
#   SERVICE           Cloud Run service name                  (dino-inspection)
#   CPU, MEMORY       per instance                            (4, 8Gi)
#   CONCURRENCY       requests per instance before scaling    (16)
#   API_KEY_SECRET    Secret Manager secret holding INSPECT_API_KEY (unset: no key required)
#   INSPECT_*         passed through to the service (see detector/serving/settings.py)
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}"
REGION=${REGION:-europe-west1}
REPOSITORY=${REPOSITORY:-inspection}
SERVICE=${SERVICE:-dino-inspection}
CPU=${CPU:-4}
MEMORY=${MEMORY:-8Gi}
CONCURRENCY=${CONCURRENCY:-16}

cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=True
tag=$(bentoml build --output tag | tail -n 1 | sed 's/^__tag__://')
image="${REGION}-docker.pkg.dev/${PROJECT_ID}/${REPOSITORY}/${SERVICE}:${tag#*:}"

bentoml containerize "$tag" --image-tag "$image" --opt platform=linux/amd64
gcloud auth configure-docker "${REGION}-docker.pkg.dev" --quiet
docker push "$image"

env_vars="INSPECT_THREADS=${CPU}"
for name in $(env | grep -o '^INSPECT_[A-Z_]*' || true); do
  [ "$name" = INSPECT_API_KEY ] && continue
  env_vars="${env_vars},${name}=${!name}"
done
secret_args=()
[ -n "${API_KEY_SECRET:-}" ] && secret_args=(--set-secrets "INSPECT_API_KEY=${API_KEY_SECRET}:latest")

gcloud run deploy "$SERVICE" \
  --project "$PROJECT_ID" --region "$REGION" --image "$image" \
  --port 3000 --cpu "$CPU" --memory "$MEMORY" --concurrency "$CONCURRENCY" \
  --timeout 300 --no-cpu-throttling --startup-probe "httpGet.path=/readyz,initialDelaySeconds=10,periodSeconds=5,failureThreshold=60" \
  --set-env-vars "$env_vars" "${secret_args[@]}"
