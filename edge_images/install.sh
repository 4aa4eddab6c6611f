#!/usr/bin/env bash
# Install Ember's edge agent on a Debian, Ubuntu or Raspberry Pi OS host, as a systemd service.
#
#   sudo ./install.sh --broker mqtts://broker.lan:8883 --username pi-kitchen --password-file pw \
#                     --ca-file ca.pem --coordinator-key ed25519:... --label site=kitchen
#   sudo ./install.sh --enroll-url mqtts://broker.lan:8883 --token T    # one-time token
#   sudo ./install.sh --wheel ember_fl-0.1.0-py3-none-any.whl --no-start   # image builds
#
# What it does, each step idempotent (run it again to upgrade or reconfigure):
#  1. python3 and python3-venv from apt when missing (--no-apt: never touch apt);
#  2. a system user `ember` (in the video and render groups when they exist, for accelerators);
#  3. a new virtual environment PREFIX/venvs/<UTC time> with the agent from the package index
#     (--version), a wheel (--wheel) or a source tree (--source), then the symlinks
#     PREFIX/current -> venvs/<that> and PREFIX/bin -> current/bin, so an upgrade is one
#     atomic rename and the previous environment stays for a rollback (two are kept);
#  4. the unit systemd/ember-agent.service, unchanged, plus a drop-in that runs it as `ember`
#     (the configuration holds the broker password: readable by root and the ember group only);
#  5. /etc/ember-agent/agent.toml from the arguments, or from `ember-agent enroll`
#     (--enroll-url/--token) when the installed agent has that command; an existing file is
#     kept when no configuration argument is given;
#  6. enable the unit, and start (or restart) it when systemd is running; in a chroot or a
#     container without systemd it says so and how to run the agent by hand.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/ember-agent
CONFIG=/etc/ember-agent/agent.toml
STATE_DIR=/var/lib/ember-agent
UNIT_DIR=/etc/systemd/system
UNIT_NAME=ember-agent.service
USER_NAME=ember
PYTHON=python3
PACKAGE=ember-fl
VERSION=""
WHEEL=""
SOURCE=""
EXTRAS=""
UNIT_FILE=""
PIP_ARGS=()
APT=1
ENABLE=1
START=1
CONFIGURE=1
INSTALL=1
ENROLL_URL=""
TOKEN=""
BROKERS=()
AGENT_ID=""
USERNAME=""
PASSWORD=""
CA_FILE=""
KEYS=()
LABELS=()
TOPIC_PREFIX=""
ALLOW_CODE=0
ZEROCONF=1
CONFIG_ARGS=0
LOGIN_ARGS=0
PREVIOUS=""

