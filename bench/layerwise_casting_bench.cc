// Layerwise casting (issue 9): resident weight bytes and forward time of a Flux transformer whose
// weights are stored in bfloat16 (or float16) and computed in float32, against the float32 model,
// both measured in the same run, plus the output's max error relative to the float32 output.
//
//   layerwise_casting_bench [--threads N] [--layers 4] [--single_layers 8] [--heads 12]
//                           [--head_dim 64] [--img_tokens 1024] [--txt_tokens 128] [--repeat 5]
//                           [--storage bfloat16|float16] [--float8=true]
//
// Two storage rows: diffusers' skip patterns (Flux keeps its modulation linears and the final
// proj_out in float32) and every linear but pos_embed/proj_out cast ("all linears"); with
// --float8 the same two rows again for 8-bit float storage (float8_e4m3fn: uint8 codes + float32
// row scales) and an all-linears float8_e5m2 row. Errors are max |out - fp32| (absolute) and that
// over max |fp32| (relative).
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "handlers/layerwise_casting.h"
#include "handlers/state_dict.h"
#include "models/flux/transformer.h"

ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "intra-op threads (torch::set_num_threads)");
ABSL_FLAG(int32_t, layers, 4, "double-stream blocks");
ABSL_FLAG(int32_t, single_layers, 8, "single-stream blocks");
ABSL_FLAG(int32_t, heads, 12, "attention heads");
ABSL_FLAG(int32_t, head_dim, 64, "attention head dim");
ABSL_FLAG(int32_t, img_tokens, 1024, "image tokens");
ABSL_FLAG(int32_t, txt_tokens, 128, "text tokens");
ABSL_FLAG(int32_t, repeat, 5, "timed forward passes per model (median reported)");
ABSL_FLAG(std::string, storage, "bfloat16", "storage dtype: bfloat16 or float16");
ABSL_FLAG(bool, float8, true, "also measure 8-bit float storage (float8_e4m3fn, float8_e5m2)");

namespace {

using Clock = std::chrono::steady_clock;

template <typename Fn>
double MedianSeconds(int repeat, Fn&& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    const auto start = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::unique_ptr<ds::flux::FluxTransformer> Build(const nlohmann::json& config,
                                                 const ds::ModelOptions& options) {
  auto model = ds::flux::FluxTransformer::Create(config, options);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    std::exit(1);
  }
  return std::move(*model);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  torch::set_num_threads(absl::GetFlag(FLAGS_threads));
  auto storage = ds::ParseStorageDtype(absl::GetFlag(FLAGS_storage));
  if (!storage.ok() || !storage->has_value()) {
    std::fprintf(stderr, "--storage: %s\n",
                 storage.ok() ? "required" : std::string(storage.status().message()).c_str());
    return 1;
  }
  const int64_t head_dim = absl::GetFlag(FLAGS_head_dim);
  // RoPE axes in Flux's 16/56/56 proportion of the head dim (even sizes).
  const int64_t a0 = std::max<int64_t>(2, head_dim / 8 / 2 * 2);
  const int64_t a1 = (head_dim - a0) / 2 / 2 * 2;
  const nlohmann::json config = {
      {"patch_size", 1},
      {"in_channels", 64},
      {"num_layers", absl::GetFlag(FLAGS_layers)},
      {"num_single_layers", absl::GetFlag(FLAGS_single_layers)},
      {"attention_head_dim", head_dim},
      {"num_attention_heads", absl::GetFlag(FLAGS_heads)},
      {"joint_attention_dim", 4096},
      {"pooled_projection_dim", 768},
      {"guidance_embeds", true},
      {"axes_dims_rope", {a0, a1, head_dim - a0 - a1}}};

  auto fp32 = Build(config, ds::ModelOptions{});
  ds::InitRandomWeights(fp32->module(), 0);
  const ds::TensorMap weights = ds::NamedTensors(fp32->module());

  struct Row {
    std::string name;
    std::unique_ptr<ds::flux::FluxTransformer> model;
  };
  std::vector<Row> rows;
  const std::vector<std::string> all_linears = {"pos_embed", "patch_embed", "^proj_in$",
                                                "^proj_out$"};
  ds::ModelOptions cast;
  cast.storage_dtype = **storage;
  rows.push_back({"diffusers skip patterns", Build(config, cast)});
  cast.layerwise_casting_skip_patterns = all_linears;
  rows.push_back({"all linears", Build(config, cast)});
  if (absl::GetFlag(FLAGS_float8)) {
    ds::ModelOptions f8;
    f8.storage_dtype = torch::kByte;  // 8-bit float codes + row scales
    f8.float8_format = ds::Float8Format::kE4M3FN;
    rows.push_back({"e4m3fn skip patterns", Build(config, f8)});
    f8.layerwise_casting_skip_patterns = all_linears;
    rows.push_back({"e4m3fn all linears", Build(config, f8)});
    f8.float8_format = ds::Float8Format::kE5M2;
    rows.push_back({"e5m2 all linears", Build(config, f8)});
  }
  for (Row& r : rows) {
    // 8-bit rows quantize the float32 weights into codes and scales first.
    auto stored = ds::ToStorageForm(r.model->module(), weights, r.model->options().float8_format);
    if (!stored.ok()) {
      std::fprintf(stderr, "%s\n", std::string(stored.status().message()).c_str());
      return 1;
    }
    const absl::Status s = ds::LoadStateDict(r.model->module(), *stored);
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return 1;
    }
  }

