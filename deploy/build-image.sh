#!/usr/bin/env bash
# The OCI image of the agent, from Debian packages, with no container daemon and
# no registry (`make image` runs this; docs/deploy.md pushes the result):
#   layer 1  a Debian root file system from mmdebstrap: the Essential packages,
#            python3, libbpf1, libstdc++6 (numpy) and mount (the DaemonSet's init container mounts
#            bpffs); no apt, docs, man pages, locales or gconv modules. Cached
#            under build/image/ by a hash of everything mmdebstrap is given.
#   layer 2  /opt/ebpf-telemetry/venv: the wheel and its dependencies from PyPI
#            (cffi, prometheus_client, structlog, kubernetes and its
#            dependencies: Debian 12's are too old for pyproject.toml),
#            installed by the image's own python3 in a chroot, with pip run
#            from its wheel so that no pip stays in the image.
# umoci assembles the layers and the config into an OCI archive.
# Usage: deploy/build-image.sh WHEEL OUT.oci.tar   (PIP: the host's pip)
# The host's pip fetches the dependencies' wheels: IMAGE_SUITE's python3 must
# be the host's (Debian 12 on both: 3.11).
set -euo pipefail

wheel=$(realpath "$1")
out=$2
pip=${PIP:-pip}
suite=${IMAGE_SUITE:-bookworm}
mirror=${IMAGE_MIRROR:-http://deb.debian.org/debian}
security=${IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
packages=python3,libbpf1,mount,libstdc++6  # libstdc++6: numpy's C++ parts
arch=$(dpkg --print-architecture)
version=$(basename "$wheel" | cut -d- -f2)
venv=/opt/ebpf-telemetry/venv
work=build/image

base_args=(
    --variant=essential --architectures="$arch" --include="$packages"
    # usr-is-merged instead of the usrmerge package, which pulls in perl (45 MB)
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/lib/*/gconv/*'
)
mirrors=("deb $mirror $suite main" "deb $mirror $suite-updates main"
    "deb $security $suite-security main")
key=$(printf '%s\n' "${base_args[@]}" "$suite" "${mirrors[@]}" | sha256sum | cut -c1-16)
base=$work/base-$suite-$arch-$key.tar
mkdir -p "$work" "$(dirname "$out")"
if [ ! -f "$base" ]; then
    echo "mmdebstrap: $suite $packages -> $base"
    mmdebstrap --quiet --format=tar "${base_args[@]}" "$suite" "$base.part" "${mirrors[@]}"
    mv "$base.part" "$base"
fi

root=$work/rootfs
rm -rf "$root" "$work/wheels" "$work/app.tar"
mkdir -p "$root" "$work/wheels"
tar -C "$root" -xf "$base"
"$pip" download -q --disable-pip-version-check --only-binary=:all: -d "$work/wheels" "$wheel" pip
pip_whl=$(cd "$work/wheels" && ls pip-*.whl)
cp -r "$work/wheels" "$root/tmp/wheels"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
in_root python3 -m venv --without-pip "$venv"
in_root "$venv/bin/python" "/tmp/wheels/$pip_whl/pip" install -q --no-index \
    --find-links=/tmp/wheels --no-cache-dir --disable-pip-version-check \
    --root-user-action=ignore "/tmp/wheels/$(basename "$wheel")"
rm -rf "$root/tmp/wheels"
tar -C "$root" --sort=name --numeric-owner -cf "$work/app.tar" ./opt

layout=$work/oci
image=$layout:$version
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$image"
umoci raw add-layer --image "$image" --history.created_by "mmdebstrap $suite $packages" "$base"
umoci raw add-layer --image "$image" --history.created_by "pip install $(basename "$wheel")" \
    "$work/app.tar"
umoci config --image "$image" --architecture="$arch" --os=linux \
    --config.entrypoint=ebpf-telemetry --config.cmd=run --config.workingdir=/ \
    --config.env="PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.label=org.opencontainers.image.title=ebpf-telemetry \
    --config.label=org.opencontainers.image.version="$version" \
    --history.created_by "entrypoint ebpf-telemetry run"
umoci gc --layout "$layout"
tar -C "$layout" --sort=name --numeric-owner -cf "$out.part" oci-layout index.json blobs
mv "$out.part" "$out"
rm -rf "$root" "$work/app.tar"
echo "$out: $(du -h "$out" | cut -f1)"