usage() {
    cat <<EOF
Usage: $PROG [options]

Where the agent comes from (default: the newest $PACKAGE on the package index):
  --version V            $PACKAGE==V from the package index
  --wheel FILE           a wheel file (pip wheel --no-deps . in a checkout builds one)
  --source DIR           a source tree (a checkout of Ember)
  --extras LIST          extras to install as well, e.g. torch
  --index-url URL        the package index pip uses (default: pip's own configuration)
  --extra-index-url URL  a further index (e.g. NVIDIA's Jetson index), repeatable

Configuration, written to $CONFIG (an existing file is kept if none of these is given):
  --enroll-url URL --token T   enrol with a one-time token from 'ember agents token'
                         (ember-agent enroll; URL: mqtts://ember-enrol:PASSWORD@host:8883);
                         --agent-id, --topic-prefix, --ca-file, --label and the rest still apply
  --broker URL           mqtt://host:1883 or mqtts://host:8883, repeatable (failover order)
  --agent-id ID          this device's agent id (default: host name and a random suffix)
  --username U           broker user name (default: the agent id)
  --password P | --password-file FILE
  --ca-file FILE         CA certificate for mqtts:// (copied next to the configuration)
  --coordinator-key K    ed25519:<base64> key whose signed bundles this agent runs, repeatable
  --label KEY=VALUE      a label the planner can match on, repeatable
  --topic-prefix P       MQTT topic prefix (default ember/v1)
  --allow-code           run bundles that carry Python source (signed ones only)
  --no-zeroconf          do not advertise the agent over multicast DNS

Installation:
  --prefix DIR           virtual environments live here (default $PREFIX)
  --config FILE          configuration path (default $CONFIG)
  --user NAME            system user the agent runs as (default $USER_NAME)
  --python PATH          Python >= 3.10 to build the environment with (default $PYTHON)
  --unit FILE            the systemd unit (default: the checkout's or the installed package's)
  --no-apt               never run apt-get (fail if python3-venv is missing)
  --configure-only       keep the installed agent; only (re)write the configuration and start
  --no-config            install only: no configuration, not enabled (images configured later)
  --no-enable            do not enable the unit
  --no-start             enable but do not start (for image builds)
  -h, --help             this help
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}
need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        die "$1 needs a value (see --help)"
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
    --version) need_value "$@"; VERSION=$2; shift ;;
    --wheel) need_value "$@"; WHEEL=$2; shift ;;
    --source) need_value "$@"; SOURCE=$2; shift ;;
    --extras) need_value "$@"; EXTRAS=$2; shift ;;
    --index-url | --extra-index-url) need_value "$@"; PIP_ARGS+=("$1" "$2"); shift ;;
    --enroll-url) need_value "$@"; ENROLL_URL=$2; shift ;;
    --token) need_value "$@"; TOKEN=$2; shift ;;
    --broker) need_value "$@"; BROKERS+=("$2"); CONFIG_ARGS=1; LOGIN_ARGS=1; shift ;;
    --agent-id) need_value "$@"; AGENT_ID=$2; CONFIG_ARGS=1; shift ;;
    --username) need_value "$@"; USERNAME=$2; CONFIG_ARGS=1; LOGIN_ARGS=1; shift ;;
    --password) need_value "$@"; PASSWORD=$2; CONFIG_ARGS=1; LOGIN_ARGS=1; shift ;;
    --password-file)
        need_value "$@"
        [ -r "$2" ] || die "--password-file: cannot read $2"
        PASSWORD=$(head -n 1 "$2"); CONFIG_ARGS=1; LOGIN_ARGS=1; shift ;;
    --ca-file) need_value "$@"; CA_FILE=$2; CONFIG_ARGS=1; shift ;;
    --coordinator-key) need_value "$@"; KEYS+=("$2"); CONFIG_ARGS=1; LOGIN_ARGS=1; shift ;;
    --label)
        need_value "$@"
        case "$2" in *=*) ;; *) die "--label expects KEY=VALUE, got '$2'" ;; esac
        LABELS+=("$2"); CONFIG_ARGS=1; shift ;;
    --topic-prefix) need_value "$@"; TOPIC_PREFIX=$2; CONFIG_ARGS=1; shift ;;
    --allow-code) ALLOW_CODE=1; CONFIG_ARGS=1 ;;
    --no-zeroconf) ZEROCONF=0; CONFIG_ARGS=1 ;;
    --prefix) need_value "$@"; PREFIX=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --user) need_value "$@"; USER_NAME=$2; shift ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    --unit) need_value "$@"; UNIT_FILE=$2; shift ;;
    --no-apt) APT=0 ;;
    --configure-only) INSTALL=0 ;;
    --no-config) CONFIGURE=0; ENABLE=0; START=0 ;;
    --no-enable) ENABLE=0; START=0 ;;
    --no-start) START=0 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

sources=0
for given in "$VERSION" "$WHEEL" "$SOURCE"; do
    [ -n "$given" ] && sources=$((sources + 1))
done
[ "$sources" -le 1 ] || die "give at most one of --version, --wheel and --source"
[ -z "$ENROLL_URL" ] || [ -n "$TOKEN" ] || die "--enroll-url needs --token"
[ -z "$TOKEN" ] || [ -n "$ENROLL_URL" ] || die "--token needs --enroll-url"
[ -z "$ENROLL_URL" ] || [ "$LOGIN_ARGS" -eq 0 ] ||
    die "--enroll-url fetches the broker login and keys: do not combine it with --broker, --username, --password or --coordinator-key"
