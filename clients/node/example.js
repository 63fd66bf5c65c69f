#!/usr/bin/env node
// Example: inspect a model, optionally load a LoRA, and generate latents with progress.
//
//   NODE_PATH=<dir>/node_modules node clients/node/example.js --target 127.0.0.1:50051 \
//       [--model default] [--token-file token.txt] \
//       [--lora-path style.safetensors | --lora-file local.safetensors] [--lora-name style] \
//       [--lora-weight 0.8] [--steps 4] [--seed 42] [--height 4 --width 4 --text-tokens 8] \
//       [--tls-ca ca.pem] [--output latents.json]
//
// The input tensors are random (there is no text encoder in this demo); every dimension comes
// from the model's config as GetMetadata reports it. Exits non-zero with the gRPC status name on
// an error.
'use strict';

const fs = require('node:fs');
const {parseArgs} = require('node:util');
const {DiffusionClient, fluxInputs, grpc} = require('./client.js');

const USAGE = fs.readFileSync(__filename, 'utf8').split('\n').slice(1, 12)
    .map((l) => l.replace(/^\/\/ ?/, '')).join('\n');

function parseInt10(name, text) {
  const n = Number(text);
  if (!Number.isInteger(n)) throw new Error(`--${name}: '${text}' is not an integer`);
  return n;
}

async function main() {
  const {values: args} = parseArgs({
    options: {
      'target': {type: 'string', default: '127.0.0.1:50051'},
      'token-file': {type: 'string'},
      'tls-ca': {type: 'string'},
      'model': {type: 'string', default: 'default'},
      'lora-path': {type: 'string'},
      'lora-file': {type: 'string'},
      'lora-name': {type: 'string', default: 'example'},
      'lora-weight': {type: 'string', default: '1'},
      'steps': {type: 'string', default: '4'},
      'seed': {type: 'string', default: '42'},
      'height': {type: 'string', default: '4'},
      'width': {type: 'string', default: '4'},
      'text-tokens': {type: 'string', default: '8'},
      'output': {type: 'string'},
      'help': {type: 'boolean', short: 'h'},
    },
  });
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  if (args['lora-path'] && args['lora-file']) {
    throw new Error('give at most one of --lora-path and --lora-file');
  }
  const weight = Number(args['lora-weight']);
  if (!Number.isFinite(weight)) throw new Error(`--lora-weight: '${args['lora-weight']}'`);
  const token = args['token-file'] ? fs.readFileSync(args['token-file'], 'utf8').trim() : undefined;
  const rootCertificates = args['tls-ca'] ? fs.readFileSync(args['tls-ca']) : undefined;

  const client = new DiffusionClient(args.target, {token, rootCertificates});
  try {
    const meta = await client.getMetadata(args.model);
    console.log(meta.table);
    const config = DiffusionClient.config(meta);
    const adapters = [];
    if (args['lora-path'] || args['lora-file']) {
      const source = args['lora-path'] ? {path: args['lora-path']}
          : {data: fs.readFileSync(args['lora-file'])};
      const loaded = await client.loadLoRA(args.model, args['lora-name'],
          {...source, replace: true});
      console.log(`loaded LoRA '${loaded.adapter.name}': format ${loaded.report.format}, ` +
                  `${loaded.adapter.modules} modules, sha256 ${loaded.adapter.sha256}`);
      adapters.push({name: args['lora-name'], weight});
    }
    const {inputs, latentShape} = fluxInputs(config, {
      height: parseInt10('height', args.height),
      width: parseInt10('width', args.width),
      textTokens: parseInt10('text-tokens', args['text-tokens']),
      seed: parseInt10('seed', args.seed),
    });
    const out = await client.generate(args.model, inputs, {
      latentShape,
      seed: parseInt10('seed', args.seed),
      steps: parseInt10('steps', args.steps),
      adapters,
      onProgress: (step, total, elapsed) => {
        const bar = '#'.repeat(Math.floor((20 * step) / total)).padEnd(20);
        process.stdout.write(`\r[${bar}] step ${step}/${total} ${elapsed.toFixed(2)}s`);
      },
    });
    process.stdout.write('\n');
    const r = out.result;
    console.log(`model ${r.model} seed ${r.seed} steps ${r.steps} guidance ${r.guidance} ` +
                `latents [${r.latent_shape}] in ${r.seconds.toFixed(3)}s ` +
                `(queued ${r.queue_seconds.toFixed(3)}s)`);
    for (const a of r.adapters) {
      console.log(`  adapter ${a.name} weight ${a.weight} sha256 ${a.sha256}`);
    }
    if (args.output) {
      fs.writeFileSync(args.output, JSON.stringify(
          {shape: out.latents.shape, dtype: out.latents.dtype, latents: out.latents.toNested()}));
      console.log(`wrote ${args.output}`);
    }
    return 0;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
}, (err) => {
  const status = typeof err.code === 'number' && grpc.status[err.code];
  console.error(status ? `\nerror: ${status}: ${err.details}` : `error: ${err.message}`);
  process.exitCode = 1;
});
