#!/bin/bash -e
# pi-gen, on the build host: put the installer, the agent and the first-boot configuration into
# the image. 00-run-chroot.sh then installs the agent inside the image.
#
# Where the agent comes from: a wheel in files/ (edge_images/rpi/build-wheel.sh puts one
# there), else ember-fl==${EMBER_VERSION} from the package index, else its newest release.
# EMBER_REPO is the Ember checkout (default: four levels up from this directory).

REPO="${EMBER_REPO:-$(cd ../../../.. && pwd)}"
STAGING="${ROOTFS_DIR}/tmp/ember-install"
BOOT="${ROOTFS_DIR}/boot/firmware"

install -d -m 0755 "${STAGING}"
install -m 0755 "${REPO}/edge_images/install.sh" "${STAGING}/install.sh"
install -m 0644 "${REPO}/edge_images/agent.toml.example" "${STAGING}/agent.toml.example"
install -D -m 0644 "${REPO}/systemd/ember-agent.service" "${STAGING}/ember-agent.service"

: >"${STAGING}/args"
wheel=""
for candidate in files/ember_fl-*.whl; do
	if [ -f "${candidate}" ]; then
		wheel="${candidate}"
	fi
done
if [ -n "${wheel}" ]; then
	install -m 0644 "${wheel}" "${STAGING}/"
	echo "--wheel /tmp/ember-install/$(basename "${wheel}")" >>"${STAGING}/args"
elif [ -n "${EMBER_VERSION:-}" ]; then
	echo "--version ${EMBER_VERSION}" >>"${STAGING}/args"
fi
if [ -n "${EMBER_EXTRAS:-}" ]; then
	echo "--extras ${EMBER_EXTRAS}" >>"${STAGING}/args"
fi

# The same script configures the agent on first boot (cloud-init calls it).
install -D -m 0755 "${REPO}/edge_images/install.sh" "${ROOTFS_DIR}/usr/local/sbin/ember-agent-setup"

# cloud-init reads user-data and meta-data from the boot partition (NoCloud, label bootfs).
install -D -m 0644 files/99-ember-nocloud.cfg "${ROOTFS_DIR}/etc/cloud/cloud.cfg.d/99-ember-nocloud.cfg"
install -D -m 0644 files/user-data "${BOOT}/user-data"
install -D -m 0644 files/meta-data "${BOOT}/meta-data"