if [ "$CONFIGURE" -eq 0 ] && { [ "$CONFIG_ARGS" -eq 1 ] || [ -n "$ENROLL_URL" ]; }; then
    die "--no-config cannot be combined with configuration arguments"
fi
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $PROG ...): it creates a user and a service"

# A TOML basic string: backslashes and double quotes escaped; control characters refused.
toml_str() {
    case "$1" in *[[:cntrl:]]*) die "a value contains a control character: '$1'" ;; esac
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

toml_list() {
    local out="" item
    for item in "$@"; do
        out="${out:+$out, }$(toml_str "$item")"
    done
    printf '[%s]' "$out"
}

ensure_python() {
    if "$PYTHON" -c 'import ensurepip, sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        return
    fi
    if [ "$APT" -eq 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "$PYTHON with venv and ensurepip (Python >= 3.10) is needed: apt-get install python3-venv"
    fi
    say "installing python3 and python3-venv (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$PYTHON is older than 3.10: install a newer Python and pass --python"
}

ensure_user() {
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        say "creating system user $USER_NAME"
        useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "Ember agent" "$USER_NAME"
    fi
    local group
    for group in video render; do
        if getent group "$group" >/dev/null; then
            usermod --append --groups "$group" "$USER_NAME"
        fi
    done
    install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$STATE_DIR"
}

# The pip requirement for the chosen source, with extras.
requirement() {
    local extras=${EXTRAS:+[$EXTRAS]}
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "--wheel: no such file $WHEEL"
        printf '%s%s' "$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")" "$extras"
    elif [ -n "$SOURCE" ]; then
        [ -f "$SOURCE/pyproject.toml" ] || die "--source: $SOURCE has no pyproject.toml"
        printf '%s%s' "$(cd "$SOURCE" && pwd)" "$extras"
    elif [ -n "$VERSION" ]; then
        printf '%s%s==%s' "$PACKAGE" "$extras" "$VERSION"
    else
        printf '%s%s' "$PACKAGE" "$extras"
    fi
}

install_agent() {
    local stamp venv
    stamp=$(date -u +%Y%m%dT%H%M%SZ)-$$
    venv="$PREFIX/venvs/$stamp"
    install -d -m 0755 "$PREFIX/venvs"
    say "creating the virtual environment $venv"
    "$PYTHON" -m venv "$venv"
    say "installing $(requirement)"
    if ! "$venv/bin/python" -m pip install --no-input --disable-pip-version-check -q \
        "${PIP_ARGS[@]}" "$(requirement)"; then
        rm -rf "$venv"
        die "pip could not install the agent (the previous installation is untouched)"
    fi
    "$venv/bin/ember-agent" --version >/dev/null || die "the installed ember-agent does not run"
    "$venv/bin/python" -c 'import agent; print(agent.__version__)' >"$venv/ember-version"
    # Atomic switch: a new symlink renamed over the old one.
    ln -sfn "venvs/$stamp" "$PREFIX/.current.new"
    mv -T "$PREFIX/.current.new" "$PREFIX/current"
    if [ ! -L "$PREFIX/bin" ]; then
        ln -sfn current/bin "$PREFIX/bin"
    fi
    ln -sfn "$PREFIX/bin/ember-agent" /usr/local/bin/ember-agent
    say "installed ember-agent $(cat "$venv/ember-version") in $venv"
    prune_venvs
}

# Keep the current environment and the one before it (for a rollback); remove older ones.
prune_venvs() {
    local current old
    current=$(readlink "$PREFIX/current")
    # Names are UTC times, so a reverse sort lists the newest first.
    find "$PREFIX/venvs" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -r | tail -n +3 |
        while read -r old; do
            if [ "venvs/$old" != "$current" ]; then
                rm -rf "${PREFIX:?}/venvs/$old"
            fi
        done
}

