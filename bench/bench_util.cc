#include "bench/bench_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/image_decoder.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "models/flux/latents.h"

namespace ds::bench {

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Best(const std::vector<double>& v) {
  return v.empty() ? 0 : *std::min_element(v.begin(), v.end());
}

double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

int64_t StatusKiB(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string f = field;
  while (std::getline(in, line)) {
    if (line.rfind(f, 0) == 0) return std::stoll(line.substr(f.size()));
  }
  return 0;
}

bool ResetPeakResidentMemory() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

std::string LoadAverage() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return "?";
  char a[32] = {0}, b[32] = {0}, c[32] = {0};
  const int n = std::fscanf(f, "%31s %31s %31s", a, b, c);
  std::fclose(f);
  return n == 3 ? absl::StrCat(a, " ", b, " ", c) : "?";
}

std::vector<int64_t> RopeAxes(int64_t head_dim) {
  const int64_t first = std::max<int64_t>(2, (head_dim / 8) / 2 * 2);
  const int64_t rest = head_dim - first;
  const int64_t second = rest / 2 / 2 * 2;
  return {first, second, rest - second};
}

//   D = heads·head_dim; per double block: img 2·N_img·(4·D² + 8·D²) (q,k,v,out + MLP D→4D→D),
//   txt the same with N_txt, modulation 2·2·6·D², attention 4·S²·D;
//   per single block: 2·S·(3·D² + 4·D² + 5·D²) (q,k,v, proj_mlp, proj_out 5D→D), modulation
//   2·3·D², attention 4·S²·D; plus embedders, norm_out and proj_out.
double FluxForwardFlops(const flux::FluxConfig& c, int64_t batch, int64_t img_tokens,
                        int64_t txt_tokens) {
  const double b = static_cast<double>(batch), d = static_cast<double>(c.inner_dim());
  const double img = static_cast<double>(img_tokens), txt = static_cast<double>(txt_tokens);
  const double s = img + txt;
  auto mm = [b](double m, double n, double k) { return 2.0 * b * m * n * k; };
  double f = mm(img, d, static_cast<double>(c.in_channels)) +
             mm(txt, d, static_cast<double>(c.joint_attention_dim));
  f += mm(1, d, 256) + mm(1, d, d);                                           // timestep
  f += mm(1, d, static_cast<double>(c.pooled_projection_dim)) + mm(1, d, d);  // text
  if (c.guidance_embeds) f += mm(1, d, 256) + mm(1, d, d);
  const double attention = 2.0 * 2.0 * b * s * s * d;  // QKᵀ and PV over all heads
  const double double_block =
      2 * mm(1, 6 * d, d) + mm(img, 12 * d, d) + mm(txt, 12 * d, d) + attention;
  const double single_block = mm(1, 3 * d, d) + mm(s, 12 * d, d) + attention;
  f += static_cast<double>(c.num_layers) * double_block +
       static_cast<double>(c.num_single_layers) * single_block;
  f += mm(1, 2 * d, d) +
       mm(img, static_cast<double>(c.patch_size * c.patch_size * c.resolved_out_channels()), d);
  return f;
}

nlohmann::json FluxShape(int64_t layers, int64_t single_layers, int64_t heads, int64_t head_dim) {
  return {
      {"num_layers", layers},
      {"num_single_layers", single_layers},
      {"num_attention_heads", heads},
      {"attention_head_dim", head_dim},
      {"axes_dims_rope", RopeAxes(head_dim)},
      {"joint_attention_dim", 4096},
      {"pooled_projection_dim", 768},
      {"guidance_embeds", true},
  };
}

absl::StatusOr<std::shared_ptr<DiffusionModel>> BuildRandomModel(const std::string& class_name,
                                                                 const nlohmann::json& config,
                                                                 const ModelOptions& options,
                                                                 uint64_t seed) {
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(class_name));
  ASSIGN_OR_RETURN(std::unique_ptr<DiffusionModel> model, spec->factory(config, options));
  InitRandomWeights(model->module(), seed);
  return std::shared_ptr<DiffusionModel>(std::move(model));
}

