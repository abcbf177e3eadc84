#!/bin/sh
# Build dist/traits-agent_<version>_<arch>.deb from this checkout with dpkg-deb.
#
# The agent gets its own virtualenv at /opt/traits-agent, made by the Debian python3.11 and
# filled from PyPI (or the configured pip index) at build time. A venv is not relocatable
# (script shebangs, bytecode, RECORD files name its path), so it is created at its real path:
# inside a private mount namespace the staging directory is bind-mounted on /opt/traits-agent,
# `python3 -m venv /opt/traits-agent` and `pip install` run there, and the result is already
# correct for the installed system. Nothing outside the namespace sees that mount, so an
# installed traits-agent package on the build machine is untouched.
#
# Needs: root (for the mount namespace; CI runs as root), dpkg-deb, util-linux `unshare`,
# the python3.11 + python3-venv Debian packages, network access to the pip index.
# Usage: packaging/build-deb.sh [OUTDIR]      (default OUTDIR: <checkout>/dist)
# Env:   DEB_MAINTAINER="Name <mail>"  (default: pyproject's maintainers/authors)
#        SOURCE_DATE_EPOCH             (default: the last commit's time) for stable mtimes
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
outdir=${1:-$repo/dist}
prefix=/opt/traits-agent

die() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (a private mount namespace puts the venv at $prefix)"
for tool in dpkg-deb dpkg unshare mount; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

# -- what we build -----------------------------------------------------------------------------
python=$(command -v python3 2>/dev/null || true)
[ -x /usr/bin/python3 ] && python=/usr/bin/python3
[ -n "$python" ] || die "python3 not found (apt-get install python3)"
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python="/usr/bin/python$pyver"
[ -x "$python" ] || die "$python not found: the venv must point at a Debian interpreter"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
    die "the venv module is incomplete (apt-get install python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "traits-agent needs Python >= 3.11, $python is $pyver"

