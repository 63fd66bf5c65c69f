"""A small Python client of diffusion-server (diffusion.v1.DiffusionService).

Needs only the Python standard library, grpcio and protobuf (Debian: python3-grpcio, which pulls in
python3-protobuf) plus the stubs generated from proto/diffusion/v1/diffusion.proto, importable as
`diffusion.v1.diffusion_pb2` / `diffusion.v1.diffusion_pb2_grpc` (put their folder on PYTHONPATH;
see README.md for the protoc command). The proto's field comments are the API documentation.

Errors: every call raises `grpc.RpcError` on a non-OK status (`err.code()` is a
`grpc.StatusCode`, `err.details()` the server's message); `ProtocolError` when a Generate stream
ends without a result; `ValueError` for a malformed tensor.

Thread-safety: a `DiffusionClient` may be shared by threads (gRPC channels and stubs are
thread-safe); `close()` it (or use it as a context manager) when done.
"""

import array
import json
import math
import random
import struct
import sys

import grpc

try:
    from diffusion.v1 import diffusion_pb2 as pb
    from diffusion.v1 import diffusion_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a setup problem, reported precisely
    raise ImportError(
        "diffusion_client: the generated stubs diffusion/v1/diffusion_pb2.py and "
        "diffusion_pb2_grpc.py are not importable; generate them from proto/ with\n"
        "  protoc -I proto --python_out=OUT --grpc_python_out=OUT "
        "--plugin=protoc-gen-grpc_python=$(command -v grpc_python_plugin) "
        "proto/diffusion/v1/diffusion.proto\n"
        "and put OUT on PYTHONPATH (" + str(e) + ")") from e

__all__ = ["DiffusionClient", "GenerateOutput", "ProtocolError", "Tensor", "flux_inputs", "pb"]

# dtype name -> (DType enum value, array typecode or None, bytes per element).
_DTYPES = {
    "float32": (pb.FLOAT32, "f", 4),
    "float64": (pb.FLOAT64, "d", 8),
    "int64": (pb.INT64, "q", 8),
    "int32": (pb.INT32, "i", 4),
    "float16": (pb.FLOAT16, None, 2),   # via struct "e"
    "bfloat16": (pb.BFLOAT16, None, 2),  # the upper half of a float32
}
_DTYPE_NAMES = {v[0]: k for k, v in _DTYPES.items()}
for _name, (_, _code, _size) in _DTYPES.items():
    if _code is not None and array.array(_code).itemsize != _size:
        raise ImportError(f"diffusion_client: array('{_code}') is not {_size} bytes here")

_LITTLE = sys.byteorder == "little"
_MANAGEMENT_TIMEOUT_S = 600.0


def _bfloat16_bits(word):
    """The bfloat16 nearest to the float32 with bits `word` (round half to even; NaN stays NaN)."""
    if (word & 0x7F800000) == 0x7F800000 and (word & 0x007FFFFF):
        return (word >> 16) | 0x0040
    return ((word + 0x7FFF + ((word >> 16) & 1)) >> 16) & 0xFFFF


class ProtocolError(RuntimeError):
    """The server broke the API contract (e.g. a Generate stream without a result)."""