TensorMap FluxForwardInputs(const flux::FluxConfig& c, int64_t img_tokens, int64_t txt_tokens,
                            uint64_t seed) {
  torch::InferenceMode guard;
  torch::manual_seed(seed);
  int64_t h = static_cast<int64_t>(std::sqrt(static_cast<double>(img_tokens)));
  while (h > 1 && img_tokens % h != 0) --h;
  const int64_t w = img_tokens / h;
  const int64_t axes = static_cast<int64_t>(c.axes_dims_rope.size());
  auto ids = torch::zeros({img_tokens, axes});
  for (int64_t i = 0; i < img_tokens; ++i) {
    ids[i][1] = static_cast<double>(i / w);
    ids[i][2] = static_cast<double>(i % w);
  }
  TensorMap in = {
      {"hidden_states", torch::randn({1, img_tokens, c.in_channels})},
      {"encoder_hidden_states", torch::randn({1, txt_tokens, c.joint_attention_dim})},
      {"pooled_projections", torch::randn({1, c.pooled_projection_dim})},
      {"timestep", torch::full({1}, 0.5)},
      {"img_ids", ids},
      {"txt_ids", torch::zeros({txt_tokens, axes})},
  };
  if (c.guidance_embeds) in["guidance"] = torch::full({1}, 3.5);
  return in;
}

absl::StatusOr<RandomPipeline> BuildRandomFluxPipeline(const nlohmann::json& transformer_config,
                                                       const std::vector<int64_t>& vae_channels,
                                                       const ModelOptions& options) {
  const std::vector<std::string> down(vae_channels.size(), "DownEncoderBlock2D");
  const std::vector<std::string> up(vae_channels.size(), "UpDecoderBlock2D");
  const nlohmann::json vae_config = {
      {"block_out_channels", vae_channels},
      {"down_block_types", down},
      {"up_block_types", up},
      {"latent_channels", 16},
      {"layers_per_block", 2},
      {"norm_num_groups", std::min<int64_t>(32, vae_channels.front())},
      {"scaling_factor", 0.3611},
      {"shift_factor", 0.1159},
      {"use_quant_conv", false},
      {"use_post_quant_conv", false},
  };
  return BuildRandomFluxPipeline(transformer_config, vae_config, options, 0);
}

absl::StatusOr<RandomPipeline> BuildRandomFluxPipeline(const nlohmann::json& transformer_config,
                                                       const nlohmann::json& vae_config,
                                                       const ModelOptions& options,
                                                       uint64_t seed) {
  ASSIGN_OR_RETURN(const ModelSpec* flux_spec,
                   ModelRegistry::Global().Find("FluxTransformer2DModel"));
  ASSIGN_OR_RETURN(std::shared_ptr<DiffusionModel> transformer,
                   BuildRandomModel("FluxTransformer2DModel", transformer_config, options, seed));
  ModelOptions vae_options;
  vae_options.dtype = options.dtype;
  vae_options.device = options.device;
  ASSIGN_OR_RETURN(std::shared_ptr<DiffusionModel> vae,
                   BuildRandomModel("AutoencoderKL", vae_config, vae_options, seed + 1));
  std::shared_ptr<const DiffusionModel> vae_owner = std::move(vae);
  const auto* decoder = dynamic_cast<const LatentImageDecoder*>(vae_owner.get());
  if (decoder == nullptr) return absl::InternalError("AutoencoderKL is no LatentImageDecoder");
  RandomPipeline out;
  out.components.transformer = std::make_shared<LoraHost>(std::move(transformer), flux_spec->lora);
  out.components.vae = std::shared_ptr<const LatentImageDecoder>(vae_owner, decoder);
  out.components.scheduler = FlowMatchEulerConfig::FluxDev();
  ASSIGN_OR_RETURN(out.pipeline, flux::FluxPipeline::Create(out.components));
  return out;
}

flux::FluxPipelineRequest RandomPromptRequest(const flux::FluxPipeline& pipeline, int64_t size,
                                              int64_t txt_tokens, int steps, uint64_t seed) {
  torch::manual_seed(seed);
  const flux::FluxConfig& cfg = pipeline.transformer_config();
  flux::FluxPipelineRequest request;
  request.prompt_embeds = torch::randn({txt_tokens, cfg.joint_attention_dim});
  request.pooled_prompt_embeds = torch::randn({cfg.pooled_projection_dim});
  request.height = size;
  request.width = size;
  request.num_inference_steps = steps;
  request.seed = seed;
  request.decode = false;
  return request;
}

