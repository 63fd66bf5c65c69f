// A small Node.js (18+) client of diffusion-server (diffusion.v1.DiffusionService).
//
// Loads proto/diffusion/v1/diffusion.proto at run time with @grpc/proto-loader (the proto is the
// single source of truth; its field comments are the API documentation). Messages are plain
// objects with the proto's field names (keepCase): int64 fields are Numbers, enums are their names
// ('READY', 'FLOAT32'), bytes are Buffers, and a set oneof is named by its virtual field (e.g.
// `message.event === 'progress'`, `row.value === 'list_value'`).
//
// Errors: every call returns a Promise that rejects with grpc-js's ServiceError on a non-OK status
// (`err.code` is a `grpc.status` number, `err.details` the server's message); with ProtocolError
// when a Generate stream ends without a result; Tensor methods throw RangeError/TypeError for a
// malformed tensor.
'use strict';

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// proto/ of this repository; DS_PROTO_ROOT or the protoRoot option override it.
const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'diffusion/v1/diffusion.proto';
const MANAGEMENT_TIMEOUT_S = 600;
const LITTLE_ENDIAN = os.endianness() === 'LE';

class ProtocolError extends Error {}

// The diffusion.v1 package object (service constructor and message types) of the proto under
// `protoRoot`; cached per root.
const packages = new Map();
function loadApi(protoRoot = process.env.DS_PROTO_ROOT || DEFAULT_PROTO_ROOT) {
  if (!packages.has(protoRoot)) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [protoRoot],
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    packages.set(protoRoot, grpc.loadPackageDefinition(definition).diffusion.v1);
  }
  return packages.get(protoRoot);
}

// ------------------------------------------------------------------------------------------------
// Tensors

// IEEE half <-> float32 (Node 18 has no Float16Array).
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}
function floatToHalf(value) {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);  // Inf / NaN
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;                             // overflow -> Inf
  if (e <= 0) {                                                  // subnormal or zero
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rest > halfway || (rest === halfway && (half & 1))) half += 1;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1))) half += 1;  // may carry into Inf: right
  return sign | half;
}
function floatToBfloat16(value) {
  f32[0] = value;
  const x = u32[0];
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff)) return (x >>> 16) | 0x40;  // NaN
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

// dtype name -> [proto enum name, bytes per element, typed array the values live in].
const DTYPES = {
  float32: ['FLOAT32', 4, Float32Array],
  float64: ['FLOAT64', 8, Float64Array],
  int32: ['INT32', 4, Int32Array],
  int64: ['INT64', 8, BigInt64Array],
  float16: ['FLOAT16', 2, Float32Array],
  bfloat16: ['BFLOAT16', 2, Float32Array],
};
const DTYPE_BY_ENUM = Object.fromEntries(Object.entries(DTYPES).map(([k, v]) => [v[0], k]));

// A dense row-major tensor: `dtype` (a DTYPES name), `shape` (array of Numbers) and `values`, a
// flat typed array of prod(shape) items (Float32Array for float32/float16/bfloat16, Float64Array,
// Int32Array, BigInt64Array).
class Tensor {
  constructor(values, shape, dtype = 'float32') {
    if (!(dtype in DTYPES)) {
      const known = Object.keys(DTYPES).join(', ');
      throw new TypeError(`tensor dtype '${dtype}' is not one of ${known}`);
    }
    const Typed = DTYPES[dtype][2];
    this.dtype = dtype;
    this.shape = Array.from(shape, Number);
    if (this.shape.some((d) => !Number.isInteger(d) || d < 0)) {
      throw new RangeError(`tensor shape [${this.shape}] is not a list of sizes`);
    }
    this.values = values instanceof Typed ? values
        : Typed.from(values, Typed === BigInt64Array ? (v) => BigInt(v) : undefined);
    const count = this.shape.reduce((a, b) => a * b, 1);
    if (this.values.length !== count) {
      throw new RangeError(
          `tensor of shape [${this.shape}] needs ${count} values, got ${this.values.length}`);
    }
  }

  // The diffusion.v1.Tensor message (little-endian bytes).
  toProto() {
    const [enumName, size] = DTYPES[this.dtype];
    const n = this.values.length;
    const data = Buffer.alloc(n * size);
    if (this.dtype === 'float16' || this.dtype === 'bfloat16') {
      const convert = this.dtype === 'float16' ? floatToHalf : floatToBfloat16;
      for (let i = 0; i < n; ++i) data.writeUInt16LE(convert(this.values[i]), 2 * i);
    } else if (LITTLE_ENDIAN) {
      Buffer.from(this.values.buffer, this.values.byteOffset, n * size).copy(data);
    } else {
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const set = {float32: 'setFloat32', float64: 'setFloat64', int32: 'setInt32',
        int64: 'setBigInt64'}[this.dtype];
      for (let i = 0; i < n; ++i) view[set](i * size, this.values[i], true);
    }
    return {dtype: enumName, shape: this.shape, data};
  }

