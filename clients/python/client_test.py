"""diffusion_client.py against the real diffusion-server binary on loopback.

Environment: DS_SERVER_PATH (the diffusion-server binary), DS_GOLDEN_DIR (the reference fixtures);
PYTHONPATH holds this folder and the generated stubs. CTest sets all three (clients/CMakeLists.txt).

The server gets temporary --model_root/--adapter_root and an admin token file. The golden LoRA base
model (a diffusers folder) is copied under the model root and loaded with LoadSingleFile; the
golden LoRA cases whose source format the model's `_lora` feature row lists are copied under the
adapter root and loaded with LoadLoRA. The golden dev pipeline folder, CLIP vision encoder and
IP-Adapter (conditioning/) are copied too, for the IP-Adapter calls.
"""

import hashlib
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import grpc

import diffusion_client as dc

TOKEN = "python-client-test-token-0123456789"
STARTUP_TIMEOUT_S = 60
RPC_TIMEOUT_S = 60


def _env_path(name):
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"environment variable {name} is not set (run the test through ctest)")
    if not os.path.exists(value):
        raise RuntimeError(f"{name}={value} does not exist")
    return value


class Server:
    """The diffusion-server process on an ephemeral loopback port."""

    def __init__(self, binary, root, args):
        self._stderr = open(os.path.join(root, "server.stderr"), "w+b")
        self.process = subprocess.Popen(
            [binary, "--port=0", "--metrics_port=-1", "--host=127.0.0.1", "--threads=1", *args],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        lines = queue.Queue()

        def pump():
            for raw in self.process.stdout:
                lines.put(raw.decode(errors="replace").strip())
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.target = None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.target is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("listening on "):
                self.target = line[len("listening on "):]
        if self.target is None:
            self.stop()
            raise RuntimeError(f"diffusion-server did not start:\n{self.stderr()}")

    def stderr(self):
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        server_path = _env_path("DS_SERVER_PATH")
        golden = os.path.join(_env_path("DS_GOLDEN_DIR"), "lora")
        cls._tmp = tempfile.TemporaryDirectory(prefix="ds-py-client-")
        root = cls._tmp.name
        cls.model_root = os.path.join(root, "models")
        cls.adapter_root = os.path.join(root, "adapters")
        os.makedirs(cls.adapter_root)
        shutil.copytree(os.path.join(golden, "base_model_dir"),
                        os.path.join(cls.model_root, "base_model_dir"))
        # Every golden LoRA case: its expected.json (format, expanded modules) and its file.
        cls.cases = {}
        for case in sorted(os.listdir(golden)):
            expected_path = os.path.join(golden, case, "expected.json")
            if not os.path.isfile(expected_path):
                continue
            with open(expected_path) as f:
                cls.cases[case] = json.load(f)
            shutil.copyfile(os.path.join(golden, case, "input.safetensors"),
                            os.path.join(cls.adapter_root, f"{case}.safetensors"))
        # The golden dev pipeline with the golden IP-Adapter and its image encoder.
        golden_root = _env_path("DS_GOLDEN_DIR")
        conditioning = os.path.join(golden_root, "conditioning")
        shutil.copytree(os.path.join(golden_root, "pipeline", "flux_pipeline", "dev"),
                        os.path.join(cls.model_root, "ip-pipe"))
        shutil.copytree(os.path.join(conditioning, "clip_vision", "clip_vision_encoder"),
                        os.path.join(cls.model_root, "clip-vision"))
        shutil.copyfile(os.path.join(conditioning, "ip_adapter", "ip_adapter.safetensors"),
                        os.path.join(cls.adapter_root, "ip.safetensors"))
        cls.ip_image = os.path.join(conditioning, "clip_vision", "image.png")
        token_file = os.path.join(root, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.server = Server(server_path, root,
                            [f"--admin_token_file={token_file}", f"--model_root={cls.model_root}",
                             f"--adapter_root={cls.adapter_root}",
                             f"--embedded_dir={os.path.join(root, 'embedded')}",
                             "--embedded_models=default,flux-tiny"])
        cls.client = dc.DiffusionClient(cls.server.target, token=TOKEN, timeout=RPC_TIMEOUT_S)
        # The model the golden LoRAs target, as instance "golden".
        loaded = cls.client.load_single_file("golden", "base_model_dir", timeout=RPC_TIMEOUT_S)
        assert loaded.instance.state == dc.pb.READY, loaded
        cls.lora_formats = dc.DiffusionClient.feature(cls.client.get_metadata("golden"), "_lora")

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()
        cls._tmp.cleanup()

    def supported_cases(self):
        """Golden cases whose source format the model's `_lora` row lists (at least one)."""
        cases = [c for c, e in self.cases.items() if e["format"] in self.lora_formats]
        self.assertTrue(cases, f"no golden LoRA case has a format in {self.lora_formats}")
        return cases

    def test_get_metadata(self):
        for name in ("default", "golden"):
            with self.subTest(instance=name):
                meta = self.client.get_metadata(name)
                self.assertEqual(meta.instance.name, name)
                self.assertEqual(meta.instance.state, dc.pb.READY)
                attributes = [row.attribute for row in meta.features]
                self.assertIn("_lora", attributes)
                formats = dc.DiffusionClient.feature(meta, "_lora")
                self.assertTrue(formats)
                self.assertTrue(meta.table.strip())
                for fmt in formats:
                    self.assertIn(fmt, meta.table)
                config = dc.DiffusionClient.config(meta)
                for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
                    self.assertIsInstance(config[key], int, key)
                    self.assertGreater(config[key], 0, key)
                self.assertIn("encoder_hidden_states", meta.required_inputs)
                self.assertGreater(meta.limits.max_steps, 0)

    def test_list_models_and_unload_model(self):
        listed = {m.name: m for m in self.client.list_models().models}
        self.assertIn("default", listed)
        self.assertIn("golden", listed)
        self.assertEqual(listed["golden"].state, dc.pb.READY)
        self.assertEqual(listed["golden"].class_name, "FluxTransformer2DModel")
        self.assertGreater(listed["golden"].parameter_bytes, 0)
        # A second instance of the same files, then unloaded: gone from the list, NOT_FOUND after.
        self.client.load_single_file("golden-copy", "base_model_dir")
        self.assertIn("golden-copy", [m.name for m in self.client.list_models().models])
        self.client.unload_model("golden-copy")
        self.assertNotIn("golden-copy", [m.name for m in self.client.list_models().models])
        with self.assertRaises(grpc.RpcError) as err:
            self.client.get_metadata("golden-copy")
        self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_load_lora_reports_format_and_digest(self):
        for case in self.supported_cases():
            with self.subTest(case=case):
                path = os.path.join(self.adapter_root, f"{case}.safetensors")
                response = self.client.load_lora("golden", f"path-{case}",
                                                 path=f"{case}.safetensors", replace=True)
                self.assertEqual(response.report.format, self.cases[case]["format"])
                self.assertEqual(response.adapter.sha256, sha256_of(path))
                self.assertEqual(response.adapter.name, f"path-{case}")
                self.assertGreater(response.adapter.modules, 0)
                self.assertEqual(response.report.file_bytes, os.path.getsize(path))
                # The same file sent inline: same content address.
                with open(path, "rb") as f:
                    inline = self.client.load_lora("golden", f"inline-{case}", data=f.read(),
                                                   replace=True)
                self.assertEqual(inline.adapter.sha256, response.adapter.sha256)
                self.assertEqual(inline.adapter.source, "inline")
                listed = {a.name: a for a in self.client.list_loras("golden").adapters}
                self.assertEqual(listed[f"path-{case}"].sha256, response.adapter.sha256)
                self.client.unload_lora("golden", f"inline-{case}")
                self.client.unload_lora("golden", f"path-{case}")

    def _generate(self, model, config, seed, steps, adapters=()):
        inputs, shape = dc.flux_inputs(config, height=2, width=3, text_tokens=4, seed=7)
        events = []
        out = self.client.generate(model, inputs, latent_shape=shape, seed=seed, steps=steps,
                                   adapters=adapters, on_progress=lambda *e: events.append(e))
        self.assertEqual([e[0] for e in events], list(range(1, steps + 1)))
        self.assertTrue(all(e[1] == steps for e in events), events)
        self.assertEqual(len(out.progress), steps)
        self.assertIsNotNone(out.latents)
        self.assertEqual(out.latents.shape, tuple(shape))
        self.assertEqual(tuple(out.result.latent_shape), tuple(shape))
        self.assertTrue(all(math.isfinite(v) for v in out.latents.values))
        self.assertEqual(out.result.seed, seed)
        self.assertEqual(out.result.steps, steps)
        return out

    def test_generate(self):
        # The embedded default (no adapter) and the golden model with a golden LoRA: two configs,
        # every dimension taken from GetMetadata.
        case = next(c for c in self.supported_cases() if not self.cases[c]["expanded_modules"])
        adapter_file = os.path.join(self.adapter_root, f"{case}.safetensors")
        self.client.load_lora("golden", "gen", path=f"{case}.safetensors", replace=True)
        for model, adapters in (("default", ()), ("golden", [("gen", 0.75)])):
            with self.subTest(model=model):
                config = dc.DiffusionClient.config(self.client.get_metadata(model))
                first = self._generate(model, config, seed=11, steps=2, adapters=adapters)
                again = self._generate(model, config, seed=11, steps=2, adapters=adapters)
                other = self._generate(model, config, seed=12, steps=2, adapters=adapters)
                self.assertEqual(first.result.latents.data, again.result.latents.data)
                self.assertNotEqual(first.result.latents.data, other.result.latents.data)
                nested = first.latents.tolist()
                self.assertEqual(len(nested), first.latents.shape[0])
                self.assertEqual(len(nested[0]), first.latents.shape[1])
                self.assertEqual(len(nested[0][0]), first.latents.shape[2])
                if adapters:
                    applied = first.result.adapters
                    self.assertEqual([(a.name, a.weight) for a in applied], adapters)
                    self.assertEqual(applied[0].sha256, sha256_of(adapter_file))
                    plain = self._generate(model, config, seed=11, steps=2)
                    self.assertNotEqual(plain.result.latents.data, first.result.latents.data)
        self.client.unload_lora("golden", "gen")

    def test_generate_images(self):
        # The embedded demo pipeline: PNGs of the requested size, reproducible per seed.
        meta = self.client.get_metadata("flux-tiny")
        self.assertEqual(meta.instance.pipeline_class, "FluxPipeline")
        limits = meta.limits
        prompt, pooled = dc.random_prompt_embeds(limits, text_tokens=5, seed=3)
        width, height = 3 * limits.image_size_multiple, 2 * limits.image_size_multiple

        def run(seed, adapters=(), num_images=0):
            return self.client.generate_images("flux-tiny", prompt, pooled, width=width,
                                               height=height, num_images=num_images, seed=seed,
                                               steps=2, adapters=adapters)

        first, again, other = run(5), run(5), run(6)
        self.assertEqual(len(first.images), 1)
        self.assertEqual(dc.png_size(first.images[0]), (width, height))
        self.assertEqual(first.images, again.images)
        self.assertNotEqual(first.images, other.images)
        self.assertEqual(len(first.progress), 2)
        two = run(5, num_images=2)
        self.assertEqual(len(two.images), 2)
        self.assertNotEqual(two.images[0], two.images[1])
        self.assertEqual([dc.png_size(i) for i in two.images], [(width, height)] * 2)

    def test_step_cache(self):
        # TaylorSeer at interval 1 computes every step: the uncached bytes; its defaults skip.
        limits = self.client.get_metadata("flux-tiny").limits
        self.assertIn("taylorseer_cache", list(limits.cache_types))
        prompt, pooled = dc.random_prompt_embeds(limits, text_tokens=5, seed=3)

        side = 4 * limits.image_size_multiple  # not the 512 px default: 256x the tokens

        def run(cache=None):
            return self.client.generate_images("flux-tiny", prompt, pooled, width=side,
                                               height=side, seed=2, steps=8, cache=cache)

        plain = run()
        every = run({"type": "taylorseer_cache", "cache_interval": 1})
        self.assertEqual(every.images, plain.images)
        self.assertEqual(every.result.cache_skipped_steps, 0)
        skipping = run({"type": "taylorseer_cache"})
        self.assertGreater(skipping.result.cache_skipped_steps, 0)
        with self.assertRaises(grpc.RpcError) as err:
            run({"type": "first_block_cache", "threshold": -1})
        self.assertEqual(err.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("cache.threshold", err.exception.details())

    def test_ip_adapters(self):
        with open(self.ip_image, "rb") as f:
            png = f.read()
        # The embedded flux-tiny pipeline takes IP-Adapters; one it does not hold is NOT_FOUND.
        tiny = self.client.get_metadata("flux-tiny")
        self.assertTrue(tiny.limits.supports_ip_adapter)
        prompt, pooled = dc.random_prompt_embeds(tiny.limits, text_tokens=3, seed=1)
        side = tiny.limits.image_size_multiple
        with self.assertRaises(grpc.RpcError) as err:
            self.client.generate_images("flux-tiny", prompt, pooled, width=side, height=side,
                                        steps=1, ip_adapters=[("nope", png, 1.0)])
        self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("nope", err.exception.details())
        with self.assertRaises(ValueError):
            self.client.generate_images("flux-tiny", prompt, pooled, ip_adapters=[("nope",)])
        # A bare transformer instance takes none.
        with self.assertRaises(grpc.RpcError) as err:
            self.client.load_ip_adapter("golden", "style", "ip.safetensors")
        self.assertEqual(err.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)

        # The golden dev pipeline with the golden adapter and encoder.
        self.client.load_single_file("ip-pipe", "ip-pipe")
        try:
            loaded = self.client.load_ip_adapter("ip-pipe", "style", "ip.safetensors",
                                                 image_encoder_path="clip-vision")
            info = loaded.adapter
            self.assertEqual((info.name, info.image_encoder), ("style", "clip-vision"))
            self.assertGreater(info.num_layers, 0)
            listed = {m.name: m for m in self.client.list_models().models}["ip-pipe"]
            self.assertEqual([a.name for a in listed.ip_adapters], ["style"])
            meta = self.client.get_metadata("ip-pipe")
            prompt, pooled = dc.random_prompt_embeds(meta.limits, text_tokens=4, seed=2)
            side = meta.limits.image_size_multiple

            def run(ip_adapters=()):
                return self.client.generate_images("ip-pipe", prompt, pooled, width=2 * side,
                                                   height=side, seed=3, steps=2,
                                                   ip_adapters=ip_adapters)

            plain, zero = run(), run([("style", png, 0.0)])
            one, per_layer = run([("style", png)]), run([("style", png, [1.0] * info.num_layers)])
            self.assertEqual(zero.images, plain.images)  # scale 0 = no adapter, bit for bit
            self.assertNotEqual(one.images, plain.images)
            self.assertEqual(per_layer.images, one.images)
            self.assertEqual([a.name for a in one.result.ip_adapters], ["style"])
            self.assertGreater(one.result.image_encode_seconds, 0.0)
            embeds = dc.Tensor([0.5] * info.image_embed_dim, (1, info.image_embed_dim))
            self.assertNotEqual(run([("style", embeds)]).images, plain.images)
            self.client.unload_ip_adapter("ip-pipe", "style")
            with self.assertRaises(grpc.RpcError) as err:
                self.client.unload_ip_adapter("ip-pipe", "style")
            self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
        finally:
            self.client.unload_model("ip-pipe")

    def test_progress_callback_error_cancels(self):
        config = dc.DiffusionClient.config(self.client.get_metadata("default"))
        inputs, shape = dc.flux_inputs(config, height=2, width=2, text_tokens=2)

        class Stop(Exception):
            pass

        def stop(step, total, elapsed):
            raise Stop(step)

        with self.assertRaises(Stop):
            self.client.generate("default", inputs, latent_shape=shape, steps=50,
                                 on_progress=stop)
        # The client (and the server's queue) is usable right after.
        out = self.client.generate("default", inputs, latent_shape=shape, steps=1)
        self.assertEqual(out.latents.shape, tuple(shape))

    def test_status_codes(self):
        case = self.supported_cases()[0]
        with dc.DiffusionClient(self.server.target, timeout=RPC_TIMEOUT_S) as anonymous:
            with self.assertRaises(grpc.RpcError) as err:
                anonymous.load_lora("golden", "x", path=f"{case}.safetensors")
            self.assertEqual(err.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            # Read-only calls need no token.
            self.assertEqual(anonymous.get_metadata("golden").instance.name, "golden")
        with dc.DiffusionClient(self.server.target, token=TOKEN + "x") as wrong:
            with self.assertRaises(grpc.RpcError) as err:
                wrong.load_lora("golden", "x", path=f"{case}.safetensors")
            self.assertEqual(err.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        config = dc.DiffusionClient.config(self.client.get_metadata("default"))
        inputs, shape = dc.flux_inputs(config, height=2, width=2, text_tokens=2)
        with self.assertRaises(grpc.RpcError) as err:
            self.client.generate("no-such-model", inputs, latent_shape=shape, steps=1)
        self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("no-such-model", err.exception.details())
        with self.assertRaises(grpc.RpcError) as err:
            self.client.get_metadata("no-such-model")
        self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as err:
            self.client.load_lora("golden", "x", path="../../etc/passwd")
        self.assertEqual(err.exception.code(), grpc.StatusCode.PERMISSION_DENIED)


class TensorTest(unittest.TestCase):
    def test_round_trips(self):
        values = [0.0, 1.5, -2.25, 3.0e-3, 65504.0, -1.0e-5]
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            with self.subTest(dtype=dtype):
                back = dc.Tensor.from_proto(dc.Tensor(values, (2, 3), dtype).to_proto())
                self.assertEqual(back.shape, (2, 3))
                self.assertEqual(back.dtype, dtype)
                # Half an ulp of each format, relative; float16 also has subnormals below 2**-14
                # (spacing 2**-24).
                relative = {"float32": 2**-24, "float64": 2**-53, "float16": 2**-11,
                            "bfloat16": 2**-8}[dtype]
                absolute = 2**-25 if dtype == "float16" else 0.0
                for got, want in zip(back.values, values):
                    self.assertLessEqual(abs(got - want), relative * abs(want) + absolute,
                                         (dtype, got, want))
        ints = dc.Tensor.from_proto(dc.Tensor([1, -2, 2**40], (3,), "int64").to_proto())
        self.assertEqual(list(ints.values), [1, -2, 2**40])

    def test_rejects_malformed(self):
        with self.assertRaises(ValueError):
            dc.Tensor([1.0, 2.0], (3,))
        message = dc.Tensor([1.0, 2.0], (2,)).to_proto()
        message.shape[0] = 3
        with self.assertRaisesRegex(ValueError, "latents"):
            dc.Tensor.from_proto(message, "latents")


if __name__ == "__main__":
    unittest.main(verbosity=2)
