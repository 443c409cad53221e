"""Ray Serve application for a trained encoder folder: an OpenAI-compatible `/v1/embeddings`.

Modules: `config` (ServeConfig: limits, batching, replicas, recovery), `protocol` (pydantic request and
response models, validation), `replica` (the FastAPI ingress replica; imported inside Ray only),
`app` (typed `build_app(ServeArgs)`, deploy/undeploy), `client` (HTTP client, parity check),
`lifecycle` (stay up until Ctrl-C/SIGTERM, then leave nothing behind).

Routes (below the route prefix; the OpenAPI schema at /docs and /openapi.json):
    POST /v1/embeddings   {"input": str | [str], "model"?, "encoding_format"?: "float" | "base64",
                           "dimensions"?: int, "instruction"?: str}
    GET  /v1/models       the served model: revision, pooling, device, dtype, torch threads
    GET  /health          200 when the replica is up (never needs the key)
`instruction` is our extension: texts sent with it are queries (E5 style), without it documents.
Texts past the model's `max_length` tokens (or the character limit derived from it) are cut under
truncation="truncate" (the default; the header `X-Truncated-Inputs` lists them) or refused (413)
under "error". When the env var named by `api_key_env` holds a key, `/v1/*` needs
`Authorization: Bearer KEY`; without a key only loopback hosts and clients are served.

    serve run mgh_ray.serving:build_app model_dir=runs/tiny/train/model num_replicas=2
    mgh-ray serve jobs/configs/tiny.yaml --model runs/tiny/train/model   # deploy, check parity, stay up

In a Serve config file (`serve deploy serve.yaml`), `args` takes the same keys:

    applications:
      - name: mgh-embedder
        route_prefix: /
        import_path: mgh_ray.serving:build_app
        args: {model_dir: /abs/runs/tiny/train/model, autoscaling: {min_replicas: 1, max_replicas: 4}}

Recovery: Serve probes each replica every `health_check_period_s` (2 s here, 10 s in Serve) and
replaces one that fails or dies; with one replica, requests fail or wait until the new one has
loaded the model, so keep `num_replicas` >= 2 where the CPUs allow. A dead HTTP proxy is restarted
by Serve's controller; clients should retry refused connections.
"""

from mgh_ray.serving.app import ServeArgs, application, build_app, deploy, start_app, undeploy, wait_running
from mgh_ray.serving.client import PARITY_INSTRUCTION, EmbeddingClient, check_parity, min_cosine, parity_floor
from mgh_ray.serving.config import (
           CLUSTER_ENV,
           AutoscalingSection,
           ServeConfig,
           api_key,
           apply_cluster_env,
           base_url,
           check_public,
           is_loopback,
)
from mgh_ray.serving.lifecycle import serving_until_signal
from mgh_ray.serving.protocol import (
           EmbeddingRequest,
           EmbeddingResponse,
           RequestError,
           decode_b64,
           encode_b64,
           model_revision,
           parse_request,
           served_name,
           shorten,
)

__all__ = ["PARITY_INSTRUCTION", "AutoscalingSection", "EmbeddingClient", "EmbeddingRequest",
           "EmbeddingResponse", "RequestError", "ServeArgs", "ServeConfig", "CLUSTER_ENV", "api_key",
           "application", "apply_cluster_env",
           "base_url", "build_app", "check_parity", "check_public", "decode_b64", "deploy", "encode_b64",
           "is_loopback", "min_cosine", "parity_floor", "model_revision", "parse_request", "served_name",
           "serving_until_signal", "shorten", "start_app", "undeploy", "wait_running"]
