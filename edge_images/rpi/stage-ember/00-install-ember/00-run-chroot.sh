#!/bin/bash -e
# pi-gen, inside the image: install the agent (user, virtual environment, unit) without a
# configuration; cloud-init writes that on first boot from the boot partition's user-data.
cd /tmp/ember-install
# One option and its value per line, written by 00-run.sh.
args=()
while read -r option value; do
	args+=("${option}" "${value}")
done <args
./install.sh --no-config --unit ember-agent.service "${args[@]}"
cd /
rm -rf /tmp/ember-install
