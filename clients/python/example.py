#!/usr/bin/python3
"""Example: inspect a model, optionally load a LoRA, and generate latents with progress.

  PYTHONPATH=STUBS:clients/python /usr/bin/python3 clients/python/example.py \\
      --target 127.0.0.1:50051 [--model default] [--token-file token.txt] \\
      [--lora-path style.safetensors | --lora-file local.safetensors] [--lora-name style] \\
      [--lora-weight 0.8] [--steps 4] [--seed 42] [--height 4 --width 4 --text-tokens 8] \\
      [--output latents.json]

The input tensors are random (there is no text encoder in this demo); every dimension comes from
the model's config as GetMetadata reports it. Exits non-zero with the gRPC status on an error.
"""

import argparse
import json
import sys

import grpc

import diffusion_client as dc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--token-file", help="file holding the admin bearer token (for LoadLoRA)")
    parser.add_argument("--tls-ca", help="PEM file of the CA of a TLS server (default plaintext)")
    parser.add_argument("--model", default="default", help="model instance name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--lora-path", help="LoRA file path under the server's --adapter_root")
    source.add_argument("--lora-file", help="local LoRA file, sent inline")
    parser.add_argument("--lora-name", default="example", help="adapter name")
    parser.add_argument("--lora-weight", type=float, default=1.0, help="adapter weight")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--height", type=int, default=4, help="latent grid rows (tokens)")
    parser.add_argument("--width", type=int, default=4, help="latent grid columns (tokens)")
    parser.add_argument("--text-tokens", type=int, default=8)
    parser.add_argument("--output", help="write the result latents as JSON here")
    args = parser.parse_args(argv)

    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    root_certificates = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            root_certificates = f.read()

    with dc.DiffusionClient(args.target, token=token,
                            root_certificates=root_certificates) as client:
        try:
            meta = client.get_metadata(args.model)
            print(meta.table)
            config = client.config(meta)
            adapters = []
            if args.lora_path or args.lora_file:
                if args.lora_path:
                    loaded = client.load_lora(args.model, args.lora_name, path=args.lora_path,
                                              replace=True)
                else:
                    with open(args.lora_file, "rb") as f:
                        loaded = client.load_lora(args.model, args.lora_name, data=f.read(),
                                                  replace=True)
                print(f"loaded LoRA '{loaded.adapter.name}': format {loaded.report.format}, "
                      f"{loaded.adapter.modules} modules, sha256 {loaded.adapter.sha256}")
                adapters.append((args.lora_name, args.lora_weight))

            inputs, shape = dc.flux_inputs(config, args.height, args.width, args.text_tokens,
                                           seed=args.seed)

            def progress(step, total, elapsed):
                bar = "#" * (20 * step // total)
                print(f"\r[{bar:<20}] step {step}/{total} {elapsed:6.2f}s", end="", flush=True)

            out = client.generate(args.model, inputs, latent_shape=shape, seed=args.seed,
                                  steps=args.steps, adapters=adapters, on_progress=progress)
            print()
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1

    r = out.result
    print(f"model {r.model} seed {r.seed} steps {r.steps} guidance {r.guidance} "
          f"latents {list(r.latent_shape)} in {r.seconds:.3f}s (queued {r.queue_seconds:.3f}s)")
    for a in r.adapters:
        print(f"  adapter {a.name} weight {a.weight} sha256 {a.sha256}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"shape": list(out.latents.shape), "dtype": out.latents.dtype,
                       "latents": out.latents.tolist()}, f)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
