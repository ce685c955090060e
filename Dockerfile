# domcapture worker / recovery image.  libvirtd stays on the host: mount its
# socket (/run/libvirt/libvirt-sock) and the disk and backup folders at the
# same paths as on the host, since libvirt and the workers share file paths.
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev python3-libnbd gcc pkg-config \
        libvirt-dev libvirt-clients qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/domcapture
COPY pyproject.toml README.md ./
COPY workflows ./workflows
COPY workers ./workers
RUN python3 -m venv --system-site-packages /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["domcapture"]
