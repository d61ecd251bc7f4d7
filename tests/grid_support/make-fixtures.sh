#!/bin/sh
# Builds a grid PKI in OUT with the ecosystem's own tools, for tests/grid_verify.rs and the later
# end-to-end tests: a CA directory with hashed names and a CRL (openssl, `openssl rehash`), a
# vomsdir with .lsc files, and proxies with VOMS attribute certificates (voms-proxy-fake from
# Debian's voms-clients). Everything is made fresh on each run, so validity windows are real.
#
#   make-fixtures.sh OUT
#
# OUT/certificates     the site's CA directory: Test CA (hash.0) and its CRL (hash.r0)
# OUT/vomsdir          atlas/voms.example.lsc and cms/voms.example.lsc
# OUT/pki              keys and certificates behind them (Other CA is not in the CA directory)
# OUT/proxies/*.pem    good, expired, unknown-ca, revoked, rogue-signer, other-vo, tampered-ac,
#                      limited, chain4 (four proxies), pathlen (three under a path length of
#                      one), long-lived (96 h), no-ac, badname, rewrapped (tampered-ac's control),
#                      ac-expired (proxy valid, AC not), stolen-ac (Alice's AC in Bob's proxy)
#                      delegable, delegable-long (300 h), delegable-limited, delegable-bob
#                      (path length 10: room for delegations to the VO server and worker node)
# Subjects: /DC=org/DC=mupilot-test/CN=Alice (good), CN=Bob, CN=Mallory (revoked),
# /DC=org/DC=elsewhere/CN=Eve (Other CA).
set -eu
OUT=${1:?usage: make-fixtures.sh OUT}
command -v voms-proxy-fake >/dev/null || { echo "voms-proxy-fake not found: apt-get install voms-clients" >&2; exit 2; }
mkdir -p "$OUT/pki" "$OUT/certificates" "$OUT/vomsdir/atlas" "$OUT/vomsdir/cms" "$OUT/proxies"
cd "$OUT/pki"
DCS=/DC=org/DC=mupilot-test
export RANDFILE="$OUT/pki/.rnd"

printf 'basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature,keyEncipherment\n' > ee.ext
cat > ca.cnf <<'CNF'
[ ca ]
default_ca = tca
[ tca ]
database = index.txt
crlnumber = crlnumber
default_md = sha256
default_crl_days = 30
CNF