class Tensor:
    """A dense row-major tensor: `dtype` (a name of _DTYPES), `shape` (tuple of ints) and `values`,
    a flat `array.array` ('f' for float32/float16/bfloat16, 'd', 'q', 'i') of prod(shape) items."""

    def __init__(self, values, shape, dtype="float32"):
        if dtype not in _DTYPES:
            raise ValueError(f"tensor dtype '{dtype}' is not one of {sorted(_DTYPES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor shape {shape} has a negative dimension")
        code = _DTYPES[dtype][1] or "f"
        self.values = values if isinstance(values, array.array) else array.array(code, values)
        self.shape = shape
        self.dtype = dtype
        if len(self.values) != math.prod(shape):
            raise ValueError(
                f"tensor of shape {shape} needs {math.prod(shape)} values, got {len(self.values)}")

    def to_proto(self):
        """The `diffusion.v1.Tensor` message (little-endian bytes)."""
        enum, code, _ = _DTYPES[self.dtype]
        if self.dtype == "float16":
            try:
                data = struct.pack(f"<{len(self.values)}e", *self.values)
            except (OverflowError, struct.error) as e:
                raise ValueError(f"tensor values do not fit float16: {e}") from e
        elif self.dtype == "bfloat16":
            words = array.array("I", array.array("f", self.values).tobytes())
            out = array.array("H", (_bfloat16_bits(w) for w in words))
            if not _LITTLE:
                out.byteswap()
            data = out.tobytes()
        else:
            vals = array.array(code, self.values)
            if not _LITTLE:
                vals.byteswap()
            data = vals.tobytes()
        return pb.Tensor(dtype=enum, shape=list(self.shape), data=data)

    @classmethod
    def from_proto(cls, message, what="tensor"):
        """Decodes a `diffusion.v1.Tensor`; ValueError naming `what` if it is malformed."""
        if message.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{what}: unsupported dtype {message.dtype}")
        dtype = _DTYPE_NAMES[message.dtype]
        _, code, size = _DTYPES[dtype]
        shape = tuple(message.shape)
        count = math.prod(shape)
        if len(message.data) != count * size:
            raise ValueError(f"{what}: {len(message.data)} bytes for shape {list(shape)} of {dtype}"
                             f" (expected {count * size})")
        if dtype == "float16":
            values = array.array("f", struct.unpack(f"<{count}e", message.data))
        elif dtype == "bfloat16":
            halves = array.array("H", message.data)
            if not _LITTLE:
                halves.byteswap()
            values = array.array("f", struct.pack(f"={count}I", *(h << 16 for h in halves)))
        else:
            values = array.array(code, message.data)
            if not _LITTLE:
                values.byteswap()
        return cls(values, shape, dtype)

    def tolist(self):
        """The values as nested lists of the tensor's shape."""
        def build(offset, dims):
            if not dims:
                return self.values[offset]
            stride = math.prod(dims[1:])
            return [build(offset + i * stride, dims[1:]) for i in range(dims[0])]
        return build(0, self.shape) if self.shape else self.values[0]


class GenerateOutput:
    """A finished Generate: `result` (the GenerateResult message), `latents` (a Tensor, or None
    when the server sent none), `images` (PNG bytes, one per image; empty for a bare transformer
    instance) and `progress` (the GenerateProgress messages, in order)."""

    def __init__(self, result, latents, progress):
        self.result = result
        self.latents = latents
        self.images = list(result.images)
        self.progress = progress


