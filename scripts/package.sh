#!/usr/bin/env bash
# Builds mupilot's packages from this tree into target/packages/:
#   mupilot-switch_<version>-1_amd64.deb, mupilot-switch-<version>-1.x86_64.rpm
#       the site part: helper, units, /etc/mupilot/switch.toml (conffile), policy examples,
#       man pages, completions, the pilot for mupilot-pilot@.service (metadata: Cargo.toml's
#       [package.metadata.deb] and [package.metadata.generate-rpm]; maintainer scripts:
#       packaging/mupilot-switch/)
#   mupilot-server_<version>-1_amd64.deb, mupilot-server-<version>-1.x86_64.rpm
#       the reference VO server and its unit (the "server" variant; packaging/mupilot-server/)
#   mupilot-<version>-x86_64-linux-static
#       the pilot as a VO ships it: static (musl), runs on any x86_64 Linux (docs/vo-framework.md)
# Installs what it needs when missing: cargo-deb and cargo-generate-rpm from crates.io (a few
# minutes of compiling, once), the musl target and Debian's musl-tools. Reuses target/release
# when it is current (scripts/test.sh builds it first). scripts/package-test.sh tests the result.
#
#   scripts/package.sh                 everything
#   NO_STATIC=1 scripts/package.sh     without the static pilot
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

OUT=target/packages
MUSL=x86_64-unknown-linux-musl
# Versions these scripts were written against; --locked installs them with their own lock files.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || die "no version in Cargo.toml's [package]"

cargo_tool() { # subcommand crate version
    if ! cargo "$1" --version >/dev/null 2>&1; then
        log "installing $2 $3 from crates.io (compiles for a few minutes)"
        cargo install --locked --version "$3" "$2"
    fi
}
cargo_tool deb cargo-deb "$CARGO_DEB_VERSION"
cargo_tool generate-rpm cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"
apt_install binutils
# The helper verifies grid proxies with the system's OpenSSL (feature grid, src/grid).
apt_install libssl-dev pkg-config

log "building (release)"
cargo build --locked --release --bins

log "man pages and completions"
rm -rf target/assets
cargo run --locked --quiet --example gen-docs -- target/assets >/dev/null
gzip -9n target/assets/man/*.[18]

# The packages get stripped binaries (40 MB -> 7.5 MB for the pilot); target/release keeps its
# line tables for backtraces and profiles. cargo-deb strips its own copies (--strip: it would
# not, since the release profile has debug info); cargo-generate-rpm packages files as they are.
install -d target/release-stripped
for b in mupilot mupilot-switch mupilot-server mupilot-glexec; do
    strip -o "target/release-stripped/$b" "target/release/$b"
done

rm -rf "$OUT"
install -d "$OUT"
log "deb packages"
cargo deb --locked --no-build --strip --output "$OUT/"
cargo deb --locked --no-build --strip --variant server --output "$OUT/"
log "rpm packages"
cargo generate-rpm --output "$OUT/"
cargo generate-rpm --variant server --output "$OUT/"

if [ -z "${NO_STATIC:-}" ]; then
    log "static pilot ($MUSL)"
    if ! rustup target list --installed | grep -qx "$MUSL"; then
        rustup target add "$MUSL" ||
            die "cannot install the $MUSL standard library (rustup target add $MUSL failed: is the Rust distribution server reachable?); NO_STATIC=1 builds the packages without the static pilot"
    fi
    # ring's C code needs a musl C compiler (musl-gcc). With the pilot's feature alone: no grid
    # (the pilot never verifies grid credentials and must not link OpenSSL), no SQL, no sandbox.
    apt_install musl-tools
    cargo build --locked --release --target "$MUSL" --no-default-features --features pilot --bin mupilot
    static=$OUT/mupilot-$version-x86_64-linux-static
    strip -o "$static" "target/$MUSL/release/mupilot"
    # No interpreter, no shared library: what makes it run on any x86_64 EL8/EL9/Debian node.
    if readelf -l "$static" | grep -q 'INTERP' || readelf -d "$static" | grep -q 'NEEDED'; then
        die "$static is not static: $(readelf -d "$static" | grep NEEDED)"
    fi
fi

ls -l "$OUT"
