// deploy/ checked without a cluster (node --test; CTest runs it, label `deploy`):
//  - the kustomize base and the gpu overlay, built by the small kustomize subset below, validate
//    against the Kubernetes OpenAPI schemas (kubernetes-models; the ServiceMonitor against the
//    Prometheus Operator CRD schema);
//  - the probes, ports, paths and shutdown timing agree with the real server: flags are checked
//    against `diffusion-server --help`, and the ConfigMap's flagfile (paths moved to temporary
//    folders, ports to free ones) starts the real binary, whose health service then answers
//    SERVING, through `diffusion-cli health` (what the Dockerfile's HEALTHCHECK runs), for the
//    readiness probe's service and for liveness' "";
//  - the HPA's metric is the one the prometheus-adapter rule serves, and that rule reads a metric
//    the server exports;
//  - the Dockerfile builds with the same scripts/install_deps.sh as `make` (README), runs as a
//    non-root user and health-checks with diffusion-cli on the port it serves.
//
// Environment: DS_SERVER_PATH, DS_CLI_PATH (binaries), NODE_PATH (this folder's npm ci).
'use strict';

const assert = require('node:assert/strict');
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const YAML = require('yaml');

const REPO = path.resolve(__dirname, '..', '..');
const K8S = path.join(REPO, 'deploy', 'kubernetes');
const SERVER = process.env.DS_SERVER_PATH;
const CLI = process.env.DS_CLI_PATH;

// ------------------------------------------------------------------------------------------------
// A kustomize subset: resources (files and folders), images, patches (RFC 6902 ops with a
// kind/name target). Any other field fails the test, so the manifests never rely on something this
// does not apply (kubectl kustomize builds the same output).

const KNOWN_KUSTOMIZE_FIELDS = new Set(['apiVersion', 'kind', 'resources', 'images', 'patches']);

function decodePointer(p) {
  return p.split('/').slice(1).map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
}

function applyOp(doc, op) {
  const parts = decodePointer(op.path);
  const last = parts.pop();
  let parent = doc;
  for (const k of parts) {
    assert.ok(parent[k] !== undefined, `patch path ${op.path}: ${k} does not exist`);
    parent = parent[k];
  }
  if (op.op === 'add' || op.op === 'replace') {
    if (op.op === 'replace') assert.ok(last in parent, `patch replace ${op.path}: missing`);
    if (Array.isArray(parent) && op.op === 'add') {
      parent.splice(last === '-' ? parent.length : Number(last), 0, op.value);
    } else {
      parent[last] = op.value;
    }
  } else if (op.op === 'remove') {
    assert.ok(last in parent, `patch remove ${op.path}: missing`);
    if (Array.isArray(parent)) parent.splice(Number(last), 1);
    else delete parent[last];
  } else {
    assert.fail(`patch op ${op.op} is not supported here`);
  }
}

function podSpecs(obj) {
  if (obj.kind === 'Deployment') return [obj.spec.template.spec];
  return [];
}

function kustomize(dir) {
  const k = YAML.parse(fs.readFileSync(path.join(dir, 'kustomization.yaml'), 'utf8'));
  for (const field of Object.keys(k)) {
    assert.ok(KNOWN_KUSTOMIZE_FIELDS.has(field), `${dir}: kustomization field ${field} unsupported`);
  }
  let objects = [];
  for (const r of k.resources || []) {
    const p = path.join(dir, r);
    if (fs.statSync(p).isDirectory()) {
      objects = objects.concat(kustomize(p));
    } else {
      for (const d of YAML.parseAllDocuments(fs.readFileSync(p, 'utf8'))) {
        assert.deepEqual(d.errors, [], `${p}: YAML errors`);
        if (d.toJSON() !== null) objects.push(d.toJSON());
      }
    }
  }
  for (const img of k.images || []) {
    for (const obj of objects) {
      for (const spec of podSpecs(obj)) {
        for (const c of spec.containers) {
          if (c.image.split(':')[0] === img.name) {
            c.image = `${img.newName || img.name}${img.newTag ? `:${img.newTag}` : ''}`;
          }
        }
      }
    }
  }
  for (const p of k.patches || []) {
    const targets = objects.filter(
      (o) => o.kind === p.target.kind && (!p.target.name || o.metadata.name === p.target.name));
    assert.ok(targets.length > 0, `${dir}: patch target ${JSON.stringify(p.target)} matches nothing`);
    for (const t of targets) for (const op of YAML.parse(p.patch)) applyOp(t, op);
  }
  return objects;
}