class DiffusionClient:
    """A connection to one diffusion-server.

    target: "host:port". token: the admin bearer token, sent (as `authorization: Bearer <token>`)
    on management calls only (LoadSingleFile, UnloadModel, LoadLoRA, UnloadLoRA, LoadIPAdapter,
    UnloadIPAdapter). root_certificates:
    PEM bytes of the CA that signed the server's certificate, for a server run with --tls_cert
    (None: plaintext). timeout: default per-call deadline in seconds for the read-only calls.
    """

    def __init__(self, target, token=None, root_certificates=None, timeout=60.0,
                 max_message_bytes=64 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.DiffusionServiceStub(self._channel)
        self._token = token
        self.timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _admin(self):
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    # ---- read-only calls ------------------------------------------------------------------------

    def list_models(self):
        """ListModelsResponse: every instance with its state and adapters."""
        return self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)

    def get_metadata(self, name, verbose=False):
        """GetMetadataResponse of an instance, a model class or a registry alias."""
        return self._stub.GetMetadata(pb.GetMetadataRequest(name=name, verbose=verbose),
                                      timeout=self.timeout)

    @staticmethod
    def config(metadata):
        """The instance's model config (diffusers config.json) of a GetMetadataResponse as a dict;
        ValueError if the response has none (it named a class, not an instance)."""
        if not metadata.config_json:
            raise ValueError(f"metadata of '{metadata.class_name}' carries no config_json "
                             "(ask for an instance name)")
        return json.loads(metadata.config_json)

    @staticmethod
    def feature(metadata, attribute):
        """The typed value of feature row `attribute` (bool, int, str or list of str); KeyError if
        the model has no such row."""
        for row in metadata.features:
            if row.attribute == attribute:
                kind = row.WhichOneof("value")
                if kind == "list_value":
                    return list(row.list_value.values)
                return getattr(row, kind) if kind else None
        raise KeyError(f"model '{metadata.class_name}' has no feature row '{attribute}'")

    def list_loras(self, model):
        return self._stub.ListLoRAs(pb.ListLoRAsRequest(model=model), timeout=self.timeout)

    # ---- management calls (need the token) ------------------------------------------------------

    def load_single_file(self, name, path, config_json="", dtype="", device="", replace=False,
                         storage_dtype="", group_offload=None, device_map="",
                         max_memory_bytes=None, timeout=_MANAGEMENT_TIMEOUT_S):
        """Loads a checkpoint under the server's --model_root as instance `name`.

        storage_dtype: layerwise casting ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2").
        group_offload: a dict of GroupOffloadConfig fields, e.g. {"blocks_per_group": 1,
        "prefetch": True}. device_map: "sequential" (with max_memory_bytes, a dict device ->
        bytes) or an explicit JSON object text."""
        request = pb.LoadSingleFileRequest(name=name, path=path, config_json=config_json,
                                           dtype=dtype, device=device, replace=replace,
                                           storage_dtype=storage_dtype, device_map=device_map)
        if group_offload is not None:
            request.group_offload.CopyFrom(pb.GroupOffloadConfig(**group_offload))
        for device_name, budget in (max_memory_bytes or {}).items():
            request.max_memory_bytes[device_name] = int(budget)
        return self._stub.LoadSingleFile(request, metadata=self._admin(), timeout=timeout)

    def unload_model(self, name, timeout=_MANAGEMENT_TIMEOUT_S):
        return self._stub.UnloadModel(pb.UnloadModelRequest(name=name), metadata=self._admin(),
                                      timeout=timeout)

    def load_lora(self, model, name, path=None, data=None, format_hint="", allow_partial=False,
                  replace=False, pin=False, timeout=_MANAGEMENT_TIMEOUT_S):
        """Loads an adapter into instance `model`: from `path` (under the server's --adapter_root)
        or from `data` (the safetensors file's bytes, sent inline); exactly one of them.
        Returns LoadLoRAResponse (adapter info with sha256, conversion report)."""
        if (path is None) == (data is None):
            raise ValueError("load_lora: give exactly one of path and data")
        request = pb.LoadLoRARequest(model=model, name=name, format_hint=format_hint,
                                     allow_partial=allow_partial, replace=replace, pin=pin)
        if path is not None:
            request.path = path
        else:
            request.inline_bytes = bytes(data)
        return self._stub.LoadLoRA(request, metadata=self._admin(), timeout=timeout)

    def unload_lora(self, model, name, timeout=_MANAGEMENT_TIMEOUT_S):
        return self._stub.UnloadLoRA(pb.UnloadLoRARequest(model=model, name=name),
                                     metadata=self._admin(), timeout=timeout)

    def load_ip_adapter(self, model, name, path, image_encoder_path="", replace=False,
                        timeout=_MANAGEMENT_TIMEOUT_S):
        """Loads an IP-Adapter into pipeline instance `model` (GetMetadata's
        limits.supports_ip_adapter) from `path` under the server's --adapter_root, with the image
        encoder folder `image_encoder_path` under its --model_root ("" = the pipeline's
        image_encoder component). Returns LoadIPAdapterResponse (adapter info: format, num_layers,
        image_embed_dim, ...)."""
        request = pb.LoadIPAdapterRequest(model=model, name=name, path=path,
                                          image_encoder_path=image_encoder_path, replace=replace)
        return self._stub.LoadIPAdapter(request, metadata=self._admin(), timeout=timeout)

    def unload_ip_adapter(self, model, name, timeout=_MANAGEMENT_TIMEOUT_S):
        return self._stub.UnloadIPAdapter(pb.UnloadIPAdapterRequest(model=model, name=name),
                                          metadata=self._admin(), timeout=timeout)

    # ---- Generate -------------------------------------------------------------------------------

    def generate_images(self, model, prompt_embeds, pooled_prompt_embeds=None, width=0, height=0,
                        num_images=0, seed=0, steps=0, guidance=0.0, true_cfg_scale=0.0,
                        negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                        noise=None, adapters=(), ip_adapters=(), return_latents=False,
                        on_progress=None, timeout=600.0, cache=None):
        """Runs a pipeline instance (ListModels' pipeline_class set, e.g. the embedded
        "flux-tiny") and returns a GenerateOutput whose `images` are the PNG bytes, one per image.

        prompt_embeds: a Tensor [L, D] or [P, L, D] (D = GetMetadata's
        generate_limits.prompt_embeds_dim); pooled_prompt_embeds [D_pooled] or [P, D_pooled].
        width/height in pixels (0 = the pipeline's default; multiples of
        generate_limits.image_size_multiple). true_cfg_scale > 1 with negative embeddings runs true
        classifier-free guidance. noise: optional initial latents (unpacked [B, C, h, w]); otherwise
        the server draws them from `seed`. adapters and on_progress as in generate().
        ip_adapters: image prompts through IP-Adapters loaded with load_ip_adapter, an iterable of
        (name, image) or (name, image, scale): image the PNG file's bytes or a Tensor of image
        embeddings ([E], [1, E] or [1, N, E]); scale a number or a list with one per conditioned
        layer (default 1). ValueError for an entry of another form.
        cache: a step cache, a dict of CacheConfig fields, e.g. {"type": "first_block_cache",
        "threshold": 0.1} or {"type": "taylorseer_cache", "cache_interval": 5}; the result's
        cache_skipped_steps / cache_computed_steps say what it skipped.
        """
        request = pb.GenerateRequest(model=model, seed=seed, steps=steps, guidance=guidance,
                                     width=width, height=height, num_images=num_images,
                                     true_cfg_scale=true_cfg_scale)
        request.output = (pb.GenerateRequest.OUTPUT_PNG_AND_LATENTS if return_latents
                          else pb.GenerateRequest.OUTPUT_PNG)
        request.prompt_embeds.CopyFrom(prompt_embeds.to_proto())
        for field, tensor in (("pooled_prompt_embeds", pooled_prompt_embeds),
                              ("negative_prompt_embeds", negative_prompt_embeds),
                              ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
                              ("noise", noise)):
            if tensor is not None:
                getattr(request, field).CopyFrom(tensor.to_proto())
        self._add_adapters(request, adapters)
        self._add_ip_adapters(request, ip_adapters)
        if cache is not None:
            request.cache.CopyFrom(pb.CacheConfig(**cache))
        return self._run_generate(request, on_progress, timeout)

    @staticmethod
    def _add_ip_adapters(request, ip_adapters):
        for i, entry in enumerate(ip_adapters):
            if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
                raise ValueError(f"ip_adapters[{i}]: expected (name, image) or (name, image, "
                                 f"scale), got {entry!r}")
            name, image = entry[0], entry[1]
            ip = request.ip_adapters.add(name=name)
            if isinstance(image, Tensor):
                ip.image_embeds.CopyFrom(image.to_proto())
            elif isinstance(image, (bytes, bytearray, memoryview)):
                ip.image = bytes(image)
            else:
                raise ValueError(f"ip_adapters[{i}]: the image must be PNG bytes or a Tensor of "
                                 f"image embeddings, got {type(image).__name__}")
            if len(entry) == 3:
                scale = entry[2]
                ip.scale.extend(float(v) for v in (scale if isinstance(scale, (list, tuple))
                                                   else (scale,)))

    @staticmethod
    def _add_adapters(request, adapters):
        for adapter in adapters:
            if isinstance(adapter, str):
                request.adapters.add(name=adapter)
            else:
                name, weight = adapter
                request.adapters.add(name=name, weight=float(weight))

    def generate(self, model, inputs, latent_shape=None, latents=None, seed=0, steps=0,
                 guidance=0.0, adapters=(), return_latents=True, on_progress=None, timeout=600.0):
        """Runs a generation on a bare transformer instance and waits for its result.

        inputs: {input name: Tensor} (the model's forward inputs besides the latents and the
        timestep; see GetMetadata.required_inputs). Either `latents` (a Tensor of the initial
        noise) or `latent_shape` (then the server draws the noise from `seed`). adapters: an
        iterable of names or (name, weight) pairs. on_progress(step, total_steps, elapsed_seconds)
        is called for each progress event as it arrives (if it raises, the call is cancelled and the
        exception propagates). Returns a GenerateOutput.
        """
        request = pb.GenerateRequest(model=model, seed=seed, steps=steps, guidance=guidance,
                                     return_latents=return_latents)
        for name, tensor in inputs.items():
            request.inputs[name].CopyFrom(tensor.to_proto())
        if latents is not None:
            request.latents.CopyFrom(latents.to_proto())
        if latent_shape is not None:
            request.latent_shape.extend(int(d) for d in latent_shape)
        self._add_adapters(request, adapters)
        return self._run_generate(request, on_progress, timeout)

    def _run_generate(self, request, on_progress, timeout):
        progress, result = [], None
        call = self._stub.Generate(request, timeout=timeout)
        try:
            for message in call:
                kind = message.WhichOneof("event")
                if kind == "progress":
                    progress.append(message.progress)
                    if on_progress is not None:
                        p = message.progress
                        on_progress(p.step, p.total_steps, p.elapsed_seconds)
                elif kind == "result":
                    result = message.result
        except BaseException:
            call.cancel()  # e.g. on_progress raised or KeyboardInterrupt: stop the server's work
            raise
        if result is None:
            raise ProtocolError("Generate stream ended without a result")
        decoded = None
        if result.HasField("latents"):
            decoded = Tensor.from_proto(result.latents, "GenerateResult.latents")
        return GenerateOutput(result, decoded, progress)


