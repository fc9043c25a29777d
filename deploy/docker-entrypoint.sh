#!/bin/sh
# The container listens on all interfaces, where posttrain refuses to serve without an API key.
# Without POSTTRAIN_API_KEY, one is generated once, kept on the data volume (readable by its
# owner only) and printed this once, so the appliance is never open by accident.
set -eu
if [ -z "${POSTTRAIN_API_KEY:-}" ]; then
  key_file="${POSTTRAIN_HOME:-/data}/api-key"
  if [ ! -s "$key_file" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$key_file")
    echo "posttrain: generated an API key (kept in $key_file): $(cat "$key_file")"
  fi
  POSTTRAIN_API_KEY="$(cat "$key_file")"
  export POSTTRAIN_API_KEY
fi
exec "$@"