find_unit() {
    if [ -n "$UNIT_FILE" ]; then
        [ -f "$UNIT_FILE" ] || die "--unit: no such file $UNIT_FILE"
        printf '%s' "$UNIT_FILE"
    elif [ -f "$SCRIPT_DIR/../systemd/$UNIT_NAME" ]; then
        printf '%s' "$SCRIPT_DIR/../systemd/$UNIT_NAME"
    else
        "$(readlink -f "$PREFIX/current")/bin/python" -c \
            'import importlib.resources as r; print(r.files("agent") / "_data" / "ember-agent.service")'
    fi
}

install_unit() {
    local unit
    unit=$(find_unit)
    [ -f "$unit" ] || die "no systemd unit found (pass --unit systemd/$UNIT_NAME)"
    install -D -m 0644 "$unit" "$UNIT_DIR/$UNIT_NAME"
    # The shipped unit uses a transient user; here a static one owns the state and can read
    # the configuration (root:ember 0640) without it being world-readable.
    install -d -m 0755 "$UNIT_DIR/$UNIT_NAME.d"
    cat >"$UNIT_DIR/$UNIT_NAME.d/10-install.conf" <<EOF
# Written by $PROG: run as the static user that owns $STATE_DIR and reads $CONFIG.
[Service]
DynamicUser=no
User=$USER_NAME
Group=$USER_NAME
Environment=PATH=$PREFIX/bin:/usr/local/bin:/usr/bin:/bin
ExecStart=
ExecStart=$PREFIX/bin/ember-agent run --config $CONFIG
EOF
    say "installed $UNIT_DIR/$UNIT_NAME (drop-in $UNIT_NAME.d/10-install.conf)"
    if [ -f "$SCRIPT_DIR/agent.toml.example" ]; then
        install -D -m 0644 "$SCRIPT_DIR/agent.toml.example" "$(dirname "$CONFIG")/agent.toml.example"
    fi
}