// ------------------------------------------------------------------------------------------------
// Schemas.

function modelClass(obj) {
  const [group, version] = obj.apiVersion.includes('/') ? obj.apiVersion.split('/')
    : ['', obj.apiVersion];
  if (group === 'monitoring.coreos.com') {
    return require(`@kubernetes-models/prometheus-operator/${group}/${version}/${obj.kind}`)[obj.kind];
  }
  const prefix = group === '' ? version : `${group}/${version}`;
  return require(`kubernetes-models/${prefix}/${obj.kind}`)[obj.kind];
}

function validateAll(objects) {
  const names = new Set();
  for (const obj of objects) {
    const key = `${obj.kind}/${obj.metadata.name}`;
    assert.ok(!names.has(key), `duplicate ${key}`);
    names.add(key);
    const Model = modelClass(obj);
    assert.ok(Model, `no schema for ${obj.apiVersion} ${obj.kind}`);
    new Model(obj).validate();  // throws with the failing path
  }
}

function find(objects, kind, name) {
  const found = objects.filter((o) => o.kind === kind && (!name || o.metadata.name === name));
  assert.equal(found.length, 1, `expected one ${kind} ${name || ''}`);
  return found[0];
}

// ------------------------------------------------------------------------------------------------
// The server's flags.

// `diffusion-server --help`: flag name -> default value (as printed). Run once.
let flagDefaults = null;
function serverFlagDefaults() {
  if (flagDefaults === null) flagDefaults = readServerFlagDefaults();
  return flagDefaults;
}

function readServerFlagDefaults() {
  let text = '';
  try {
    text = execFileSync(SERVER, ['--help'], { encoding: 'utf8' });
  } catch (e) {
    text = `${e.stdout || ''}${e.stderr || ''}`;  // absl's --help exits 1
  }
  const flags = new Map();
  const re = /--([a-z0-9_]+) \(([\s\S]*?)\);\s+default: ([^;\n]*?);?\n/g;
  for (let m = re.exec(text); m; m = re.exec(text)) flags.set(m[1], m[3].replace(/^"|"$/g, ''));
  assert.ok(flags.has('port') && flags.has('metrics_port'), `cannot parse --help:\n${text}`);
  return flags;
}

// "--a=b" lines/args -> Map(a -> b).
function parseFlags(lines) {
  const out = new Map();
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const m = /^--([a-z0-9_]+)(?:=(.*))?$/.exec(line);
    assert.ok(m, `not a flag: ${line}`);
    out.set(m[1], m[2] === undefined ? 'true' : m[2]);
  }
  return out;
}

function containerOf(objects) {
  const d = find(objects, 'Deployment', 'diffusion-server');
  const c = d.spec.template.spec.containers.find((x) => x.name === 'diffusion-server');
  assert.ok(c, 'container diffusion-server');
  return { deployment: d, container: c, pod: d.spec.template.spec };
}

// The file a path inside the container comes from: [volume, key] (configMap/secret keys, or the
// PVC for a folder), following volumeMounts.
function volumeFor(pod, container, p) {
  for (const m of container.volumeMounts) {
    if (p === m.mountPath || p.startsWith(`${m.mountPath}/`)) {
      const volume = pod.volumes.find((v) => v.name === m.name);
      return { volume, key: p.slice(m.mountPath.length + 1), mount: m };
    }
  }
  return null;
}

// The effective server flags of the Deployment: container args, then its --flagfile's lines.
function effectiveFlags(objects) {
  const { container, pod } = containerOf(objects);
  const args = parseFlags(container.args || []);
  const flags = new Map();
  if (args.has('flagfile')) {
    const v = volumeFor(pod, container, args.get('flagfile'));
    assert.ok(v && v.volume.configMap, '--flagfile must come from the ConfigMap');
    const cm = find(objects, 'ConfigMap', v.volume.configMap.name);
    assert.ok(v.key in cm.data, `ConfigMap has no ${v.key}`);
    for (const [k, val] of parseFlags(cm.data[v.key].split('\n'))) flags.set(k, val);
  }
  for (const [k, val] of args) if (k !== 'flagfile') flags.set(k, val);
  return flags;
}

