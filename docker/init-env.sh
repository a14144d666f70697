#!/usr/bin/env bash
# Write .env (or the file named by $1) from .env.example, every empty value (the secrets) filled
# with 32 random bytes in hex. Refuses to overwrite an existing file.
#   bash docker/init-env.sh          # then review .env; it is in .gitignore, never commit it
set -euo pipefail
example="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.env.example"
out="${1:-.env}"
if [ -e "$out" ]; then
  echo "$0: $out exists; not overwriting it" >&2
  exit 1
fi
umask 077
while IFS= read -r line || [ -n "$line" ]; do
  if [[ "$line" =~ ^[A-Z_][A-Z0-9_]*=$ ]]; then
    echo "${line}$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
  else
    echo "$line"
  fi
done <"$example" >"$out"
echo "wrote $out (secrets generated; owner-only permissions)" >&2