write_config() {
    local dir tmp ca="" label key value
    dir=$(dirname "$CONFIG")
    install -d -m 0755 "$dir"
    if [ -n "$CA_FILE" ]; then
        [ -r "$CA_FILE" ] || die "--ca-file: cannot read $CA_FILE"
        ca="$dir/ca.pem"
        install -m 0644 "$CA_FILE" "$ca"
    fi
    [ "${#BROKERS[@]}" -gt 0 ] || BROKERS=("mqtt://127.0.0.1:1883")
    tmp=$(mktemp "$dir/.agent.toml.XXXXXX")
    {
        echo "# Written by $PROG on $(date -u +%Y-%m-%dT%H:%M:%SZ). Reference: docs/agent-config.md"
        echo "[agent]"
        [ -z "$AGENT_ID" ] || echo "id = $(toml_str "$AGENT_ID")"
        echo "state_dir = $(toml_str "$STATE_DIR")"
        [ -z "$TOPIC_PREFIX" ] || echo "topic_prefix = $(toml_str "$TOPIC_PREFIX")"
        echo "allow_code = $([ "$ALLOW_CODE" -eq 1 ] && echo true || echo false)"
        if [ "${#LABELS[@]}" -gt 0 ]; then
            printf 'labels = { '
            local first=1
            for label in "${LABELS[@]}"; do
                key=${label%%=*}
                value=${label#*=}
                [ "$first" -eq 1 ] || printf ', '
                printf '%s = %s' "$(toml_str "$key")" "$(toml_str "$value")"
                first=0
            done
            printf ' }\n'
        fi
        echo
        echo "[broker]"
        if [ "${#BROKERS[@]}" -eq 1 ]; then
            echo "url = $(toml_str "${BROKERS[0]}")"
        else
            echo "url = $(toml_list "${BROKERS[@]}")"
        fi
        [ -z "$USERNAME" ] && [ -n "$PASSWORD" ] && USERNAME=$AGENT_ID
        [ -z "$USERNAME" ] || echo "username = $(toml_str "$USERNAME")"
        [ -z "$PASSWORD" ] || echo "password = $(toml_str "$PASSWORD")"
        [ -z "$ca" ] || echo "ca_file = $(toml_str "$ca")"
        echo
        echo "[trust]"
        if [ "${#KEYS[@]}" -gt 0 ]; then
            echo "coordinator_keys = $(toml_list "${KEYS[@]}")"
        else
            echo "coordinator_keys = []"
        fi
        echo
        echo "[zeroconf]"
        echo "enabled = $([ "$ZEROCONF" -eq 1 ] && echo true || echo false)"
    } >"$tmp"
    chown "root:$USER_NAME" "$tmp"
    chmod 0640 "$tmp"
    PREVIOUS=""
    if [ -f "$CONFIG" ]; then
        PREVIOUS="$CONFIG.bak"
        cp -p "$CONFIG" "$PREVIOUS"
    fi
    mv -f "$tmp" "$CONFIG"
    say "wrote $CONFIG"
}

enroll() {
    local agent="$PREFIX/bin/ember-agent" args=()
    "$agent" enroll --help >/dev/null 2>&1 ||
        die "this agent ($("$agent" --version)) has no 'ember-agent enroll': pass --broker, --username and --password-file instead"
    [ -z "$AGENT_ID" ] || args+=(--id "$AGENT_ID")
    [ -z "$TOPIC_PREFIX" ] || args+=(--prefix "$TOPIC_PREFIX")
    [ -z "$CA_FILE" ] || args+=(--ca "$CA_FILE")
    say "enrolling with ${ENROLL_URL##*@}"
    # It merges the broker login, the CA and the coordinator's keys into the file written above.
    if ! "$agent" enroll --coordinator "$ENROLL_URL" --token "$TOKEN" --config "$CONFIG" \
        --state-dir "$STATE_DIR" "${args[@]}"; then
        # Leave the configuration as it was before this run.
        if [ -n "$PREVIOUS" ]; then
            mv -f "$PREVIOUS" "$CONFIG"
        else
            rm -f "$CONFIG"
        fi
        die "enrolment failed (see above): nothing was started"
    fi
    chown "root:$USER_NAME" "$CONFIG"
    chmod 0640 "$CONFIG"
}

check_config() {
    # The agent's own validation, as the service user, so a bad value fails here and now.
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$USER_NAME" -- "$PREFIX/bin/ember-agent" info --config "$CONFIG" >/dev/null ||
            die "the configuration $CONFIG is not usable (see the error above)"
    fi
}

enable_and_start() {
    local wants="$UNIT_DIR/multi-user.target.wants"
    if [ "$ENABLE" -eq 0 ]; then
        say "not enabling $UNIT_NAME (--no-enable)"
        return
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        systemctl enable "$UNIT_NAME" >/dev/null 2>&1
        if [ "$START" -eq 1 ]; then
            systemctl restart "$UNIT_NAME"
            say "started $UNIT_NAME: systemctl status ember-agent; journalctl -u ember-agent -f"
        else
            say "enabled $UNIT_NAME; it starts at the next boot (--no-start)"
        fi
        return
    fi
    # No running systemd (a chroot, an image build, a container): enable by hand, as
    # `systemctl enable` would, so the unit starts at the next boot.
    install -d -m 0755 "$wants"
    ln -sfn "$UNIT_DIR/$UNIT_NAME" "$wants/$UNIT_NAME"
    say "systemd is not running here: $UNIT_NAME is enabled and starts at the next boot."
    say "to run the agent now: runuser -u $USER_NAME -- $PREFIX/bin/ember-agent run --config $CONFIG"
}

main() {
    if [ "$INSTALL" -eq 1 ]; then
        ensure_python
    fi
    ensure_user
    if [ "$INSTALL" -eq 1 ]; then
        install_agent
        install_unit
    elif [ ! -x "$PREFIX/bin/ember-agent" ]; then
        die "--configure-only: no agent installed in $PREFIX"
    fi
    if [ "$CONFIGURE" -eq 0 ]; then
        say "installed without a configuration (--no-config): configure with $PROG --configure-only"
        return
    fi
    if [ -n "$ENROLL_URL" ]; then
        write_config
        enroll
    elif [ "$CONFIG_ARGS" -eq 1 ] || [ ! -f "$CONFIG" ]; then
        write_config
    else
        say "keeping the existing $CONFIG"
    fi
    check_config
    enable_and_start
}

main