  // Decodes a diffusion.v1.Tensor message; RangeError naming `what` if it is malformed.
  static fromProto(message, what = 'tensor') {
    const dtype = DTYPE_BY_ENUM[message.dtype];
    if (dtype === undefined) throw new RangeError(`${what}: unsupported dtype ${message.dtype}`);
    const [, size, Typed] = DTYPES[dtype];
    const shape = message.shape.map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const data = message.data;
    if (data.length !== count * size) {
      throw new RangeError(`${what}: ${data.length} bytes for shape [${shape}] of ${dtype} ` +
                           `(expected ${count * size})`);
    }
    const values = new Typed(count);
    if (dtype === 'float16') {
      for (let i = 0; i < count; ++i) values[i] = halfToFloat(data.readUInt16LE(2 * i));
    } else if (dtype === 'bfloat16') {
      const bits = new Uint32Array(values.buffer);
      for (let i = 0; i < count; ++i) bits[i] = data.readUInt16LE(2 * i) << 16;
    } else if (LITTLE_ENDIAN) {
      Buffer.from(values.buffer).set(data);
    } else {
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const get = {float32: 'getFloat32', float64: 'getFloat64', int32: 'getInt32',
        int64: 'getBigInt64'}[dtype];
      for (let i = 0; i < count; ++i) values[i] = view[get](i * size, true);
    }
    return new Tensor(values, shape, dtype);
  }

  // The values as nested arrays of the tensor's shape.
  toNested() {
    const build = (offset, dims) => {
      if (dims.length === 0) return this.values[offset];
      const stride = dims.slice(1).reduce((a, b) => a * b, 1);
      return Array.from({length: dims[0]}, (_, i) => build(offset + i * stride, dims.slice(1)));
    };
    return build(0, this.shape);
  }
}

// ------------------------------------------------------------------------------------------------
// The client

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// A connection to one diffusion-server.
//
// target: 'host:port'. Options: token (the admin bearer token, sent as `authorization: Bearer
// <token>` on management calls only: LoadSingleFile, UnloadModel, LoadLoRA, UnloadLoRA,
// LoadIPAdapter, UnloadIPAdapter);
// rootCertificates (a Buffer with the PEM of the CA of a server run with --tls_cert; default
// plaintext); timeoutSeconds (deadline of the read-only calls, default 60); maxMessageBytes;
// protoRoot (folder holding diffusion/v1/diffusion.proto).
class DiffusionClient {
  constructor(target, {token, rootCertificates, timeoutSeconds = 60, maxMessageBytes = 64 << 20,
    protoRoot} = {}) {
    const api = loadApi(protoRoot);
    const credentials = rootCertificates ? grpc.credentials.createSsl(rootCertificates)
        : grpc.credentials.createInsecure();
    this.stub = new api.DiffusionService(target, credentials, {
      'grpc.max_receive_message_length': maxMessageBytes,
      'grpc.max_send_message_length': maxMessageBytes,
    });
    this.token = token;
    this.timeoutSeconds = timeoutSeconds;
  }

  close() {
    this.stub.close();
  }

