// client.js against the real diffusion-server binary on loopback (node:test).
//
// Environment: DS_SERVER_PATH (the diffusion-server binary), DS_GOLDEN_DIR (the reference
// fixtures), NODE_PATH (the node_modules that `npm ci` installed into the build tree). CTest sets
// them (clients/CMakeLists.txt).
//
// The server gets temporary --model_root/--adapter_root and an admin token file. The golden LoRA
// base model (a diffusers folder) is copied under the model root and loaded with LoadSingleFile;
// the golden LoRA cases whose source format the model's `_lora` feature row lists are copied under
// the adapter root and loaded with LoadLoRA. The golden dev pipeline folder, CLIP vision encoder
// and IP-Adapter (conditioning/) are copied too, for the IP-Adapter calls.
'use strict';

const assert = require('node:assert/strict');
const {spawn} = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const {test, before, after} = require('node:test');

const {DiffusionClient, Tensor, fluxInputs, randomPromptEmbeds, pngSize, grpc} = require('./client.js');

const TOKEN = 'node-client-test-token-0123456789';
const STARTUP_TIMEOUT_MS = 60000;

function envPath(name) {
  const value = process.env[name];
  if (!value) throw new Error(`environment variable ${name} is not set (run the test via ctest)`);
  if (!fs.existsSync(value)) throw new Error(`${name}=${value} does not exist`);
  return value;
}

function sha256File(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

// Starts the server and resolves to {child, target} once it prints its "listening on" line.
function startServer(binary, root, args) {
  const stderrPath = path.join(root, 'server.stderr');
  const stderr = fs.openSync(stderrPath, 'w');
  const child = spawn(binary,
      ['--port=0', '--metrics_port=-1', '--host=127.0.0.1', '--threads=1', ...args],
      {stdio: ['ignore', 'pipe', stderr]});
  fs.closeSync(stderr);
  // Never leave the server behind, even if this process dies early.
  process.on('exit', () => child.kill('SIGKILL'));
  const fail = (why) => new Error(`diffusion-server did not start (${why}):\n` +
                                  fs.readFileSync(stderrPath, 'utf8'));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(fail('timeout'));
    }, STARTUP_TIMEOUT_MS);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(fail(`exited with ${code ?? signal}`));
    });
    readline.createInterface({input: child.stdout}).on('line', (line) => {
      if (line.startsWith('listening on ')) {
        clearTimeout(timer);
        resolve({child, target: line.slice('listening on '.length)});
      }
    });
  });
}