ca() { # name subject
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" -days 3650 -subj "$2" \
        -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
ee() { # name subject serial ca
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA "$4.pem" -CAkey "$4.key" -set_serial "$3" -days 365 \
        -extfile ee.ext -out "$1.pem" 2>/dev/null
    chmod 600 "$1.key"
}
ca testca "$DCS/CN=Test CA"
ca otherca "/DC=org/DC=elsewhere/CN=Other CA"
ee alice "$DCS/CN=Alice" 0x1001 testca
ee mallory "$DCS/CN=Mallory" 0x1002 testca
ee bob "$DCS/CN=Bob" 0x1003 testca
ee eve "/DC=org/DC=elsewhere/CN=Eve" 0x3001 otherca
ee voms "$DCS/CN=voms.example" 0x2001 testca
ee rogue "$DCS/CN=voms-rogue.example" 0x2002 testca

# Mallory's certificate is revoked; the CRL sits beside the CA as <hash>.r0.
: > index.txt
echo 01 > crlnumber
openssl ca -config ca.cnf -keyfile testca.key -cert testca.pem -revoke mallory.pem 2>/dev/null
openssl ca -config ca.cnf -keyfile testca.key -cert testca.pem -gencrl -out testca.crl 2>/dev/null
h=$(openssl x509 -in testca.pem -noout -hash)
cp testca.pem "../certificates/$h.0"
cp testca.crl "../certificates/$h.r0"
openssl rehash ../certificates 2>/dev/null || true

for vo in atlas cms; do
    printf '%s\n%s\n' "$DCS/CN=voms.example" "$DCS/CN=Test CA" > "../vomsdir/$vo/voms.example.lsc"
done

P=../proxies
fake() { # out user voms-host-cert vo extra...
    out=$1 user=$2 host=$3 vo=$4
    shift 4
    voms-proxy-fake -q -rfc -cert "$user.pem" -key "$user.key" -hostcert "$host.pem" -hostkey "$host.key" \
        -voms "$vo" -uri voms.example:15000 -fqan "/$vo" -fqan "/$vo/prod/Role=production" \
        -certdir ../certificates -out "$P/$out.pem" "$@" 2>/dev/null
}
fake good alice voms atlas -hours 12
fake expired alice voms atlas -hours 1 -pastproxy 7200 -pastac 7200 -vomslife 1
fake unknown-ca eve voms atlas -hours 12
fake revoked mallory voms atlas -hours 12
fake rogue-signer alice rogue atlas -hours 12
fake other-vo alice voms cms -hours 12
fake limited alice voms atlas -hours 12 -limited
fake long-lived alice voms atlas -hours 96 -vomslife 96
fake ac-expired alice voms atlas -hours 12 -vomslife 1 -pastac 7200
voms-proxy-fake -q -rfc -cert alice.pem -key alice.key -certdir ../certificates -out "$P/no-ac.pem" -hours 12 2>/dev/null

# proxy NAME ISSUER-FILE SUBJECT EXTFILE: a proxy signed with the key in ISSUER-FILE; the new file
# holds the proxy, its key, then ISSUER-FILE's certificates (the chain, leaf first).
proxy() {
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$3" 2>/dev/null
    serial=$(echo "$3" | sed 's|.*/CN=||')
    openssl x509 -req -in "$1.csr" -CA "$2" -CAkey "$2" -set_serial "$serial" -days 1 \
        -extfile "$4" -out "$1.pem" 2>/dev/null
    { cat "$1.pem" "$1.key"; sed -n '/BEGIN CERTIFICATE/,/END CERTIFICATE/p' "$2"; } > "$P/$1.pem"
}
printf 'keyUsage=critical,digitalSignature,keyEncipherment\nproxyCertInfo=critical,language:id-ppl-inheritAll\n' > proxy.ext
# Four proxies: chain-base (with the AC, path length 10), then three more; and three under the
# good proxy, whose path length constraint (1, as voms-proxy-fake writes it) allows one.
fake chain-base alice voms atlas -hours 12 -path-length 10
chain() { # out base n...
    out=$1 prev="$P/$2.pem"
    shift 2
    dn=$(openssl x509 -in "$prev" -noout -subject -nameopt compat | sed 's/^subject=//')
    for n in "$@"; do
        dn="$dn/CN=$n"
        proxy "$out-$n" "$prev" "$dn" proxy.ext
        prev="$P/$out-$n.pem"
    done
    mv "$prev" "$P/$out.pem"
    rm -f "$P/$out"-*.pem
}
chain chain4 chain-base 2002 2003 2004
chain pathlen good 2102 2103
rm -f "$P/chain-base.pem"
# A proxy whose subject is not its issuer's plus one CN (RFC 3820 3.4).
proxy badname "$P/good.pem" "$DCS/CN=Bob/CN=2005" proxy.ext

# The good proxy's AC with one byte of an FQAN changed (production -> productiom), put into a
# fresh proxy that Alice signs properly: only the AC's own signature can catch it.
openssl x509 -in "$P/good.pem" -outform DER -out good.der
off=$(openssl asn1parse -inform DER -in good.der | grep -A1 ':1.3.6.1.4.1.8005.100.100.5' | tail -1 | cut -d: -f1 | tr -d ' ')
openssl asn1parse -inform DER -in good.der -strparse "$off" -noout -out ac.der
from=$(printf 'production' | xxd -p)
to=$(printf 'productiom' | xxd -p)
achex=$(xxd -p ac.der | tr -d '\n' | sed "s/$from/$to/")
{ cat proxy.ext; echo "1.3.6.1.4.1.8005.100.100.5=DER:$achex"; } > tampered.ext
cat alice.pem alice.key > alice-full.pem
proxy tampered-ac alice-full.pem "$DCS/CN=Alice/CN=424242" tampered.ext
# ...and the same AC unchanged, the control that the re-wrapping itself is sound.
achex=$(xxd -p ac.der | tr -d '\n')
{ cat proxy.ext; echo "1.3.6.1.4.1.8005.100.100.5=DER:$achex"; } > rewrapped.ext
proxy rewrapped alice-full.pem "$DCS/CN=Alice/CN=424243" rewrapped.ext
# ...and in a proxy of Bob's: an AC taken from someone else's proxy.
cat bob.pem bob.key > bob-full.pem
proxy stolen-ac bob-full.pem "$DCS/CN=Bob/CN=424244" rewrapped.ext

# For tests/grid_delegation.rs and tests/server_delegation.rs: user proxies that leave room for
# two more delegations (to the VO server, then to the worker node); one valid longer than a
# stored credential may be (1,000,000 s), one limited, one of Bob's.
fake delegable alice voms atlas -hours 24 -path-length 10
fake delegable-long alice voms atlas -hours 300 -vomslife 300 -path-length 10
fake delegable-limited alice voms atlas -hours 24 -path-length 10 -limited
fake delegable-bob bob voms atlas -hours 24 -path-length 10
chmod 600 "$P"/*.pem