double Psnr(const torch::Tensor& a, const torch::Tensor& b, double peak) {
  const double mse = (a.to(torch::kFloat64) - b.to(torch::kFloat64)).pow(2).mean().item<double>();
  if (mse == 0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(peak * peak / mse);
}

std::vector<safetensors::TensorInfo> BflCheckpointLayout(int64_t d, int64_t layers,
                                                         int64_t single_layers) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  auto linear = [&t](const std::string& name, int64_t out, int64_t in) {
    t.push_back({name + ".weight", {out, in}});
    t.push_back({name + ".bias", {out}});
  };
  const int64_t head = 128;
  linear("img_in", d, 64);
  linear("txt_in", d, 4096);
  linear("time_in.in_layer", d, 256);
  linear("time_in.out_layer", d, d);
  linear("guidance_in.in_layer", d, 256);
  linear("guidance_in.out_layer", d, d);
  linear("vector_in.in_layer", d, 768);
  linear("vector_in.out_layer", d, d);
  linear("final_layer.linear", 64, d);
  linear("final_layer.adaLN_modulation.1", 2 * d, d);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = absl::StrCat("double_blocks.", i, ".");
    for (const char* s : {"img", "txt"}) {
      linear(p + s + "_mod.lin", 6 * d, d);
      linear(p + s + "_attn.qkv", 3 * d, d);
      linear(p + s + "_attn.proj", d, d);
      linear(p + s + "_mlp.0", 4 * d, d);
      linear(p + s + "_mlp.2", d, 4 * d);
      t.push_back({p + s + "_attn.norm.query_norm.scale", {head}});
      t.push_back({p + s + "_attn.norm.key_norm.scale", {head}});
    }
  }
  for (int64_t i = 0; i < single_layers; ++i) {
    const std::string p = absl::StrCat("single_blocks.", i, ".");
    linear(p + "modulation.lin", 3 * d, d);
    linear(p + "linear1", 7 * d, d);
    linear(p + "linear2", d, 5 * d);
    t.push_back({p + "norm.query_norm.scale", {head}});
    t.push_back({p + "norm.key_norm.scale", {head}});
  }
  std::vector<safetensors::TensorInfo> infos;
  uint64_t offset = 0;
  for (auto& [name, shape] : t) {
    safetensors::TensorInfo info;
    info.name = "model.diffusion_model." + name;
    info.dtype = safetensors::DType::kBF16;
    info.shape = shape;
    info.begin = offset;
    offset += static_cast<uint64_t>(info.numel()) * 2;
    info.end = offset;
    infos.push_back(std::move(info));
  }
  return infos;
}

absl::Status WriteBflCheckpoint(const std::string& path,
                                const std::vector<safetensors::TensorInfo>& infos) {
  ASSIGN_OR_RETURN(std::string header, safetensors::SerializeHeader(infos, {{"bench", "1"}}));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot write ", path));
  bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size();
  // bf16 0x3F80 = 1.0: finite, cheap to produce.
  std::vector<uint16_t> chunk(8 << 20, 0x3F80);
  for (const auto& info : infos) {
    for (int64_t left = info.numel(); ok && left > 0;) {
      const int64_t n = std::min<int64_t>(left, static_cast<int64_t>(chunk.size()));
      ok = std::fwrite(chunk.data(), 2, static_cast<std::size_t>(n), f) ==
           static_cast<std::size_t>(n);
      left -= n;
    }
  }
  ok = ok && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  ok = std::fclose(f) == 0 && ok;
  return ok ? absl::OkStatus() : absl::InternalError(absl::StrCat("writing ", path));
}

double ReadFileOnce(const std::string& path) {
  const auto t0 = Clock::now();
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return -1;
  std::vector<char> buf(16 << 20);
  uint64_t sum = 0;
  ssize_t n;
  while ((n = ::read(fd, buf.data(), buf.size())) > 0) sum += static_cast<unsigned char>(buf[0]);
  ::close(fd);
  const double s = Since(t0);
  if (sum == 1) std::fputs("", stdout);  // keeps the loop observable
  return s;
}

int64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

}  // namespace ds::bench