function checkAgainstServer(objects, label) {
  const defaults = serverFlagDefaults();
  const flags = effectiveFlags(objects);
  for (const k of flags.keys()) assert.ok(defaults.has(k), `${label}: unknown server flag --${k}`);
  const value = (k) => (flags.has(k) ? flags.get(k) : defaults.get(k));
  const { deployment, container, pod } = containerOf(objects);

  // Ports: probes, containerPorts and Services name the ports the server listens on.
  const grpcPort = Number(value('port'));
  const metricsPort = Number(value('metrics_port'));
  assert.ok(grpcPort > 0 && metricsPort > 0);
  const ports = Object.fromEntries(container.ports.map((p) => [p.name, p.containerPort]));
  assert.equal(ports.grpc, grpcPort, `${label}: containerPort grpc`);
  assert.equal(ports.metrics, metricsPort, `${label}: containerPort metrics`);
  for (const kind of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
    const probe = container[kind];
    assert.ok(probe && probe.grpc, `${label}: ${kind} must be a native gRPC probe`);
    assert.equal(probe.grpc.port, grpcPort, `${label}: ${kind} port`);
  }
  // Liveness/startup: service "" (the process); readiness: a model instance it serves.
  assert.ok(!container.livenessProbe.grpc.service, 'liveness probes service ""');
  assert.ok(!container.startupProbe.grpc.service, 'startup probes service ""');
  const readiness = container.readinessProbe.grpc.service;
  const preloadFile = volumeFor(pod, container, value('config'));
  assert.ok(preloadFile && preloadFile.volume.configMap, '--config comes from the ConfigMap');
  const preload = JSON.parse(
    find(objects, 'ConfigMap', preloadFile.volume.configMap.name).data[preloadFile.key]);
  const instances = (preload.models || []).map((m) => m.name);
  assert.ok(instances.includes(readiness),
    `${label}: readiness service '${readiness}' is not a model of preload.json (${instances})`);
  for (const s of objects.filter((o) => o.kind === 'Service')) {
    for (const p of s.spec.ports) {
      assert.ok(p.targetPort in ports, `${label}: Service ${s.metadata.name} targets ${p.targetPort}`);
    }
  }

  // Shutdown: preStop + --grace_period_s + a margin fit in terminationGracePeriodSeconds.
  const grace = Number(value('grace_period_s'));
  const cmd = container.lifecycle.preStop.exec.command;
  assert.equal(cmd[0], 'sleep');
  const preStop = Number(cmd[1]);
  assert.ok(deployment.spec.template.spec.terminationGracePeriodSeconds >= preStop + grace + 5,
    `${label}: terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} < preStop ` +
    `${preStop} + --grace_period_s ${grace} + 5`);

  // The token file is the Secret's key; the store is the ReadWriteMany PVC.
  const token = volumeFor(pod, container, value('admin_token_file'));
  assert.ok(token && token.volume.secret, '--admin_token_file comes from the Secret');
  const secret = find(objects, 'Secret', token.volume.secret.secretName);
  assert.ok(token.key in (secret.stringData || secret.data || {}), `Secret has no ${token.key}`);
  const store = volumeFor(pod, container, value('adapter_store'));
  assert.ok(store && store.volume.persistentVolumeClaim, '--adapter_store is the PVC');
  assert.equal(store.key, '', '--adapter_store is the PVC mount itself');
  const pvc = find(objects, 'PersistentVolumeClaim', store.volume.persistentVolumeClaim.claimName);
  assert.ok(pvc.spec.accessModes.includes('ReadWriteMany'), 'the store PVC is ReadWriteMany');
  assert.ok(Number(value('adapter_store_poll_ms')) <= 2000, 'poll interval <= 2 s');
  return { flags, defaults, readiness, preload };
}

// ------------------------------------------------------------------------------------------------

