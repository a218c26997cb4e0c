#!/usr/bin/env bash
# Build the Bento, containerize it and deploy it to Google Cloud Run.
# Not run against Google Cloud in this project's CI (no cloud access there);
# tests/test_deploy_scripts.py runs it with stand-ins for gcloud, bentoml and docker and
# checks what it would deploy.
#
#   PROJECT_ID=my-project REGION=europe-west1 SERVICE_ACCOUNT=inspection@my-project.iam.gserviceaccount.com \
#     ADMIN_KEY_SECRET=inspection-admin:1 deploy/cloudrun.sh
#
# Keys and the records database URL only ever travel as Secret Manager secrets, each with a
# pinned version (SECRET:VERSION): with `latest`, instances started after a rotation would
# hold another key than the ones before. A deploy without any key is refused.
#   ADMIN_KEY_SECRET    secret holding INSPECT_ADMIN_KEY (the admin role)
#   API_KEYS_SECRET     secret holding INSPECT_API_KEYS (name=role:key,...)
#   API_KEY_SECRET      secret holding INSPECT_API_KEY (a line key)
#   RECORDS_DB_SECRET   secret holding INSPECT_RECORDS_DB, e.g. Cloud SQL through its socket:
#                       postgresql+psycopg://USER:PASSWORD@/inspection?host=/cloudsql/PROJECT:REGION:INSTANCE
#                       Without it records are off: an instance's files are in memory, lost
#                       on scale-in and different on each instance.
# SERVICE_ACCOUNT runs the service (never the default compute account, which can edit the
# project); it needs roles/secretmanager.secretAccessor on each secret and, with Cloud SQL,
# roles/cloudsql.client.
#
# Other settings (all optional):
#   REGION            Cloud Run region                        (europe-west1)
#   AUTH              iam: callers need a Google identity token as well as a key
#                     (--no-allow-unauthenticated); public: the service's keys alone (the
#                     operators' page in a browser, line PCs without Google identities)  (iam)
#   CLOUDSQL_INSTANCE PROJECT:REGION:INSTANCE, mounted at /cloudsql for the URL above
#   REPOSITORY        Artifact Registry Docker repository      (inspection)
#   SERVICE           Cloud Run service name                   (dino-inspection)
#   CPU, MEMORY       per instance                             (4, 8Gi)
#   CONCURRENCY       requests per instance before scaling     (16)
#   MIN_INSTANCES, MAX_INSTANCES                               (1, 4)
#   INSPECT_*         passed through to the service (see detector/serving/settings.py),
#                     in an env-vars file, so values with commas stay whole. Defaults here:
#                     INSPECT_ALLOWED_HOSTS .run.app; INSPECT_KEEP_IMAGES none (kept images
#                     would stay on one instance); INSPECT_RECORDS_MIGRATE check (run the
#                     migration job first, deploy/README.md); upload limits of 31 MiB, under
#                     the 32 MiB Cloud Run accepts per request.
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}"
REGION=${REGION:-europe-west1}
REPOSITORY=${REPOSITORY:-inspection}
SERVICE=${SERVICE:-dino-inspection}
CPU=${CPU:-4}
MEMORY=${MEMORY:-8Gi}
CONCURRENCY=${CONCURRENCY:-16}
MIN_INSTANCES=${MIN_INSTANCES:-1}
MAX_INSTANCES=${MAX_INSTANCES:-4}
AUTH=${AUTH:-iam}
: "${SERVICE_ACCOUNT:?set SERVICE_ACCOUNT to the service account that runs the service (see the top of $0)}"
case "$AUTH" in
  iam) auth_flag=--no-allow-unauthenticated ;;
  public) auth_flag=--allow-unauthenticated ;;
  *) echo "error: AUTH is iam or public, not '$AUTH'" >&2; exit 2 ;;
esac
SECRET_SETTINGS="INSPECT_ADMIN_KEY INSPECT_API_KEYS INSPECT_API_KEY INSPECT_RECORDS_DB"

for name in $SECRET_SETTINGS; do
  if [ -n "${!name:-}" ]; then
    echo "error: $name is set in the environment; keys and the database URL go to Cloud Run" \
      "only as Secret Manager secrets (see the *_SECRET settings at the top of $0)." >&2
    exit 2
  fi
done
secrets=()
add_secret() {  # add_secret SETTING SECRET:VERSION
  [ -n "$2" ] || return 0
  case "$2" in
    *:latest | *:) ;;
    *:*) secrets+=("$1=$2"); return 0 ;;
  esac
  echo "error: $1's secret '$2' needs a pinned version (SECRET:VERSION, e.g. ${2%%:*}:1):" \
    "with 'latest', instances started after a rotation would hold another value." >&2
  exit 2
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
limit=$((31 * 1024 * 1024))  # Cloud Run refuses requests over 32 MiB before they arrive
declare -A defaults=(
  [INSPECT_THREADS]="$CPU"
  [INSPECT_ALLOWED_HOSTS]=.run.app
  [INSPECT_KEEP_IMAGES]=none
  [INSPECT_MAX_BYTES]=$limit
  [INSPECT_MAX_BATCH_BYTES]=$limit
  [INSPECT_MAX_CHANGE_BYTES]=$limit
)
if [ -n "${RECORDS_DB_SECRET:-}" ]; then
  defaults[INSPECT_RECORDS_MIGRATE]=check
else
  echo "note: no RECORDS_DB_SECRET: records are off (INSPECT_RECORDS=off); an instance's" \
    "own files would be lost on scale-in." >&2
  defaults[INSPECT_RECORDS]=off
fi
{
  for name in "${!defaults[@]}"; do
    [ -n "${!name:-}" ] || echo "${name}: '${defaults[$name]}'"
  done
  for name in $(env | grep -o '^INSPECT_[A-Z_]*' | sort -u || true); do
    case " $SECRET_SETTINGS " in *" $name "*) continue ;; esac
    value=${!name}
    echo "${name}: '${value//\'/\'\'}'"
  done
} > "$env_file"
secret_list=$(IFS=,; echo "${secrets[*]}")
sql=()
[ -z "${CLOUDSQL_INSTANCE:-}" ] || sql=(--add-cloudsql-instances "$CLOUDSQL_INSTANCE")
# Probes within Cloud Run's limits: a startup probe may take at most 240 s in all
# (initialDelaySeconds + periodSeconds * failureThreshold); /readyz turns 200 once the
# runner has loaded the backbone and the banks. /livez answers while the process lives.
gcloud run deploy "$SERVICE" \
  --project "$PROJECT_ID" --region "$REGION" --image "$image" \
  --service-account "$SERVICE_ACCOUNT" "$auth_flag" \
  --port 3000 --cpu "$CPU" --memory "$MEMORY" --concurrency "$CONCURRENCY" \
  --min-instances "$MIN_INSTANCES" --max-instances "$MAX_INSTANCES" \
  --timeout 300 --no-cpu-throttling --cpu-boost \
  --startup-probe "httpGet.path=/readyz,initialDelaySeconds=0,periodSeconds=5,timeoutSeconds=5,failureThreshold=48" \
  --liveness-probe "httpGet.path=/livez,periodSeconds=30,timeoutSeconds=5,failureThreshold=3" \
  --env-vars-file "$env_file" --set-secrets "$secret_list" "${sql[@]}"
