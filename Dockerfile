# qmp-proxy in a container: the same entry point as everywhere, run as a non-root user (uid and gid 10001).
# Volumes (README, "Container"):
#   /run/qemu           the directory holding QEMU's QMP socket, named qmp.sock for the default CMD;
#                       uid 10001 must be allowed to connect to it (write permission on the socket)
#   /run/qmp-proxy      the proxy's sockets: qmp.sock for clients, control.sock for `qmp-proxy status`
#   /var/lib/qmp-proxy  the crash-safety journal ($STATE_DIRECTORY): a named volume, or a host
#                       directory owned by uid 10001 with mode 0700 (the proxy refuses any other)
#   /etc/qmp-proxy      optional: a config file, for many VMs or per-socket policies
# One VM, with the default CMD:
#   docker run -d -v /run/qemu/vm1:/run/qemu -v /run/qmp-proxy/vm1:/run/qmp-proxy \
#     -v qmp-proxy-vm1:/var/lib/qmp-proxy -p 127.0.0.1:9740:9740 qmp-proxy
# With a config file; keep --metrics, the HEALTHCHECK reads it:
#   docker run -d -v /run/qemu:/run/qemu -v /run/qmp-proxy:/run/qmp-proxy \
#     -v qmp-proxy-state:/var/lib/qmp-proxy -v /etc/qmp-proxy:/etc/qmp-proxy:ro \
#     -p 127.0.0.1:9740:9740 qmp-proxy --config /etc/qmp-proxy/qmp-proxy.toml --metrics 0.0.0.0:9740
# tests/test_container.py runs both lines' mounts and arguments as this file states them.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip install --no-cache-dir . \
 && groupadd --system --gid 10001 qmp-proxy \
 && useradd --system --uid 10001 --gid qmp-proxy --no-create-home qmp-proxy \
 && mkdir -p /run/qmp-proxy /var/lib/qmp-proxy \
 && chown qmp-proxy:qmp-proxy /run/qmp-proxy /var/lib/qmp-proxy \
 && chmod 0700 /var/lib/qmp-proxy
USER qmp-proxy
# The journal's default place whatever arguments replace CMD (a volume keeps it across restarts).
ENV STATE_DIRECTORY=/var/lib/qmp-proxy
VOLUME ["/run/qmp-proxy", "/var/lib/qmp-proxy"]
EXPOSE 9740
HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9740/healthz').status != 200)"
ENTRYPOINT ["qmp-proxy"]
# One VM: QEMU's socket in the /run/qemu mount, the clients' in /run/qmp-proxy.  Metrics on all
# container addresses so a published port can be scraped; /healthz for HEALTHCHECK.
CMD ["--upstream", "unix:/run/qemu/qmp.sock", "--listen", "unix:/run/qmp-proxy/qmp.sock", "--metrics", "0.0.0.0:9740"]
