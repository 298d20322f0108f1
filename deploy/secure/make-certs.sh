#!/bin/sh
# Self-signed TLS and SASL files for the broker of docker-compose.secure.yml (its one-shot service `certs`, image
# alpine/openssl; POSIX sh). Nothing it writes is in the repository; see deploy/secure/README.md.
#
# Writes, in SECRETS_DIR (the volume kafka-secrets: the broker's and the admin tools', owner KAFKA_UID, mode 0600):
#   kafka.keystore.p12     the broker's key and certificate chain (PKCS#12), SANs from KAFKA_HOSTNAMES
#   keystore-password      its random password (the apache/kafka image reads it from this file)
#   ca.crt                 the CA (the admin tools' PEM truststore)
#   kafka_server_jaas.conf the SASL/PLAIN users: admin (KAFKA_ADMIN_PASSWORD) and one principal per erc-stream
#                          service, each with its own password: consumer, producer, exporter, dashboard, notifier
#                          (KAFKA_PASSWORD_CONSUMER, ...; the ACLs that docker-compose.secure.yml's topics job
#                          grants say what each may do)
#   client.properties      the admin client's settings (topics job, health check)
# and in CA_DIR (the volume kafka-ca, read-only in the erc-stream services): ca.crt, world-readable.
# The CA's key is thrown away once the broker's certificate is signed; both are made again when the certificate
# is missing or expires within 30 days (the clients read ca.crt when they start). The JAAS and properties files
# are rewritten on every run, so changed passwords apply at the next start.
#
# Run it by hand (e.g. to check it):
#   KAFKA_ADMIN_PASSWORD=$(openssl rand -hex 32) KAFKA_PASSWORD_CONSUMER=$(openssl rand -hex 32) ... \
#     SECRETS_DIR=/tmp/s/kafka CA_DIR=/tmp/s/ca KAFKA_UID=$(id -u) sh deploy/secure/make-certs.sh
set -eu

SECRETS_DIR=${SECRETS_DIR:-/secrets/kafka}
CA_DIR=${CA_DIR:-/secrets/ca}
KAFKA_HOSTNAMES=${KAFKA_HOSTNAMES:-kafka,localhost}
#: The services' principals; each one's password is in KAFKA_PASSWORD_<NAME, upper case>.
KAFKA_USERS="consumer producer exporter dashboard notifier"
KAFKA_UID=${KAFKA_UID:-1000}  # appuser in the apache/kafka image
KAFKA_GID=${KAFKA_GID:-$KAFKA_UID}
CERT_DAYS=${CERT_DAYS:-825}
RENEW_S=2592000  # 30 days

fail() { echo "make-certs: $*" >&2; exit 1; }
NL='
'

# A password goes into a JAAS file and a Java properties file, both inside double quotes.
check_password() {
  case "$2" in
    "") fail "$1 is not set" ;;
    *'"'* | *'\'* ) fail "$1 contains a double quote or a backslash (use e.g. \`openssl rand -hex 32\`)" ;;
  esac
  case "$2" in *"$NL"*) fail "$1 contains a newline" ;; esac
}
password_of() {  # the password of principal $1 (KAFKA_PASSWORD_CONSUMER for consumer, ...)
  eval "printf '%s' \"\${KAFKA_PASSWORD_$(echo "$1" | tr '[:lower:]' '[:upper:]'):-}\""
}
check_password KAFKA_ADMIN_PASSWORD "${KAFKA_ADMIN_PASSWORD:-}"
users=""
for user in $KAFKA_USERS; do
  password=$(password_of "$user")
  check_password "KAFKA_PASSWORD_$(echo "$user" | tr '[:lower:]' '[:upper:]')" "$password"
  users="$users
  user_$user=\"$password\""
done

umask 077
mkdir -p "$SECRETS_DIR" "$CA_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -s "$SECRETS_DIR/kafka.keystore.p12" ] && [ -s "$SECRETS_DIR/keystore-password" ] \
  && [ -s "$SECRETS_DIR/kafka.crt" ] && [ -s "$CA_DIR/ca.crt" ] \
  && openssl x509 -checkend "$RENEW_S" -noout -in "$SECRETS_DIR/kafka.crt" >/dev/null; then
  echo "make-certs: the broker's certificate is valid for 30 more days; keeping it"
else
  echo "make-certs: making a CA and the broker's certificate (SANs: $KAFKA_HOSTNAMES, $CERT_DAYS days)"
  san=""
  for name in $(echo "$KAFKA_HOSTNAMES" | tr ',' ' '); do
    san="${san:+$san,}DNS:$name"
  done
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$CERT_DAYS" -subj "/CN=erc-stream local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.crt"
  openssl req -newkey rsa:3072 -sha256 -nodes -subj "/CN=kafka" -keyout "$tmp/kafka.key" -out "$tmp/kafka.csr"
  printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$tmp/ext.cnf"
  openssl x509 -req -sha256 -days "$CERT_DAYS" -in "$tmp/kafka.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$tmp/ext.cnf" -out "$tmp/kafka.crt"
  openssl verify -CAfile "$tmp/ca.crt" "$tmp/kafka.crt" >/dev/null
  openssl rand -hex 32 >"$tmp/keystore-password"
  openssl pkcs12 -export -name kafka -in "$tmp/kafka.crt" -inkey "$tmp/kafka.key" -certfile "$tmp/ca.crt" \
    -passout "file:$tmp/keystore-password" -out "$tmp/kafka.keystore.p12"
  for f in kafka.keystore.p12 keystore-password kafka.crt ca.crt; do
    mv "$tmp/$f" "$SECRETS_DIR/$f"
  done
  cp "$SECRETS_DIR/ca.crt" "$CA_DIR/ca.crt"
fi

cat >"$SECRETS_DIR/kafka_server_jaas.conf" <<EOF
KafkaServer {
  org.apache.kafka.common.security.plain.PlainLoginModule required
  username="admin"
  password="$KAFKA_ADMIN_PASSWORD"
  user_admin="$KAFKA_ADMIN_PASSWORD"$users;
};
EOF

cat >"$SECRETS_DIR/client.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD";
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/secrets/ca.crt
EOF

chmod 0700 "$SECRETS_DIR"
chmod 0600 "$SECRETS_DIR"/*
chown -R "$KAFKA_UID:$KAFKA_GID" "$SECRETS_DIR"
chmod 0755 "$CA_DIR"
chmod 0644 "$CA_DIR/ca.crt"
echo "make-certs: done ($SECRETS_DIR, $CA_DIR/ca.crt)"