  torch::manual_seed(1);
  const int64_t img = absl::GetFlag(FLAGS_img_tokens), txt = absl::GetFlag(FLAGS_txt_tokens);
  ds::TensorMap in;
  in["hidden_states"] = torch::randn({1, img, 64});
  in["encoder_hidden_states"] = torch::randn({1, txt, 4096});
  in["pooled_projections"] = torch::randn({1, 768});
  in["timestep"] = torch::full({1}, 0.5);
  in["guidance"] = torch::full({1}, 3.5);
  in["img_ids"] = torch::randint(0, 64, {img, 3}).to(torch::kFloat);
  in["txt_ids"] = torch::zeros({txt, 3});

  const int repeat = absl::GetFlag(FLAGS_repeat);
  torch::Tensor ref;
  const double t_fp32 = MedianSeconds(repeat, [&] { ref = *fp32->Forward(in); });
  const double bytes_fp32 = static_cast<double>(ds::ParameterBytes(fp32->module()));
  std::printf("layerwise casting: %s storage, float32 compute; %d+%d blocks, %d heads x %lld, "
              "%lld+%lld tokens, %d threads, median of %d\n",
              absl::GetFlag(FLAGS_storage).c_str(), absl::GetFlag(FLAGS_layers),
              absl::GetFlag(FLAGS_single_layers), absl::GetFlag(FLAGS_heads),
              static_cast<long long>(head_dim), static_cast<long long>(img),
              static_cast<long long>(txt), absl::GetFlag(FLAGS_threads), repeat);
  std::printf("  %-26s resident %9.1f MiB (1.000)  forward %8.1f ms (1.000)\n", "float32",
              bytes_fp32 / (1 << 20), t_fp32 * 1e3);
  for (Row& r : rows) {
    torch::Tensor out;
    const double t = MedianSeconds(repeat, [&] { out = *r.model->Forward(in); });
    const double bytes = static_cast<double>(ds::ParameterBytes(r.model->module()));
    const double abs_err = (out - ref).abs().max().item<double>();
    const double err = abs_err / ref.abs().max().item<double>();
    std::printf("  %-26s resident %9.1f MiB (%.3f)  forward %8.1f ms (%.3f)  "
                "max|out - fp32| %.3g (/max|fp32| %.3g)\n",
                r.name.c_str(), bytes / (1 << 20), bytes / bytes_fp32, t * 1e3, t / t_fp32,
                abs_err, err);
  }
  return 0;
}