def _gaussian(rng, count):
    return array.array("f", (rng.gauss(0.0, 1.0) for _ in range(count)))


def random_prompt_embeds(limits, text_tokens, seed=0):
    """Random (prompt_embeds [text_tokens, D], pooled_prompt_embeds [D_pooled]) for a pipeline
    instance whose GetMetadata limits are `limits` (prompt_embeds_dim, pooled_prompt_embeds_dim):
    stand-ins for text-encoder outputs in demos and tests."""
    rng = random.Random(seed)
    dim, pooled = limits.prompt_embeds_dim, limits.pooled_prompt_embeds_dim
    if dim <= 0 or pooled <= 0:
        raise ValueError("these limits are not a pipeline instance's (no embedding widths)")
    return (Tensor(_gaussian(rng, text_tokens * dim), (text_tokens, dim)),
            Tensor(_gaussian(rng, pooled), (pooled,)))


def png_size(data):
    """(width, height) from a PNG's IHDR chunk; ValueError if `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", data[16:24])


def flux_inputs(config, height, width, text_tokens, seed=0, batch=1):
    """Forward inputs of a Flux-family model for a `height` x `width` grid of image tokens and
    `text_tokens` text tokens, with dims read from the instance's `config` (GetMetadata's
    config_json): random `encoder_hidden_states` [batch, text_tokens, joint_attention_dim] and
    `pooled_projections` [batch, pooled_projection_dim], grid `img_ids` [height*width, axes]
    (column 1 = row, column 2 = col) and zero `txt_ids` [text_tokens, axes], where axes =
    len(axes_dims_rope). Returns (inputs, latent_shape) with latent_shape [batch, height*width,
    in_channels]. KeyError naming a config field the model lacks."""
    for key in ("joint_attention_dim", "pooled_projection_dim", "in_channels", "axes_dims_rope"):
        if key not in config or config[key] is None:
            raise KeyError(f"model config has no '{key}'")
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    axes = len(config["axes_dims_rope"])
    if axes < 3:
        raise ValueError(f"axes_dims_rope {config['axes_dims_rope']} has fewer than 3 axes")
    rng = random.Random(seed)
    tokens = height * width
    img_ids = array.array("f", [0.0] * (tokens * axes))
    for i in range(tokens):
        img_ids[i * axes + 1] = float(i // width)
        img_ids[i * axes + 2] = float(i % width)
    inputs = {
        "encoder_hidden_states": Tensor(_gaussian(rng, batch * text_tokens * joint),
                                        (batch, text_tokens, joint)),
        "pooled_projections": Tensor(_gaussian(rng, batch * pooled), (batch, pooled)),
        "img_ids": Tensor(img_ids, (tokens, axes)),
        "txt_ids": Tensor(array.array("f", [0.0] * (text_tokens * axes)), (text_tokens, axes)),
    }
    return inputs, (batch, tokens, int(config["in_channels"]))
