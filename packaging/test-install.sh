#!/usr/bin/env bash
# Installs the Debian package on this machine and checks it as an operator
# would, then purges it (run by .ci/run; needs root or sudo, dpkg, dig).
#
# 1. build the .deb (packaging/build-deb.sh) and check its files, conffiles
#    and the man page;
# 2. install it; systemd-analyze verify and security on the installed unit;
# 3. the installed `inferdns check` on the installed config;
# 4. the installed daemon on a loopback port (its own small config, the
#    installed zone file; one region served on loopback), queried with dig;
# 5. upgrade to a newer revision over a locally changed conffile: the change
#    is kept;
# 6. purge: nothing of the package is left.
#
# Loopback only. The package must not be installed beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

if dpkg -s inferdns >/dev/null 2>&1; then
  fail "inferdns is already installed here; this test installs and purges it"
fi
for tool in dig dpkg-deb; do
  command -v "$tool" >/dev/null || fail "$tool is missing (bind9-dnsutils, dpkg)"
done

echo "== build"
packaging/build-deb.sh --deb-revision 1 >/dev/null
deb1=$(ls target/debian/inferdns_*-1_*.deb)
size=$(stat -c %s "$deb1")
ok "built $deb1 ($size bytes)"

echo "== contents"
contents=$(dpkg-deb -c "$deb1" | awk '{print $6}')
for f in ./usr/bin/inferdns ./etc/inferdns/inferdns.toml ./etc/inferdns/policies/chat.toml \
  ./etc/inferdns/zones/inference.example.com.zone ./usr/lib/systemd/system/inferdns.service \
  ./usr/share/man/man8/inferdns.8.gz ./usr/share/bash-completion/completions/inferdns \
  ./usr/share/zsh/vendor-completions/_inferdns ./usr/share/fish/vendor_completions.d/inferdns.fish \
  ./usr/share/doc/inferdns/copyright ./usr/share/doc/inferdns/README.md \
  ./usr/share/doc/inferdns/CHANGELOG.md ./usr/share/inferdns/test-city.mmdb; do
  grep -qxF "$f" <<<"$contents" || fail "$f is not in the package"
done
ctrl=$(mktemp -d)
dpkg-deb -e "$deb1" "$ctrl"
for f in /etc/inferdns/inferdns.toml /etc/inferdns/policies/chat.toml /etc/inferdns/zones/inference.example.com.zone; do
  grep -qxF "$f" "$ctrl/conffiles" || fail "$f is not a conffile"
done
grep -q 'deb-systemd-helper enable inferdns.service' "$ctrl/postinst" || fail "postinst does not enable the unit"
if grep -q 'deb-systemd-invoke start' "$ctrl/postinst"; then fail "postinst starts the unit"; fi
ok "files, conffiles, enable-not-start"
extract=$(mktemp -d)
dpkg-deb -x "$deb1" "$extract"
file "$extract/usr/bin/inferdns" 2>/dev/null | grep -q 'not stripped' && fail "the binary is not stripped"
binsize=$(stat -c %s "$extract/usr/bin/inferdns")
ok "stripped binary, $binsize bytes"

echo "== install"
DEBIAN_FRONTEND=noninteractive $sudo dpkg -i "$deb1" >/dev/null
trap 'DEBIAN_FRONTEND=noninteractive $sudo dpkg --purge inferdns >/dev/null 2>&1 || true' EXIT
[ -x /usr/bin/inferdns ] || fail "/usr/bin/inferdns missing after install"
zcat /usr/share/man/man8/inferdns.8.gz | grep -q '^\.TH inferdns 8' || fail "man page is not inferdns(8)"
if command -v man >/dev/null; then
  MANWIDTH=80 man -l /usr/share/man/man8/inferdns.8.gz 2>/dev/null | grep -q 'SIGHUP' || fail "man page does not render"
fi
ok "installed: $(/usr/bin/inferdns --version)"

