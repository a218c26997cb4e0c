#!/usr/bin/env bash
# Build the Bento, containerize it and deploy it to Google Cloud Run.
# Not run against Google Cloud in this project's CI (no Docker engine, no cloud access
# there); tests/test_deploy_scripts.py runs it with stand-ins for gcloud, bentoml and docker
# and checks what it would deploy.
#
#   PROJECT_ID=my-project ADMIN_KEY_SECRET=inspection-admin:1 deploy/cloudrun.sh
#
# Keys and the records database URL only ever travel as Secret Manager secrets
# (SECRET or SECRET:VERSION; pin a version in production). A deploy without any key is
# refused: the service would answer nothing but, with INSPECT_ANONYMOUS_SCORING, scoring.
#   ADMIN_KEY_SECRET    secret holding INSPECT_ADMIN_KEY (the admin role)
#   API_KEYS_SECRET     secret holding INSPECT_API_KEYS (name=role:key,...)
#   API_KEY_SECRET      secret holding INSPECT_API_KEY (a line key)
#   RECORDS_DB_SECRET   secret holding INSPECT_RECORDS_DB (e.g. a Cloud SQL URL)
# The service account that runs the service needs roles/secretmanager.secretAccessor on
# each of them.
#
# Other settings (all optional but PROJECT_ID):
#   REGION            Cloud Run region                       (europe-west1)
#   REPOSITORY        Artifact Registry Docker repository     (inspection)
#   SERVICE           Cloud Run service name                  (dino-inspection)
#   CPU, MEMORY       per instance                            (4, 8Gi)
#   CONCURRENCY       requests per instance before scaling    (16)
#   INSPECT_*         passed through to the service (see detector/serving/settings.py),
#                     in an env-vars file, so values with commas stay whole;
#                     INSPECT_ALLOWED_HOSTS defaults to .run.app
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}"
REGION=${REGION:-europe-west1}
REPOSITORY=${REPOSITORY:-inspection}
SERVICE=${SERVICE:-dino-inspection}
CPU=${CPU:-4}
MEMORY=${MEMORY:-8Gi}
CONCURRENCY=${CONCURRENCY:-16}
SECRET_SETTINGS="INSPECT_ADMIN_KEY INSPECT_API_KEYS INSPECT_API_KEY INSPECT_RECORDS_DB"

for name in $SECRET_SETTINGS; do
  if [ -n "${!name:-}" ]; then
    echo "error: $name is set in the environment; keys and the database URL go to Cloud Run" \
      "only as Secret Manager secrets (see the *_SECRET settings at the top of $0)." >&2
    exit 2
  fi
done
secrets=()
add_secret() {  # add_secret SETTING SECRET[:VERSION]
  [ -n "$2" ] || return 0
  case "$2" in *:*) secrets+=("$1=$2") ;; *) secrets+=("$1=$2:latest") ;; esac
}
add_secret INSPECT_ADMIN_KEY "${ADMIN_KEY_SECRET:-}"
add_secret INSPECT_API_KEYS "${API_KEYS_SECRET:-}"
add_secret INSPECT_API_KEY "${API_KEY_SECRET:-}"
if [ ${#secrets[@]} -eq 0 ]; then
  echo "error: no key: set ADMIN_KEY_SECRET, API_KEYS_SECRET or API_KEY_SECRET to a Secret" \
    "Manager secret holding the key; a keyless service would refuse every record, review" \
    "and bank change." >&2
  exit 2
fi
add_secret INSPECT_RECORDS_DB "${RECORDS_DB_SECRET:-}"

cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=True
tag=$(bentoml build --output tag | tail -n 1 | sed 's/^__tag__://')
image="${REGION}-docker.pkg.dev/${PROJECT_ID}/${REPOSITORY}/${SERVICE}:${tag#*:}"

bentoml containerize "$tag" --image-tag "$image" --opt platform=linux/amd64
gcloud auth configure-docker "${REGION}-docker.pkg.dev" --quiet
docker push "$image"

# Plain settings in a YAML file (values are quoted: commas and colons stay whole).
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
{
  echo "INSPECT_THREADS: '${CPU}'"
  [ -n "${INSPECT_ALLOWED_HOSTS:-}" ] || echo "INSPECT_ALLOWED_HOSTS: '.run.app'"
  for name in $(env | grep -o '^INSPECT_[A-Z_]*' | sort -u || true); do
    case " $SECRET_SETTINGS INSPECT_THREADS " in *" $name "*) continue ;; esac
    value=${!name}
    echo "${name}: '${value//\'/\'\'}'"
  done
} > "$env_file"

secret_list=$(IFS=,; echo "${secrets[*]}")
gcloud run deploy "$SERVICE" \
  --project "$PROJECT_ID" --region "$REGION" --image "$image" \
  --port 3000 --cpu "$CPU" --memory "$MEMORY" --concurrency "$CONCURRENCY" \
  --timeout 300 --no-cpu-throttling --startup-probe "httpGet.path=/readyz,initialDelaySeconds=10,periodSeconds=5,failureThreshold=60" \
  --env-vars-file "$env_file" --set-secrets "$secret_list"
