# One image for the four services; the command picks the service:
#   docker run afterglow serve segmentation --host 0.0.0.0
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY shared ./shared
COPY services ./services
RUN python -m venv /opt/afterglow \
 && /opt/afterglow/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/afterglow/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 afterglow \
 && useradd --system --uid 10001 --gid afterglow --no-create-home --shell /usr/sbin/nologin afterglow
COPY --from=build /opt/afterglow /opt/afterglow
ENV PATH=/opt/afterglow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AFTERGLOW_PROFILE=production
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["afterglow"]
CMD ["--help"]
