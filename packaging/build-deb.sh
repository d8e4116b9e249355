#!/usr/bin/env bash
# Builds the Debian package with cargo-deb from [package.metadata.deb] in
# Cargo.toml: target/debian/inferdns_<version>-<revision>_<arch>.deb.
# Extra arguments go to cargo deb (e.g. --deb-revision 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null; then
  echo "== cargo install cargo-deb"
  cargo install --locked cargo-deb
fi
cargo build --release --locked --bin inferdns
# The packaged config is the repository's example with the GeoIP database
# where the package puts it.
mkdir -p target/packaging
sed 's#^database = "geoip/test-city.mmdb"#database = "/usr/share/inferdns/test-city.mmdb"#' \
  inferdns.toml >target/packaging/inferdns.toml
if ! grep -q '^database = "/usr/share/inferdns/test-city.mmdb"' target/packaging/inferdns.toml; then
  echo "error: inferdns.toml no longer names geoip/test-city.mmdb; update packaging/build-deb.sh" >&2
  exit 1
fi
# --strip: the release profile keeps line tables (debug = 1) for backtraces
# in development; the package ships the stripped binary.
cargo deb --locked --no-build --strip "$@"