test('base and gpu overlay validate against the Kubernetes schemas', () => {
  for (const dir of ['base', path.join('overlays', 'gpu')]) {
    const objects = kustomize(path.join(K8S, dir));
    validateAll(objects);
    for (const kind of ['Deployment', 'Service', 'ConfigMap', 'Secret', 'PersistentVolumeClaim',
      'HorizontalPodAutoscaler', 'PodDisruptionBudget', 'ServiceMonitor']) {
      assert.ok(objects.some((o) => o.kind === kind), `${dir}: no ${kind}`);
    }
    // A headless Service (client-side round robin) and a ClusterIP one.
    const services = objects.filter((o) => o.kind === 'Service');
    assert.ok(services.some((s) => s.spec.clusterIP === 'None'), 'headless Service');
    assert.ok(services.some((s) => s.spec.clusterIP !== 'None'), 'ClusterIP Service');
    // Selectors match the pod labels.
    const { deployment } = containerOf(objects);
    const labels = deployment.spec.template.metadata.labels;
    for (const o of objects) {
      const sel = o.kind === 'Service' ? o.spec.selector
        : (o.kind === 'PodDisruptionBudget' ? o.spec.selector.matchLabels : null);
      if (!sel) continue;
      for (const [k, v] of Object.entries(sel)) assert.equal(labels[k], v, `${o.kind} selector`);
    }
  }
  const gpu = containerOf(kustomize(path.join(K8S, 'overlays', 'gpu')));
  assert.equal(gpu.container.resources.limits['nvidia.com/gpu'], '1');
  assert.match(gpu.container.image, /:cuda$/);
});

test('a broken manifest fails validation', () => {
  const objects = kustomize(path.join(K8S, 'base'));
  const { container } = containerOf(objects);
  container.readinessProbe.grpc.port = 'grpc';  // the schema wants an integer here
  assert.throws(() => validateAll(objects), /port/);
});

test('probes, ports, paths and timing agree with the server', () => {
  for (const dir of ['base', path.join('overlays', 'gpu')]) {
    checkAgainstServer(kustomize(path.join(K8S, dir)), dir);
  }
});