echo "== unit"
if command -v systemd-analyze >/dev/null; then
  # verify needs the unit's binaries to exist: they do now.
  verify=$(systemd-analyze verify /usr/lib/systemd/system/inferdns.service 2>&1 || true)
  if grep -v -e 'Failed to connect' -e 'System has not been booted' <<<"$verify" | grep -q .; then
    echo "$verify" >&2
    fail "systemd-analyze verify"
  fi
  score=$(systemd-analyze security --offline=true /usr/lib/systemd/system/inferdns.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for inferdns.service: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || fail "no systemd-analyze security score"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "systemd-analyze security $score > 2.0"
  ok "systemd-analyze verify clean, security exposure $score"
else
  echo "SKIPPED: systemd-analyze missing"
fi

echo "== check the installed config"
/usr/bin/inferdns check --config /etc/inferdns/inferdns.toml || fail "installed config does not check"
ok "inferdns check /etc/inferdns/inferdns.toml"

echo "== run the installed daemon on loopback"
run=$(mktemp -d)
mkdir -p "$run/www"
echo ok >"$run/www/health"
port_of() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(port_of)
dns_port=$(port_of)
python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$run/www" >/dev/null 2>&1 &
http_pid=$!
cat >"$run/inferdns.toml" <<TOML
[server]
dns-listen = ["127.0.0.1:$dns_port"]
admin-listen = "127.0.0.1:0"
[zone]
apex = "inference.example.com"
file = "/etc/inferdns/zones/inference.example.com.zone"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.example.com", serial = 1 }
ns = [{ name = "ns1.inference.example.com", addresses = ["127.0.0.1"] }]
[regions.local]
endpoints = [{ address = "127.0.0.1", port = $http_port }]
probe = { path = "/health" }
[services.chat]
tiers = [["local"]]
TOML
/usr/bin/inferdns run --config "$run/inferdns.toml" 2>"$run/log" &
daemon=$!
answer=""
for _ in $(seq 1 50); do
  answer=$(dig +short +time=1 +tries=1 -p "$dns_port" @127.0.0.1 chat.inference.example.com A 2>/dev/null || true)
  [ "$answer" = "127.0.0.1" ] && break
  sleep 0.2
done
www=$(dig +short +time=1 +tries=1 -p "$dns_port" @127.0.0.1 www.inference.example.com A || true)
kill "$daemon" "$http_pid" 2>/dev/null || true
wait "$daemon" 2>/dev/null || true
[ "$answer" = "127.0.0.1" ] || { cat "$run/log" >&2; fail "chat answered '$answer'"; }
[ "$www" = "192.0.2.80" ] || fail "www answered '$www' (from the installed zone file)"
ok "dig chat -> $answer, www -> $www"

echo "== upgrade over a changed conffile"
echo '# local change kept across upgrades' | $sudo tee -a /etc/inferdns/inferdns.toml >/dev/null
packaging/build-deb.sh --deb-revision 2 >/dev/null
deb2=$(ls target/debian/inferdns_*-2_*.deb)
DEBIAN_FRONTEND=noninteractive $sudo dpkg -i --force-confdef --force-confold "$deb2" >/dev/null
dpkg -s inferdns | grep -q '^Version: .*-2$' || fail "not upgraded"
grep -q '^# local change kept across upgrades' /etc/inferdns/inferdns.toml || fail "the local change was lost"
/usr/bin/inferdns check --config /etc/inferdns/inferdns.toml || fail "config does not check after upgrade"
ok "upgraded to $(dpkg -s inferdns | sed -n 's/^Version: //p'), local change kept"

echo "== purge"
DEBIAN_FRONTEND=noninteractive $sudo dpkg --purge inferdns >/dev/null
trap - EXIT
for f in /usr/bin/inferdns /etc/inferdns /usr/lib/systemd/system/inferdns.service \
  /usr/share/man/man8/inferdns.8.gz /usr/share/inferdns /usr/share/doc/inferdns \
  /etc/systemd/system/multi-user.target.wants/inferdns.service /var/lib/inferdns; do
  [ ! -e "$f" ] || fail "$f left after purge"
done
dpkg -s inferdns >/dev/null 2>&1 && fail "dpkg still knows inferdns"
ok "purged, nothing left"
rm -rf "$ctrl" "$extract" "$run"
echo "packaging/test-install.sh passed: .deb $size bytes, binary $binsize bytes, security ${score:-skipped}"
