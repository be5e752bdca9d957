#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries the test suite starts are installed, and
# that an unprivileged account exists to run them (the server refuses to run as
# root). Installs Debian's postgresql package when the binaries are missing and we
# are root. Prints the bin directory on success.
set -euo pipefail

find_bindir() {
  local d
  for d in "${STITCHGRAPH_PG_BINDIR:-}" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"; return 0
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return 0
  fi
  return 1
}

if ! bindir=$(find_bindir); then
  if [ "$(id -u)" = "0" ]; then
    echo "ensure-postgres: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    bindir=$(find_bindir) || { echo "ensure-postgres: postgresql installed but initdb not found" >&2; exit 1; }
  else
    echo "ensure-postgres: PostgreSQL server binaries not found; install Debian's 'postgresql' package" >&2
    exit 1
  fi
fi

if [ "$(id -u)" = "0" ]; then
  user="${STITCHGRAPH_PG_USER:-postgres}"
  if ! id "$user" >/dev/null 2>&1; then
    echo "ensure-postgres: creating unprivileged user $user" >&2
    useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
  fi
fi
echo "$bindir"