upstream_version=$("$python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])' "$repo/pyproject.toml")
# PEP 440 pre/dev releases sort before the release in Debian only with "~"
version=$(echo "$upstream_version" | sed -E 's/^([0-9.]+)\.?(a|b|rc|dev)/\1~\2/')
arch=$(dpkg --print-architecture)
deb="$outdir/traits-agent_${version}_${arch}.deb"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
# Maintainer: $DEB_MAINTAINER, else the first of [project] maintainers/authors with an email
maintainer=${DEB_MAINTAINER:-$("$python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for person in project.get("maintainers", []) + project.get("authors", []):
    if person.get("email"):
        print("%s <%s>" % (person.get("name", "traits-agent maintainers"), person["email"]))
        break' "$repo/pyproject.toml")}
[ -n "$maintainer" ] || maintainer="traits-agent maintainers <maintainers@traits-agent.invalid>"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg="$work/pkg"
src="$work/src"
echo "build-deb.sh: traits-agent $version ($arch), python $pyver, in $work"

# -- 1. the venv, built at its real path ------------------------------------------------------
# a clean copy of the checkout: pip builds local projects in place, leaving build/ and
# *.egg-info behind, and must not pick up a developer's .venv or old dist/
mkdir -p "$src" "$pkg$prefix"
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.ruff_cache -cf - . | tar -C "$src" -xf -

created_mountpoint=
if [ ! -d "$prefix" ]; then
    mkdir -p "$prefix"
    created_mountpoint=yes
fi
# shellcheck disable=SC2016 # $1.. expand in the inner shell
unshare --mount --propagation private sh -eu -c '
    mount --bind "$1" "$2"
    "$3" -m venv "$2"
    "$2/bin/python" -m pip install --quiet --no-cache-dir --no-compile \
        --disable-pip-version-check "$4"
    "$2/bin/python" -m pip uninstall --quiet --yes pip setuptools
' build-venv "$pkg$prefix" "$prefix" "$python" "$src" || {
    [ -z "$created_mountpoint" ] || rmdir "$prefix"
    die "building the venv failed"
}
[ -z "$created_mountpoint" ] || rmdir "$prefix"

# what only the build needed, or that names the build directory
find "$pkg$prefix" -depth -type d -name __pycache__ -exec rm -rf {} +
rm -f "$pkg$prefix"/bin/activate* "$pkg$prefix"/bin/Activate.ps1
find "$pkg$prefix/include" -depth -type d -empty -delete
find "$pkg$prefix" -path '*.dist-info/direct_url.json' -delete
# third-party files: strip native extensions (debug info is most of their size); no
# executable bit on what is not a script (lintian: executable-not-elf-or-script)
if command -v strip >/dev/null; then
    find "$pkg$prefix" -name '*.so' -type f -exec strip --strip-unneeded --remove-section=.comment {} +
fi
find "$pkg$prefix/lib" -type f -perm /111 ! -name '*.so' | while read -r f; do
    head -c2 "$f" | grep -q '^#!' || chmod a-x "$f"
done
"$pkg$prefix/bin/python" -c 'import traits_agent' 2>/dev/null ||
    die "the venv cannot import traits_agent"
grep -rqs "$work" "$pkg$prefix" && die "the venv still names the build directory $work"

# -- 2. files ----------------------------------------------------------------------------------
install -d "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/traits-agent" \
    "$pkg/usr/lib/sysctl.d" "$pkg/usr/share/doc/traits-agent" "$pkg/DEBIAN"
ln -s "$prefix/bin/traits-agent" "$pkg/usr/bin/traits-agent"
for unit in traits-agent.service traits-agent.socket traits-agent-udp.socket \
    traits-agent-forward.socket traits-agent-forward-tcp.socket; do
    install -m 0644 "$repo/systemd/$unit" "$pkg/lib/systemd/system/$unit"
done
install -m 0644 "$repo/systemd/agent.toml" "$pkg/etc/traits-agent/agent.toml"
install -m 0644 "$repo/systemd/60-traits-agent.conf" "$pkg/usr/lib/sysctl.d/60-traits-agent.conf"
doc="$pkg/usr/share/doc/traits-agent"
[ -f "$repo/README.md" ] && install -m 0644 "$repo/README.md" "$doc/README.md"
install -m 0644 "$here/debian/copyright" "$doc/copyright"
install -d "$pkg/usr/share/lintian/overrides" "$pkg/usr/share/man/man1"
install -m 0644 "$here/debian/lintian-overrides" "$pkg/usr/share/lintian/overrides/traits-agent"
"$pkg$prefix/bin/python" "$here/make-manpage.py" "$(date -u -d "@$SOURCE_DATE_EPOCH" +%F)" |
    gzip -9n >"$pkg/usr/share/man/man1/traits-agent.1.gz"
chmod 0644 "$pkg/usr/share/man/man1/traits-agent.1.gz"
date_rfc2822=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
cat >"$work/changelog" <<EOF
traits-agent ($version) stable; urgency=medium

  * Built from the traits-agent $upstream_version checkout; see README.md.

 -- $maintainer  $date_rfc2822
EOF
gzip -9n <"$work/changelog" >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# -- 3. control --------------------------------------------------------------------------------
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$pkg/DEBIAN/$script"
done
echo /etc/traits-agent/agent.toml >"$pkg/DEBIAN/conffiles"
installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
# native extensions in the venv link against glibc: depend on the newest symbol version used
glibc=$(find "$pkg$prefix" -name '*.so' -type f -exec objdump -T {} + 2>/dev/null |
    grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
depends="python$pyver, adduser${glibc:+, libc6 (>= $glibc)}"
cat >"$pkg/DEBIAN/control" <<EOF
Package: traits-agent
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Homepage: https://docs.12traits.com/
Description: local sidecar that delivers game analytics events to 12traits
 traits-agent receives game analytics events from game servers over a Unix
 datagram socket, loopback UDP or the Fluentd Forward protocol, validates
 them, keeps them in a disk-backed queue and delivers them in batches to the
 12traits Ingestion API over HTTPS, retrying through outages.
 .
 The package ships a hardened systemd service with socket activation and
 enables nothing by itself: put the API key in /etc/traits-agent/api_key,
 then enable traits-agent.socket and traits-agent.service.
EOF
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -print | sed 's,^\./,,' | LC_ALL=C sort |
    xargs -d '\n' md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

# -- 4. the archive ----------------------------------------------------------------------------
find "$pkg" -type d -exec chmod 0755 {} +
mkdir -p "$outdir"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "build-deb.sh: $deb ($(du -h "$deb" | cut -f1))"