function stopServer(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

async function rejectsWithCode(promise, code) {
  await assert.rejects(promise, (err) => {
    assert.equal(err.code, code, `expected ${grpc.status[code]}, got ${grpc.status[err.code]}: ` +
                 err.details);
    return true;
  });
}

const state = {};

before(async () => {
  const binary = envPath('DS_SERVER_PATH');
  const golden = path.join(envPath('DS_GOLDEN_DIR'), 'lora');
  state.root = fs.mkdtempSync(path.join(os.tmpdir(), 'ds-node-client-'));
  state.modelRoot = path.join(state.root, 'models');
  state.adapterRoot = path.join(state.root, 'adapters');
  fs.mkdirSync(state.adapterRoot, {recursive: true});
  fs.cpSync(path.join(golden, 'base_model_dir'), path.join(state.modelRoot, 'base_model_dir'),
      {recursive: true});
  // Every golden LoRA case: its expected.json (format, expanded modules) and its file.
  state.cases = {};
  for (const name of fs.readdirSync(golden).sort()) {
    const expected = path.join(golden, name, 'expected.json');
    if (!fs.existsSync(expected)) continue;
    state.cases[name] = JSON.parse(fs.readFileSync(expected, 'utf8'));
    fs.copyFileSync(path.join(golden, name, 'input.safetensors'),
        path.join(state.adapterRoot, `${name}.safetensors`));
  }
  // The golden dev pipeline with the golden IP-Adapter and its image encoder.
  const conditioning = path.join(envPath('DS_GOLDEN_DIR'), 'conditioning');
  fs.cpSync(path.join(envPath('DS_GOLDEN_DIR'), 'pipeline', 'flux_pipeline', 'dev'),
      path.join(state.modelRoot, 'ip-pipe'), {recursive: true});
  fs.cpSync(path.join(conditioning, 'clip_vision', 'clip_vision_encoder'),
      path.join(state.modelRoot, 'clip-vision'), {recursive: true});
  fs.copyFileSync(path.join(conditioning, 'ip_adapter', 'ip_adapter.safetensors'),
      path.join(state.adapterRoot, 'ip.safetensors'));
  state.ipImage = path.join(conditioning, 'clip_vision', 'image.png');
  const tokenFile = path.join(state.root, 'token');
  fs.writeFileSync(tokenFile, `${TOKEN}\n`);
  const server = await startServer(binary, state.root, [`--admin_token_file=${tokenFile}`,
    `--model_root=${state.modelRoot}`, `--adapter_root=${state.adapterRoot}`,
    `--embedded_dir=${path.join(state.root, 'embedded')}`, '--embedded_models=default,flux-tiny']);
  state.child = server.child;
  state.target = server.target;
  state.client = new DiffusionClient(state.target, {token: TOKEN});
  // The model the golden LoRAs target, as instance "golden".
  const loaded = await state.client.loadSingleFile('golden', 'base_model_dir');
  assert.equal(loaded.instance.state, 'READY');
  state.loraFormats = DiffusionClient.feature(await state.client.getMetadata('golden'), '_lora');
});

after(async () => {
  if (state.client) state.client.close();
  if (state.child) await stopServer(state.child);
  if (state.root) fs.rmSync(state.root, {recursive: true, force: true});
});

// Golden cases whose source format the model's `_lora` row lists (at least one).
function supportedCases() {
  const cases = Object.keys(state.cases).filter(
      (c) => state.loraFormats.includes(state.cases[c].format));
  assert.ok(cases.length > 0, `no golden LoRA case has a format in [${state.loraFormats}]`);
  return cases;
}

test('GetMetadata: feature rows, table and config', async () => {
  for (const name of ['default', 'golden']) {
    const meta = await state.client.getMetadata(name);
    assert.equal(meta.instance.name, name);
    assert.equal(meta.instance.state, 'READY');
    assert.ok(meta.features.some((row) => row.attribute === '_lora'));
    const formats = DiffusionClient.feature(meta, '_lora');
    assert.ok(formats.length > 0);
    assert.ok(meta.table.trim().length > 0);
    for (const format of formats) assert.ok(meta.table.includes(format), format);
    const config = DiffusionClient.config(meta);
    for (const key of ['in_channels', 'joint_attention_dim', 'pooled_projection_dim']) {
      assert.ok(Number.isInteger(config[key]) && config[key] > 0, key);
    }
    assert.ok(meta.required_inputs.includes('encoder_hidden_states'));
    assert.ok(meta.limits.max_steps > 0);
  }
});

test('ListModels and UnloadModel', async () => {
  const names = async () => (await state.client.listModels()).models.map((m) => m.name);
  const listed = (await state.client.listModels()).models;
  const golden = listed.find((m) => m.name === 'golden');
  assert.ok(golden, 'golden listed');
  assert.ok(listed.some((m) => m.name === 'default'), 'default listed');
  assert.equal(golden.state, 'READY');
  assert.equal(golden.class_name, 'FluxTransformer2DModel');
  assert.ok(Number(golden.parameter_bytes) > 0);
  // A second instance of the same files, then unloaded: gone from the list, NOT_FOUND after.
  await state.client.loadSingleFile('golden-copy', 'base_model_dir');
  assert.ok((await names()).includes('golden-copy'));
  await state.client.unloadModel('golden-copy');
  assert.ok(!(await names()).includes('golden-copy'));
  await rejectsWithCode(state.client.getMetadata('golden-copy'), grpc.status.NOT_FOUND);
});

test('LoadLoRA: format and sha256 of each golden case, by path and inline', async () => {
  for (const name of supportedCases()) {
    const file = path.join(state.adapterRoot, `${name}.safetensors`);
    const digest = sha256File(file);
    const loaded = await state.client.loadLoRA('golden', `path-${name}`,
        {path: `${name}.safetensors`, replace: true});
    assert.equal(loaded.report.format, state.cases[name].format);
    assert.equal(loaded.adapter.sha256, digest);
    assert.equal(loaded.adapter.name, `path-${name}`);
    assert.ok(loaded.adapter.modules > 0);
    assert.equal(loaded.report.file_bytes, fs.statSync(file).size);
    const inline = await state.client.loadLoRA('golden', `inline-${name}`,
        {data: fs.readFileSync(file), replace: true});
    assert.equal(inline.adapter.sha256, digest);
    assert.equal(inline.adapter.source, 'inline');
    const listed = (await state.client.listLoRAs('golden')).adapters;
    assert.equal(listed.find((a) => a.name === `path-${name}`).sha256, digest);
    await state.client.unloadLoRA('golden', `inline-${name}`);
    await state.client.unloadLoRA('golden', `path-${name}`);
  }
});

async function generate(model, config, seed, steps, adapters = []) {
  const {inputs, latentShape} = fluxInputs(config, {height: 2, width: 3, textTokens: 4, seed: 7});
  const events = [];
  const out = await state.client.generate(model, inputs, {latentShape, seed, steps, adapters,
    onProgress: (step, total) => events.push([step, total])});
  assert.deepEqual(events.map((e) => e[0]), Array.from({length: steps}, (_, i) => i + 1));
  assert.ok(events.every((e) => e[1] === steps), JSON.stringify(events));
  assert.equal(out.progress.length, steps);
  assert.ok(out.latents instanceof Tensor);
  assert.deepEqual(out.latents.shape, latentShape);
  assert.deepEqual(out.result.latent_shape, latentShape);
  assert.ok(out.latents.values.every(Number.isFinite));
  assert.equal(out.result.seed, seed);
  assert.equal(out.result.steps, steps);
  return out;
}

test('Generate: progress 1..n, shape, finite, seeded determinism, adapters', async () => {
  // The embedded default (no adapter) and the golden model with a golden LoRA: two configs, every
  // dimension taken from GetMetadata.
  const name = supportedCases().find((c) => state.cases[c].expanded_modules.length === 0);
  assert.ok(name, 'no golden LoRA case without expanded modules');
  const adapterFile = path.join(state.adapterRoot, `${name}.safetensors`);
  await state.client.loadLoRA('golden', 'gen', {path: `${name}.safetensors`, replace: true});
  for (const [model, adapters] of [['default', []], ['golden', [{name: 'gen', weight: 0.75}]]]) {
    const config = DiffusionClient.config(await state.client.getMetadata(model));
    const first = await generate(model, config, 11, 2, adapters);
    const again = await generate(model, config, 11, 2, adapters);
    const other = await generate(model, config, 12, 2, adapters);
    assert.ok(first.result.latents.data.equals(again.result.latents.data), 'same seed differs');
    assert.ok(!first.result.latents.data.equals(other.result.latents.data), 'seed ignored');
    const nested = first.latents.toNested();
    assert.deepEqual([nested.length, nested[0].length, nested[0][0].length], first.latents.shape);
    if (adapters.length > 0) {
      const applied = first.result.adapters;
      assert.deepEqual(applied.map((a) => [a.name, a.weight]), [['gen', 0.75]]);
      assert.equal(applied[0].sha256, sha256File(adapterFile));
      const plain = await generate(model, config, 11, 2);
      assert.ok(!plain.result.latents.data.equals(first.result.latents.data), 'adapter ignored');
    }
  }
  await state.client.unloadLoRA('golden', 'gen');
});

test('generateImages on the embedded flux-tiny pipeline: PNG size, seeded determinism', async () => {
  const md = await state.client.getMetadata('flux-tiny');
  assert.equal(md.instance.pipeline_class, 'FluxPipeline');
  const multiple = Number(md.limits.image_size_multiple);
  assert.ok(multiple > 0);
  const {promptEmbeds, pooledPromptEmbeds} = randomPromptEmbeds(md.limits, {textTokens: 5, seed: 3});
  const run = (seed, numImages = 0) => state.client.generateImages('flux-tiny', promptEmbeds, {
    pooledPromptEmbeds, width: 3 * multiple, height: 2 * multiple, numImages, seed, steps: 2});
  const first = await run(5);
  const again = await run(5);
  const other = await run(6);
  assert.equal(first.images.length, 1);
  assert.deepEqual(pngSize(first.images[0]), {width: 3 * multiple, height: 2 * multiple});
  assert.ok(first.images[0].equals(again.images[0]), 'same seed differs');
  assert.ok(!first.images[0].equals(other.images[0]), 'seed ignored');
  assert.equal(first.progress.length, 2);
  const two = await run(5, 2);
  assert.equal(two.images.length, 2);
  assert.ok(!two.images[0].equals(two.images[1]), 'two images per prompt are the same');
});

test('generateImages with a step cache: interval 1 = uncached bytes, defaults skip', async () => {
  const md = await state.client.getMetadata('flux-tiny');
  assert.ok(md.limits.cache_types.includes('taylorseer_cache'));
  const {promptEmbeds, pooledPromptEmbeds} = randomPromptEmbeds(md.limits, {textTokens: 5, seed: 3});
  const side = 4 * Number(md.limits.image_size_multiple);  // not the 512 px default
  const run = (cache) => state.client.generateImages('flux-tiny', promptEmbeds, {
    pooledPromptEmbeds, width: side, height: side, seed: 2, steps: 8, cache});
  const plain = await run(undefined);
  const every = await run({type: 'taylorseer_cache', cache_interval: 1});
  assert.ok(every.images[0].equals(plain.images[0]), 'interval 1 differs from uncached');
  assert.equal(Number(every.result.cache_skipped_steps), 0);
  const skipping = await run({type: 'taylorseer_cache'});
  assert.ok(Number(skipping.result.cache_skipped_steps) > 0);
  await assert.rejects(run({type: 'first_block_cache', threshold: -1}),
      (err) => err.code === grpc.status.INVALID_ARGUMENT && err.details.includes('cache.threshold'));
});

test('IP-Adapters: load, image prompts (scale 0 = plain), unload, status codes', async () => {
  const png = fs.readFileSync(state.ipImage);
  // The embedded flux-tiny pipeline takes IP-Adapters; one it does not hold is NOT_FOUND.
  const tiny = await state.client.getMetadata('flux-tiny');
  assert.equal(tiny.limits.supports_ip_adapter, true);
  let embeds = randomPromptEmbeds(tiny.limits, {textTokens: 3, seed: 1});
  let side = Number(tiny.limits.image_size_multiple);
  await assert.rejects(state.client.generateImages('flux-tiny', embeds.promptEmbeds, {
    pooledPromptEmbeds: embeds.pooledPromptEmbeds, width: side, height: side, steps: 1,
    ipAdapters: [{name: 'nope', image: png, scale: 1}]}),
  (err) => err.code === grpc.status.NOT_FOUND && err.details.includes('nope'));
  await assert.rejects(state.client.generateImages('flux-tiny', embeds.promptEmbeds,
      {ipAdapters: [{name: 'nope'}]}), TypeError);
  // A bare transformer instance takes none.
  await rejectsWithCode(state.client.loadIPAdapter('golden', 'style', 'ip.safetensors'),
      grpc.status.FAILED_PRECONDITION);

  // The golden dev pipeline with the golden adapter and encoder.
  await state.client.loadSingleFile('ip-pipe', 'ip-pipe');
  try {
    const {adapter: info} = await state.client.loadIPAdapter('ip-pipe', 'style', 'ip.safetensors',
        {imageEncoderPath: 'clip-vision'});
    assert.deepEqual([info.name, info.image_encoder], ['style', 'clip-vision']);
    assert.ok(info.num_layers > 0);
    const listed = (await state.client.listModels()).models.find((m) => m.name === 'ip-pipe');
    assert.deepEqual(listed.ip_adapters.map((a) => a.name), ['style']);
    const meta = await state.client.getMetadata('ip-pipe');
    embeds = randomPromptEmbeds(meta.limits, {textTokens: 4, seed: 2});
    side = Number(meta.limits.image_size_multiple);
    const run = (ipAdapters = []) => state.client.generateImages('ip-pipe', embeds.promptEmbeds, {
      pooledPromptEmbeds: embeds.pooledPromptEmbeds, width: 2 * side, height: side, seed: 3,
      steps: 2, ipAdapters});
    const plain = await run();
    const zero = await run([{name: 'style', image: png, scale: 0}]);
    const one = await run([{name: 'style', image: png}]);
    const perLayer = await run([{name: 'style', image: png,
      scale: Array(info.num_layers).fill(1)}]);
    assert.ok(zero.images[0].equals(plain.images[0]), 'scale 0 differs from no adapter');
    assert.ok(!one.images[0].equals(plain.images[0]), 'image prompt ignored');
    assert.ok(perLayer.images[0].equals(one.images[0]), 'per-layer 1s differ from scale 1');
    assert.deepEqual(one.result.ip_adapters.map((a) => a.name), ['style']);
    assert.ok(one.result.image_encode_seconds > 0);
    const imageEmbeds = new Tensor(new Float32Array(info.image_embed_dim).fill(0.5),
        [1, info.image_embed_dim]);
    assert.ok(!(await run([{name: 'style', imageEmbeds}])).images[0].equals(plain.images[0]));
    await state.client.unloadIPAdapter('ip-pipe', 'style');
    await rejectsWithCode(state.client.unloadIPAdapter('ip-pipe', 'style'), grpc.status.NOT_FOUND);
  } finally {
    await state.client.unloadModel('ip-pipe');
  }
});

test('Generate: an onProgress error cancels the call and rejects with it', async () => {
  const config = DiffusionClient.config(await state.client.getMetadata('default'));
  const {inputs, latentShape} = fluxInputs(config, {height: 2, width: 2, textTokens: 2});
  const stop = new Error('stop');
  await assert.rejects(state.client.generate('default', inputs, {latentShape, steps: 50,
    onProgress: () => {
      throw stop;
    }}), (err) => err === stop);
  // The client (and the server's queue) is usable right after.
  const out = await state.client.generate('default', inputs, {latentShape, steps: 1});
  assert.deepEqual(out.latents.shape, latentShape);
});

test('status codes: missing/wrong token, unknown model, path escape', async () => {
  const [name] = supportedCases();
  const anonymous = new DiffusionClient(state.target);
  try {
    await rejectsWithCode(anonymous.loadLoRA('golden', 'x', {path: `${name}.safetensors`}),
        grpc.status.UNAUTHENTICATED);
    // Read-only calls need no token.
    assert.equal((await anonymous.getMetadata('golden')).instance.name, 'golden');
  } finally {
    anonymous.close();
  }
  const wrong = new DiffusionClient(state.target, {token: `${TOKEN}x`});
  try {
    await rejectsWithCode(wrong.loadLoRA('golden', 'x', {path: `${name}.safetensors`}),
        grpc.status.PERMISSION_DENIED);
  } finally {
    wrong.close();
  }
  const config = DiffusionClient.config(await state.client.getMetadata('default'));
  const {inputs, latentShape} = fluxInputs(config, {height: 2, width: 2, textTokens: 2});
  await assert.rejects(state.client.generate('no-such-model', inputs, {latentShape, steps: 1}),
      (err) => err.code === grpc.status.NOT_FOUND && err.details.includes('no-such-model'));
  await rejectsWithCode(state.client.getMetadata('no-such-model'), grpc.status.NOT_FOUND);
  await rejectsWithCode(state.client.loadLoRA('golden', 'x', {path: '../../etc/passwd'}),
      grpc.status.PERMISSION_DENIED);
});

test('Tensor: encodings round-trip and malformed tensors are rejected', () => {
  const values = [0, 1.5, -2.25, 3e-3, 65504, -1e-5];
  // Half an ulp of each format, relative; float16 also has subnormals (spacing 2**-24).
  const tolerance = {float32: [2 ** -24, 0], float64: [2 ** -53, 0], float16: [2 ** -11, 2 ** -25],
    bfloat16: [2 ** -8, 0]};
  for (const [dtype, [relative, absolute]] of Object.entries(tolerance)) {
    const back = Tensor.fromProto(new Tensor(values, [2, 3], dtype).toProto());
    assert.deepEqual(back.shape, [2, 3]);
    assert.equal(back.dtype, dtype);
    values.forEach((want, i) => {
      assert.ok(Math.abs(back.values[i] - want) <= relative * Math.abs(want) + absolute,
          `${dtype}: ${back.values[i]} vs ${want}`);
    });
  }
  const ints = Tensor.fromProto(new Tensor([1, -2, 2 ** 40], [3], 'int64').toProto());
  assert.deepEqual(Array.from(ints.values), [1n, -2n, 2n ** 40n]);
  assert.throws(() => new Tensor([1, 2], [3]), RangeError);
  const message = new Tensor([1, 2], [2]).toProto();
  message.shape = [3];
  assert.throws(() => Tensor.fromProto(message, 'latents'), /latents/);
});
