# qmp-proxy in a container: the same entry point as everywhere, run as a non-root user.
# Mount the directory holding QEMU's QMP socket and the one for the proxy's sockets, e.g.
#   docker run -v /run/qemu:/run/qemu -v /run/qmp-proxy:/run/qmp-proxy -v /etc/qmp-proxy:/etc/qmp-proxy:ro \
#     qmp-proxy --config /etc/qmp-proxy/vm1.toml
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip install --no-cache-dir . \
 && useradd --system --uid 10001 --user-group --no-create-home qmp-proxy \
 && mkdir -p /run/qmp-proxy \
 && chown qmp-proxy:qmp-proxy /run/qmp-proxy
USER qmp-proxy
VOLUME ["/run/qmp-proxy"]
EXPOSE 9740
HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9740/healthz').status != 200)"
ENTRYPOINT ["qmp-proxy"]
# Metrics on all container addresses so a published port can be scraped; /healthz for HEALTHCHECK.
CMD ["--config", "/etc/qmp-proxy/qmp-proxy.toml", "--metrics", "0.0.0.0:9740"]