test('the HPA scales on the metric the prometheus-adapter rule serves from the server', () => {
  const objects = kustomize(path.join(K8S, 'base'));
  const hpa = find(objects, 'HorizontalPodAutoscaler');
  assert.equal(hpa.spec.scaleTargetRef.name, containerOf(objects).deployment.metadata.name);
  const metric = hpa.spec.metrics[0].pods.metric.name;
  const rules = YAML.parse(
    fs.readFileSync(path.join(K8S, 'prometheus-adapter', 'rules.yaml'), 'utf8')).rules.custom;
  const rule = rules.find((r) => r.name.as === metric);
  assert.ok(rule, `no adapter rule serves ${metric}`);
  const series = /^([a-z_:][a-z0-9_:]*)\{/.exec(rule.seriesQuery)[1];
  // The server's metric families are listed in server/metrics.h, their one owner.
  const header = fs.readFileSync(path.join(REPO, 'server', 'metrics.h'), 'utf8');
  assert.match(header, new RegExp(`^//\\s+${series}\\s+gauge`, 'm'),
    `${series} is not a gauge the server exports`);
});

test('the ConfigMap flagfile starts the real server, and the probed services are SERVING',
  async () => {
    const objects = kustomize(path.join(K8S, 'base'));
    const { flags, readiness, preload } = checkAgainstServer(objects, 'base');
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ds-deploy-'));
    try {
      fs.mkdirSync(path.join(tmp, 'store'));
      fs.writeFileSync(path.join(tmp, 'token'), 'manifest-test-token-0123456789\n');
      fs.writeFileSync(path.join(tmp, 'preload.json'), JSON.stringify(preload));
      // The same flags, with this machine's paths and free ports.
      const local = new Map(flags);
      local.set('host', '127.0.0.1');
      local.set('port', '0');
      local.set('metrics_port', '0');
      local.set('admin_token_file', path.join(tmp, 'token'));
      local.set('adapter_store', path.join(tmp, 'store'));
      local.set('config', path.join(tmp, 'preload.json'));
      local.set('threads', '1');
      const flagfile = path.join(tmp, 'server.flags');
      fs.writeFileSync(flagfile, [...local].map(([k, v]) => `--${k}=${v}`).join('\n') + '\n');
      const server = spawn(SERVER, [`--flagfile=${flagfile}`], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      server.stderr.on('data', (d) => { stderr += d; });
      try {
        const address = await new Promise((resolve, reject) => {
          let out = '';
          const timer = setTimeout(() => reject(new Error(`no listening line:\n${stderr}`)), 60000);
          server.stdout.on('data', (d) => {
            out += d;
            const m = /listening on (\S+)/.exec(out);
            if (m) { clearTimeout(timer); resolve(m[1]); }
          });
          server.on('exit', (code) => reject(new Error(`server exited ${code}:\n${stderr}`)));
        });
        // Readiness: the model instance turns SERVING once loaded (Watch-free polling, as kubelet).
        const health = (service) => {
          try {
            execFileSync(CLI, ['health', `--target=${address}`, `--service=${service}`,
              '--timeout=5'], { encoding: 'utf8' });
            return 0;
          } catch (e) {
            return e.status;
          }
        };
        assert.equal(health(''), 0, 'liveness service "" SERVING');
        const start = Date.now();
        let code = health(readiness);
        while (code !== 0 && Date.now() - start < 60000) {
          await new Promise((r) => setTimeout(r, 200));
          code = health(readiness);
        }
        assert.equal(code, 0, `readiness service '${readiness}' SERVING`);
        assert.equal(health('no-such-model'), 3, 'an unknown service is an error (exit 3)');
      } finally {
        server.kill('SIGTERM');
        await new Promise((r) => (server.exitCode !== null ? r() : server.on('exit', r)));
      }
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });

test('the Dockerfile builds with the install script the README uses and health-checks itself',
  () => {
    const dockerfile = fs.readFileSync(path.join(REPO, 'Dockerfile'), 'utf8')
      .replace(/\\\n/g, ' ');  // join continuation lines
    const lines = dockerfile.split('\n').filter((l) => l.trim() && !l.trim().startsWith('#'));
    const stages = [];
    for (const l of lines) {
      if (/^FROM\s/i.test(l)) stages.push({ from: l, lines: [] });
      else if (stages.length) stages[stages.length - 1].lines.push(l);
    }
    assert.ok(stages.length >= 2, 'multi-stage');
    const build = stages[0];
    const runtime = stages[stages.length - 1];
    // One source of truth: make deps runs scripts/install_deps.sh (README: make run / make test),
    // and the build stage runs that same script; it installs nothing else with apt.
    const makefile = fs.readFileSync(path.join(REPO, 'Makefile'), 'utf8');
    assert.match(makefile, /^deps:\n\t@?scripts\/install_deps\.sh/m);
    const readme = fs.readFileSync(path.join(REPO, 'README.md'), 'utf8');
    assert.match(readme, /make run/);
    assert.match(readme, /make test/);
    assert.ok(build.lines.some((l) => /^COPY\s+scripts\/install_deps\.sh\s/.test(l)));
    assert.ok(build.lines.some((l) => /^RUN\s+(.*&&\s*)?scripts\/install_deps\.sh\b/.test(l)),
      'the build stage runs scripts/install_deps.sh');
    assert.ok(!build.lines.some((l) => /apt-get\s+install/.test(l) && !/libtorch|unzip|curl/.test(l)),
      'the build stage installs its packages only through the script');
    // The runtime stage: a non-root numeric user, the server's port, a HEALTHCHECK through
    // diffusion-cli health on that port.
    const user = runtime.lines.find((l) => /^USER\s/.test(l));
    assert.ok(user && !/^USER\s+(0|root)\b/.test(user), 'non-root USER');
    const defaults = serverFlagDefaults();
    const expose = runtime.lines.find((l) => /^EXPOSE\s/.test(l));
    assert.ok(expose.split(/\s+/).includes(defaults.get('port')), 'EXPOSE the gRPC port');
    const check = runtime.lines.find((l) => /^HEALTHCHECK\s/.test(l));
    assert.ok(check, 'HEALTHCHECK');
    assert.match(check, /diffusion-cli"?,?\s+"?health\b/);  // shell or exec form
    assert.match(check, new RegExp(`--target=[^\\s"]*:${defaults.get('port')}\\b`));
    const cmd = runtime.lines.find((l) => /^CMD\s/.test(l));
    assert.match(cmd, new RegExp(`--port=${defaults.get('port')}\\b`));
    // The CUDA variant is a build argument.
    assert.match(dockerfile, /^ARG\s+TORCH_VARIANT=cpu\b/m);
  });