  metadata(admin) {
    const md = new grpc.Metadata();
    if (admin && this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  unary(method, request, {admin = false, timeoutSeconds} = {}) {
    const seconds = timeoutSeconds ?? (admin ? MANAGEMENT_TIMEOUT_S : this.timeoutSeconds);
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata(admin), {deadline: deadline(seconds)},
          (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  // ---- read-only calls ----

  listModels() {
    return this.unary('ListModels', {});
  }

  // GetMetadataResponse of an instance, a model class or a registry alias.
  getMetadata(name, {verbose = false} = {}) {
    return this.unary('GetMetadata', {name, verbose});
  }

  listLoRAs(model) {
    return this.unary('ListLoRAs', {model});
  }

  // The instance's model config (diffusers config.json) of a GetMetadataResponse; throws when it
  // has none (the response named a class, not an instance).
  static config(metadata) {
    if (!metadata.config_json) {
      throw new Error(`metadata of '${metadata.class_name}' carries no config_json ` +
                      '(ask for an instance name)');
    }
    return JSON.parse(metadata.config_json);
  }

  // The typed value of feature row `attribute` (boolean, Number, string or array of strings);
  // throws if the model has no such row.
  static feature(metadata, attribute) {
    const row = metadata.features.find((r) => r.attribute === attribute);
    if (!row) throw new Error(`model '${metadata.class_name}' has no feature row '${attribute}'`);
    if (row.value === 'list_value') return row.list_value.values;
    return row.value ? row[row.value] : null;
  }

  // ---- management calls (need the token) ----

  // Loads a checkpoint under the server's --model_root as instance `name`.
  // storageDtype: layerwise casting ('bfloat16', 'float16', 'float8_e4m3fn', 'float8_e5m2');
  // groupOffload: {blocks_per_group, prefetch, offload_to}; deviceMap: 'sequential' (with
  // maxMemoryBytes {device: bytes}) or an explicit JSON object text.
  loadSingleFile(name, filePath, {configJson = '', dtype = '', device = '', replace = false,
    storageDtype = '', groupOffload, deviceMap = '', maxMemoryBytes = {}, timeoutSeconds} = {}) {
    const request = {name, path: filePath, config_json: configJson, dtype, device, replace,
      storage_dtype: storageDtype, device_map: deviceMap, max_memory_bytes: maxMemoryBytes};
    if (groupOffload) request.group_offload = groupOffload;
    return this.unary('LoadSingleFile', request, {admin: true, timeoutSeconds});
  }

  unloadModel(name, {timeoutSeconds} = {}) {
    return this.unary('UnloadModel', {name}, {admin: true, timeoutSeconds});
  }

  // Loads an adapter into instance `model` from `path` (under the server's --adapter_root) or
  // `data` (a Buffer with the safetensors file, sent inline); exactly one of them. Resolves to
  // LoadLoRAResponse (adapter info with sha256, conversion report).
  loadLoRA(model, name, {path: filePath, data, formatHint = '', allowPartial = false,
    replace = false, pin = false, timeoutSeconds} = {}) {
    if ((filePath === undefined) === (data === undefined)) {
      return Promise.reject(new TypeError('loadLoRA: give exactly one of path and data'));
    }
    const request = {model, name, format_hint: formatHint, allow_partial: allowPartial, replace,
      pin};
    if (filePath !== undefined) request.path = filePath;
    else request.inline_bytes = Buffer.from(data);
    return this.unary('LoadLoRA', request, {admin: true, timeoutSeconds});
  }

  unloadLoRA(model, name, {timeoutSeconds} = {}) {
    return this.unary('UnloadLoRA', {model, name}, {admin: true, timeoutSeconds});
  }

  // Loads an IP-Adapter into pipeline instance `model` (GetMetadata's limits.supports_ip_adapter)
  // from `filePath` under the server's --adapter_root, with the image encoder folder
  // `imageEncoderPath` under its --model_root ('' = the pipeline's image_encoder component).
  // Resolves to LoadIPAdapterResponse (adapter info: format, num_layers, image_embed_dim, ...).
  loadIPAdapter(model, name, filePath, {imageEncoderPath = '', replace = false,
    timeoutSeconds} = {}) {
    return this.unary('LoadIPAdapter',
        {model, name, path: filePath, image_encoder_path: imageEncoderPath, replace},
        {admin: true, timeoutSeconds});
  }

  unloadIPAdapter(model, name, {timeoutSeconds} = {}) {
    return this.unary('UnloadIPAdapter', {model, name}, {admin: true, timeoutSeconds});
  }

  // ---- Generate ----

  // Runs a generation on a bare transformer instance. inputs: {input name: Tensor} (the model's
  // forward inputs besides the latents and the timestep; see GetMetadata.required_inputs).
  // Options: latentShape (the server draws the noise from `seed`) or latents (a Tensor); seed,
  // steps, guidance (0 = defaults); adapters (names or {name, weight}); returnLatents (default
  // true); onProgress(step, total, elapsedSeconds) per progress event as it arrives (if it throws,
  // the call is cancelled and the Promise rejects with that error); timeoutSeconds (default 600).
  // Resolves to {result (GenerateResult), latents (Tensor or null), images (Buffer[] of PNGs;
  // empty here), progress (GenerateProgress[])}.
  generate(model, inputs, {latentShape, latents, seed = 0, steps = 0, guidance = 0, adapters = [],
    returnLatents = true, onProgress, timeoutSeconds = 600} = {}) {
    let request;
    try {
      request = {
        model,
        inputs: Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t.toProto()])),
        latent_shape: latentShape ? Array.from(latentShape, Number) : [],
        seed,
        steps,
        guidance,
        return_latents: returnLatents,
        adapters: adapters.map((a) => (typeof a === 'string' ? {name: a} : a)),
      };
      if (latents) request.latents = latents.toProto();
    } catch (err) {
      return Promise.reject(err);
    }
    return this.runGenerate(request, onProgress, timeoutSeconds);
  }

  // Runs a pipeline instance (ListModels' pipeline_class set, e.g. the embedded "flux-tiny").
  // promptEmbeds: Tensor [L, D] or [P, L, D] (D = GetMetadata limits.prompt_embeds_dim);
  // options: pooledPromptEmbeds, width, height (0 = the pipeline's default; multiples of
  // limits.image_size_multiple), numImages, seed, steps, guidance, trueCfgScale with
  // negativePromptEmbeds / negativePooledPromptEmbeds, noise (initial latents, unpacked), adapters,
  // ipAdapters (image prompts through IP-Adapters loaded with loadIPAdapter: [{name, image (a
  // Buffer with a PNG file) or imageEmbeds (a Tensor [E], [1, E] or [1, N, E]), scale (a Number,
  // or an array with one per conditioned layer; default 1)}]), returnLatents (default false),
  // onProgress, timeoutSeconds. Resolves like generate(), with one PNG Buffer per image in
  // `images`.
  generateImages(model, promptEmbeds, {pooledPromptEmbeds, width = 0, height = 0, numImages = 0,
    seed = 0, steps = 0, guidance = 0, trueCfgScale = 0, negativePromptEmbeds,
    negativePooledPromptEmbeds, noise, adapters = [], ipAdapters = [], returnLatents = false,
    cache, onProgress, timeoutSeconds = 600} = {}) {
    let request;
    try {
      request = {
        model, seed, steps, guidance, width, height,
        num_images: numImages,
        true_cfg_scale: trueCfgScale,
        output: returnLatents ? 'OUTPUT_PNG_AND_LATENTS' : 'OUTPUT_PNG',
        prompt_embeds: promptEmbeds.toProto(),
        adapters: adapters.map((a) => (typeof a === 'string' ? {name: a} : a)),
        ip_adapters: ipAdapters.map(ipAdapterInput),
      };
      if (pooledPromptEmbeds) request.pooled_prompt_embeds = pooledPromptEmbeds.toProto();
      if (negativePromptEmbeds) request.negative_prompt_embeds = negativePromptEmbeds.toProto();
      if (negativePooledPromptEmbeds) {
        request.negative_pooled_prompt_embeds = negativePooledPromptEmbeds.toProto();
      }
      if (noise) request.noise = noise.toProto();
      // A step cache: CacheConfig fields, e.g. {type: 'taylorseer_cache', cache_interval: 5}.
      if (cache) request.cache = cache;
    } catch (err) {
      return Promise.reject(err);
    }
    return this.runGenerate(request, onProgress, timeoutSeconds);
  }

  // The Generate stream: progress events, then the result.
  runGenerate(request, onProgress, timeoutSeconds) {
    return new Promise((resolve, reject) => {
      const progress = [];
      let result = null;
      let settled = false;
      const settle = (fn, value) => {
        if (!settled) {
          settled = true;
          fn(value);
        }
      };
      const call = this.stub.Generate(request, this.metadata(false),
          {deadline: deadline(timeoutSeconds)});
      call.on('data', (message) => {
        if (message.event === 'progress') {
          progress.push(message.progress);
          if (onProgress) {
            const p = message.progress;
            try {
              onProgress(p.step, p.total_steps, p.elapsed_seconds);
            } catch (err) {
              settle(reject, err);
              call.cancel();  // stop the server's work; the 'error' that follows is ignored
            }
          }
        } else if (message.event === 'result') {
          result = message.result;
        }
      });
      call.on('error', (err) => settle(reject, err));
      call.on('end', () => {
        if (result === null) {
          settle(reject, new ProtocolError('Generate stream ended without a result'));
          return;
        }
        try {
          // Unset message fields decode as null (proto-loader `defaults`).
          const decoded = result.latents
              ? Tensor.fromProto(result.latents, 'GenerateResult.latents') : null;
          const images = (result.images || []).map((b) => Buffer.from(b));
          settle(resolve, {result, latents: decoded, images, progress});
        } catch (err) {
          settle(reject, err);
        }
      });
    });
  }
}

// One GenerateRequest.ip_adapters entry from {name, image | imageEmbeds, scale}; throws TypeError
// for another form (naming the entry).
function ipAdapterInput({name, image, imageEmbeds, scale} = {}, i) {
  const what = `ipAdapters[${i}]`;
  if (typeof name !== 'string' || name === '') throw new TypeError(`${what}: name required`);
  if ((image === undefined) === (imageEmbeds === undefined)) {
    throw new TypeError(`${what}: give exactly one of image (PNG bytes) and imageEmbeds`);
  }
  const input = {name, scale: scale === undefined ? [] : [].concat(scale).map(Number)};
  if (image !== undefined) {
    if (!(image instanceof Uint8Array)) throw new TypeError(`${what}.image: not a Buffer`);
    input.image = Buffer.from(image);
  } else {
    if (!(imageEmbeds instanceof Tensor)) throw new TypeError(`${what}.imageEmbeds: not a Tensor`);
    input.image_embeds = imageEmbeds.toProto();
  }
  return input;
}

// ------------------------------------------------------------------------------------------------
// Example inputs

// A seeded standard-normal stream (mulberry32 + Box-Muller), as Math.random cannot be seeded.
function gaussian(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

// Forward inputs of a Flux-family model for a `height` x `width` grid of image tokens and
// `textTokens` text tokens, with dims read from the instance's `config` (GetMetadata's
// config_json): random encoder_hidden_states [batch, textTokens, joint_attention_dim] and
// pooled_projections [batch, pooled_projection_dim], grid img_ids [height*width, axes] (column 1 =
// row, column 2 = col) and zero txt_ids [textTokens, axes], axes = axes_dims_rope.length.
// Returns {inputs, latentShape} with latentShape [batch, height*width, in_channels]; throws naming
// a config field the model lacks.
function fluxInputs(config, {height, width, textTokens, seed = 0, batch = 1}) {
  for (const key of ['joint_attention_dim', 'pooled_projection_dim', 'in_channels',
    'axes_dims_rope']) {
    if (config[key] === undefined || config[key] === null) {
      throw new Error(`model config has no '${key}'`);
    }
  }
  const joint = config.joint_attention_dim;
  const pooled = config.pooled_projection_dim;
  const axes = config.axes_dims_rope.length;
  if (axes < 3) throw new Error(`axes_dims_rope [${config.axes_dims_rope}] has fewer than 3 axes`);
  const next = gaussian(seed);
  const random = (n) => Float32Array.from({length: n}, next);
  const tokens = height * width;
  const imgIds = new Float32Array(tokens * axes);
  for (let i = 0; i < tokens; ++i) {
    imgIds[i * axes + 1] = Math.floor(i / width);
    imgIds[i * axes + 2] = i % width;
  }
  return {
    inputs: {
      encoder_hidden_states: new Tensor(random(batch * textTokens * joint),
          [batch, textTokens, joint]),
      pooled_projections: new Tensor(random(batch * pooled), [batch, pooled]),
      img_ids: new Tensor(imgIds, [tokens, axes]),
      txt_ids: new Tensor(new Float32Array(textTokens * axes), [textTokens, axes]),
    },
    latentShape: [batch, tokens, config.in_channels],
  };
}

// Random {promptEmbeds [textTokens, D], pooledPromptEmbeds [D_pooled]} for a pipeline instance
// whose GetMetadata limits are `limits`: stand-ins for text-encoder outputs in demos and tests.
function randomPromptEmbeds(limits, {textTokens, seed = 0}) {
  const dim = Number(limits.prompt_embeds_dim);
  const pooled = Number(limits.pooled_prompt_embeds_dim);
  if (!(dim > 0 && pooled > 0)) {
    throw new Error('these limits are not a pipeline instance\'s (no embedding widths)');
  }
  const next = gaussian(seed);
  const random = (n) => Float32Array.from({length: n}, next);
  return {
    promptEmbeds: new Tensor(random(textTokens * dim), [textTokens, dim]),
    pooledPromptEmbeds: new Tensor(random(pooled), [pooled]),
  };
}

// {width, height} from a PNG's IHDR chunk; throws if `buffer` is not a PNG.
function pngSize(buffer) {
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (buffer.length < 24 || !buffer.subarray(0, 8).equals(signature) ||
      buffer.toString('latin1', 12, 16) !== 'IHDR') {
    throw new Error('not a PNG image');
  }
  return {width: buffer.readUInt32BE(16), height: buffer.readUInt32BE(20)};
}

module.exports = {DiffusionClient, ProtocolError, Tensor, fluxInputs, randomPromptEmbeds, pngSize,
  loadApi, grpc};
