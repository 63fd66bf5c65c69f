#include "tools/train/flux_tiny_trainer.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "handlers/demo_pipeline.h"
#include "handlers/lora_context.h"
#include "handlers/model.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/tokenizers/tokenizer.h"
#include "models/autoencoder_kl/autoencoder_kl.h"
#include "models/clip/clip_text_model.h"
#include "models/flux/latents.h"
#include "models/flux/lora.h"
#include "models/flux/spec.h"
#include "models/flux/transformer.h"
#include "models/t5/t5_encoder.h"
#include "tools/train/classifier.h"
#include "tools/train/scenes.h"

namespace ds::train {
namespace {

namespace fs = std::filesystem;
using torch::Tensor;
using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One pipeline component built through the registry from the recipe's config.
struct Built {
  std::unique_ptr<DiffusionModel> model;
  nlohmann::json config;  // with _class_name / architectures, as written
};

absl::StatusOr<Built> Build(const DemoComponent& c) {
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(c.class_name));
  Built b;
  b.config = c.config;
  if (c.library == "transformers") {
    b.config["architectures"] = {spec->class_name};
  } else {
    b.config["_class_name"] = spec->class_name;
  }
  ASSIGN_OR_RETURN(b.model, spec->factory(b.config, ModelOptions{}));
  return b;
}

// Training initialization: matrices and kernels ~ N(0, 1/fan_in), biases 0, 1-D scales 1,
// embedding tables ~ N(0, 1/width); and the transformer's adaLN modulations and proj_out zero, so
// that every block starts as the identity and the output as 0 (DiT's adaLN-Zero).
void InitForTraining(torch::nn::Module& module, bool ada_ln_zero) {
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters()) {
    const std::string& name = item.key();
    Tensor p = item.value();
    const bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const bool embedding = name.find("embedding") != std::string::npos ||
                           name.find("shared") != std::string::npos ||
                           name.find("embed_tokens") != std::string::npos;
    const bool zero = ada_ln_zero && (name.find("norm1.linear") != std::string::npos ||
                                      name.find("norm1_context.linear") != std::string::npos ||
                                      name.find(".norm.linear") != std::string::npos ||
                                      name.find("norm_out.linear") != std::string::npos ||
                                      name.rfind("proj_out.", 0) == 0);
    if (zero || is_bias) {
      p.zero_();
    } else if (embedding && p.dim() == 2) {
      p.normal_(0, 1.0 / std::sqrt(static_cast<double>(p.size(1))));
    } else if (p.dim() >= 2) {
      p.normal_(0, 1.0 / std::sqrt(static_cast<double>(p.numel() / p.size(0))));
    } else {
      p.fill_(1.0);
    }
  }
}

// A pool of rendered scenes: images [N, 3, side, side] in [-1, 1] and the combination of each.
struct Pool {
  Tensor images;
  std::vector<Combination> combinations;
};

absl::StatusOr<Pool> RenderPool(
    const std::vector<Combination>& combos, uint64_t seed, int64_t count, int64_t side,
    const std::function<Combination(const Combination&)>& draw = nullptr) {
  Pool pool;
  pool.images = torch::empty({count, 3, side, side});
  for (int64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(Scene scene, SampleScene(combos, seed, i, side));
    pool.combinations.push_back(scene.combination);
    if (draw) scene.combination = draw(scene.combination);
    ASSIGN_OR_RETURN(std::vector<uint8_t> rgb, RenderScene(scene, side));
    const Tensor hwc =
        torch::from_blob(rgb.data(), {side, side, 3}, torch::kUInt8).to(torch::kFloat);
    pool.images[i].copy_(hwc.permute({2, 0, 1}) / 127.5 - 1.0);
  }
  return pool;
}

// Token ids of every caption (and of "" at index captions.size()) for one tokenizer, padded to
// `length`, as FluxPipeline tokenizes them (no attention mask is used).
absl::StatusOr<Tensor> TokenIds(const tokenizers::Tokenizer& tokenizer,
                                const std::vector<std::string>& texts, int64_t length) {
  Tensor ids = torch::empty({static_cast<int64_t>(texts.size()), length}, torch::kLong);
  for (size_t i = 0; i < texts.size(); ++i) {
    tokenizers::TokenizerOptions o;
    o.max_length = length;
    ASSIGN_OR_RETURN(tokenizers::TokenizedText t, tokenizer.Encode(texts[i], o));
    for (int64_t j = 0; j < length; ++j) ids[i][j] = t.ids[j];
  }
  return ids;
}

// Learning rate with a linear warm-up over the first 5% and a cosine decay to 10%.
double Schedule(double base, int64_t step, int64_t steps) {
  const int64_t warmup = std::max<int64_t>(1, steps / 20);
  if (step < warmup) return base * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double p = static_cast<double>(step - warmup) / std::max<int64_t>(1, steps - warmup);
  return base * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * p)));
}

void SetLearningRate(torch::optim::Adam& opt, double lr) {
  for (auto& group : opt.param_groups()) {
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
  }
}

class Progress {
 public:
  Progress(const FluxTinyTrainOptions& o, std::string stage, int64_t steps)
      : o_(o), stage_(std::move(stage)), steps_(steps), start_(Clock::now()) {}
  // Records the step's loss; logs every log_every steps and at the end.
  void Step(int64_t step, double loss) {
    ema_ = step == 0 ? loss : 0.98 * ema_ + 0.02 * loss;
    if (!o_.log || ((step + 1) % std::max<int64_t>(1, o_.log_every) != 0 && step + 1 != steps_)) {
      return;
    }
    const double elapsed = SecondsSince(start_);
    const int width = 30;
    const int filled = static_cast<int>(width * (step + 1) / steps_);
    o_.log(absl::StrFormat("%-10s [%s%s] %6d/%-6d loss %.5f  %.0f s, eta %.0f s", stage_,
                           std::string(filled, '#'), std::string(width - filled, '.'), step + 1,
                           steps_, ema_, elapsed,
                           elapsed / (step + 1) * static_cast<double>(steps_ - step - 1)));
  }
  double loss() const { return ema_; }
  double seconds() const { return SecondsSince(start_); }

 private:
  const FluxTinyTrainOptions& o_;
  std::string stage_;
  int64_t steps_;
  Clock::time_point start_;
  double ema_ = 0;
};

Tensor RandomIndices(int64_t n, int64_t batch) { return torch::randint(n, {batch}, torch::kLong); }

// The pieces the denoiser and LoRA stages share.
struct Trainer {
  const FluxTinyTrainOptions& o;
  flux::FluxTransformer2DModelImpl* flux = nullptr;
  autoencoder_kl::AutoencoderKLImpl* vae = nullptr;
  clip::CLIPTextModelImpl* clip = nullptr;
  t5::T5EncoderImpl* t5 = nullptr;
  double shift = 0, scale = 1;
  Tensor img_ids, txt_ids;  // [16, 3], [L, 3]

  // The VAE posterior (mean, logvar) of `images`, encoded 256 at a time (call without grad).
  std::pair<Tensor, Tensor> Encode(const Tensor& images) const {
    std::vector<Tensor> m, l;
    for (int64_t i = 0; i < images.size(0); i += 256) {
      const autoencoder_kl::Posterior p =
          vae->encode(images.narrow(0, i, std::min<int64_t>(256, images.size(0) - i)));
      m.push_back(p.mean.clone());
      l.push_back(p.logvar.clone());
    }
    return {torch::cat(m), torch::cat(l)};
  }

  // Packed flow-matching inputs x0 [B, S, 4C] from posterior means / logvars (sampled).
  Tensor X0(const Tensor& mean, const Tensor& logvar) const {
    const Tensor z = mean + (0.5 * logvar).exp() * torch::randn_like(mean);
    return flux::PackLatents((z - shift) * scale).value();
  }

  // The flow-matching loss of the transformer on x0 with text conditioning (pooled, sequence).
  Tensor Loss(const Tensor& x0, const Tensor& pooled, const Tensor& sequence,
              const ds::LoraContext* lora) const {
    const int64_t b = x0.size(0);
    // t: half logit-normal (more weight mid-trajectory), half uniform.
    Tensor t = torch::sigmoid(torch::randn({b}));
    const Tensor uniform = torch::rand({b});
    const Tensor pick = torch::rand({b}) < 0.5;
    t = torch::where(pick, uniform, t);
    const Tensor noise = torch::randn_like(x0);
    const Tensor tt = t.view({b, 1, 1});
    const Tensor xt = (1 - tt) * x0 + tt * noise;
    flux::FluxInputs in;
    in.hidden_states = xt;
    in.encoder_hidden_states = sequence;
    in.pooled_projections = pooled;
    in.timestep = t;
    in.guidance = 1 + 4 * torch::rand({b});
    in.img_ids = img_ids;
    in.txt_ids = txt_ids;
    const Tensor v = flux->forward(in, nullptr, lora);
    return (v - (noise - x0)).square().mean();
  }
};

absl::Status CheckOptions(const FluxTinyTrainOptions& o) {
  for (const auto& [name, v] : std::vector<std::pair<const char*, int64_t>>{
           {"side", o.side},
           {"scenes_per_combination", o.scenes_per_combination},
           {"vae_steps", o.vae_steps},
           {"vae_batch", o.vae_batch},
           {"denoiser_steps", o.denoiser_steps},
           {"denoiser_batch", o.denoiser_batch},
           {"lora_steps", o.lora_steps},
           {"lora_batch", o.lora_batch},
           {"lora_rank", o.lora_rank},
           {"classifier_steps", o.classifier_steps}}) {
    if (v < 1) return absl::InvalidArgumentError(absl::StrCat(name, " must be >= 1, got ", v));
  }
  for (const auto& [name, v] : std::vector<std::pair<const char*, double>>{
           {"vae_learning_rate", o.vae_learning_rate},
           {"denoiser_learning_rate", o.denoiser_learning_rate},
           {"lora_learning_rate", o.lora_learning_rate}}) {
    if (!(v > 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", v));
    }
  }
  if (!(o.partial_captions >= 0 && o.caption_dropout + o.partial_captions < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("partial_captions must be >= 0 with caption_dropout + partial_captions < 1, "
                     "got ",
                     o.partial_captions));
  }
  if (!(o.caption_dropout >= 0 && o.caption_dropout < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("caption_dropout must be in [0, 1), got ", o.caption_dropout));
  }
  if (o.side % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("side must be a multiple of 8 (the VAE's factor 4 times Flux's 2x2 "
                     "packing), got ",
                     o.side));
  }
  if (o.out_dir.empty()) return absl::InvalidArgumentError("out_dir is empty");
  return absl::OkStatus();
}

// Writes `module`'s tensors as float16 safetensors at `path` (replacing the random weights the
// demo writer put there).
absl::Status WriteHalf(const std::string& path, const torch::nn::Module& module,
                       const std::string& source) {
  TensorMap half;
  for (const auto& [name, t] : NamedTensors(module)) {
    half[name] = t.detach().to(torch::kHalf).contiguous();
  }
  return WriteSafetensors(path, half, {{"format", "pt"}, {"source", source}});
}

absl::StatusOr<nlohmann::json> Train(const FluxTinyTrainOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  const auto total_start = Clock::now();
  torch::manual_seed(o.seed);
  nlohmann::json report;
  report["seed"] = o.seed;
  report["threads"] = at::get_num_threads();
  auto log = [&](const std::string& line) {
    if (o.log) o.log(line);
  };

  // The architecture recipe (random weights): tokenizers and configs come from it.
  DemoPipelineRecipe recipe = flux::FluxTinyDemoArchitecture();
  std::map<std::string, Built> built;
  for (const DemoComponent& c : recipe.components) {
    ASSIGN_OR_RETURN(Built b, Build(c));
    RETURN_IF_ERROR(TorchCallVoid("initializing " + c.name, [&] {
      InitForTraining(b.model->module(), c.name == "transformer");
    }));
    built[c.name] = std::move(b);
  }
  Trainer tr{o};
  tr.flux = dynamic_cast<flux::FluxTransformer&>(*built["transformer"].model).transformer().get();
  tr.vae =
      dynamic_cast<autoencoder_kl::AutoencoderKLModel&>(*built["vae"].model).autoencoder().get();
  tr.clip = dynamic_cast<clip::ClipTextEncoder&>(*built["text_encoder"].model).clip().get();
  tr.t5 = dynamic_cast<t5::T5TextEncoder&>(*built["text_encoder_2"].model).t5().get();

  // Tokenizers: generated by the demo writer into a scratch folder (random weights there).
  const std::string scratch = (fs::path(o.out_dir) / ".scratch").string();
  ASSIGN_OR_RETURN(DemoPipelineFiles scratch_files, WriteDemoPipeline(recipe, scratch));
  ASSIGN_OR_RETURN(auto tokenizer,
                   tokenizers::LoadTokenizerFromFolder(scratch_files.pipeline_dir + "/tokenizer"));
  ASSIGN_OR_RETURN(auto tokenizer_2, tokenizers::LoadTokenizerFromFolder(
                                         scratch_files.pipeline_dir + "/tokenizer_2"));

  // Captions of every combination (held-out ones too: the text side is shared) plus "".
  const std::vector<Combination> all = AllCombinations();
  std::vector<std::string> captions;
  for (const Combination& c : all) captions.push_back(Caption(c));
  captions.push_back("");
  const int64_t empty_caption = static_cast<int64_t>(all.size());
  auto caption_index = [&](const Combination& c) {
    return static_cast<int64_t>(std::find(all.begin(), all.end(), c) - all.begin());
  };
  // Partial captions naming two of the three attributes ("a red circle", "a circle on a blue
  // background"): trained now and then so that each word steers its own attribute, which is what
  // lets held-out combinations be drawn.
  std::map<std::string, int64_t> partial_index;
  auto partial = [&](const std::string& text) {
    auto [it, added] = partial_index.emplace(text, static_cast<int64_t>(captions.size()));
    if (added) captions.push_back(text);
    return it->second;
  };
  std::vector<std::pair<int64_t, int64_t>> partials;  // per combination: (colour+shape, shape+bg)
  for (const Combination& c : all) {
    partials.emplace_back(
        partial(absl::StrCat("a ", ColourName(c.colour), " ", ShapeName(c.shape))),
        partial(absl::StrCat("a ", ShapeName(c.shape), " on a ", ColourName(c.background),
                             " background")));
  }
  const int64_t clip_length = tokenizer->model_max_length();
  const int64_t t5_length = tokenizer_2->model_max_length();
  ASSIGN_OR_RETURN(const Tensor clip_ids, TokenIds(*tokenizer, captions, clip_length));
  ASSIGN_OR_RETURN(const Tensor t5_ids, TokenIds(*tokenizer_2, captions, t5_length));

  const std::vector<Combination> training = TrainingCombinations();
  const int64_t pool_size = static_cast<int64_t>(training.size()) * o.scenes_per_combination;

  auto trained = TorchCall("training flux-tiny", [&]() -> absl::StatusOr<nlohmann::json> {
    // ---- Stage 1: the VAE --------------------------------------------------------------------
    auto stage_start = Clock::now();
    ASSIGN_OR_RETURN(Pool pool, RenderPool(training, o.seed + 1, pool_size, o.side));
    {
      tr.vae->set_differentiable(true);
      torch::optim::Adam opt(tr.vae->parameters(), torch::optim::AdamOptions(o.vae_learning_rate));
      Progress progress(o, "vae", o.vae_steps);
      for (int64_t step = 0; step < o.vae_steps; ++step) {
        SetLearningRate(opt, Schedule(o.vae_learning_rate, step, o.vae_steps));
        const Tensor x = pool.images.index_select(0, RandomIndices(pool_size, o.vae_batch));
        const autoencoder_kl::Posterior p = tr.vae->encode(x);
        const Tensor z = p.mean + (0.5 * p.logvar).exp() * torch::randn_like(p.mean);
        const Tensor recon = tr.vae->decode(z);
        const Tensor mse = (recon - x).square().mean();
        const Tensor kl = 0.5 * (p.mean.square() + p.logvar.exp() - 1 - p.logvar).mean();
        const Tensor loss = mse + o.vae_kl_weight * kl;
        opt.zero_grad();
        loss.backward();
        torch::nn::utils::clip_grad_norm_(tr.vae->parameters(), 1.0);
        opt.step();
        progress.Step(step, mse.item<double>());
      }
      tr.vae->set_differentiable(false);
      report["vae"] = {{"seconds", progress.seconds()},
                       {"steps", o.vae_steps},
                       {"reconstruction_mse", progress.loss()}};
    }
    // Latent statistics -> shift_factor / scaling_factor; the posterior of every pool image.
    Tensor means, logvars;
    {
      torch::NoGradGuard no_grad;
      std::tie(means, logvars) = tr.Encode(pool.images);
      tr.shift = means.mean().item<double>();
      tr.scale = 1.0 / (means - tr.shift).std().item<double>();
    }
    report["vae"]["shift_factor"] = tr.shift;
    report["vae"]["scaling_factor"] = tr.scale;
    report["vae"]["seconds_total"] = SecondsSince(stage_start);
    log(absl::StrFormat("vae: shift_factor %.4f, scaling_factor %.4f", tr.shift, tr.scale));

    // ---- Stage 2: text encoders + transformer -------------------------------------------------
    stage_start = Clock::now();
    const int64_t latent_side = o.side / 4;
    ASSIGN_OR_RETURN(tr.img_ids, flux::LatentImageIds(latent_side / 2, latent_side / 2,
                                                      torch::kFloat, torch::kCPU));
    ASSIGN_OR_RETURN(tr.txt_ids, flux::TextIds(t5_length, torch::kFloat, torch::kCPU));
    Tensor pool_caption = torch::empty({pool_size}, torch::kLong);
    Tensor pool_colour_shape = torch::empty({pool_size}, torch::kLong);
    Tensor pool_shape_background = torch::empty({pool_size}, torch::kLong);
    for (int64_t i = 0; i < pool_size; ++i) {
      const int64_t c = caption_index(pool.combinations[i]);
      pool_caption[i] = c;
      pool_colour_shape[i] = partials[c].first;
      pool_shape_background[i] = partials[c].second;
    }
    auto encode_text = [&](const Tensor& caption) -> std::pair<Tensor, Tensor> {
      const TextEncoderOutput c = tr.clip->Encode(clip_ids.index_select(0, caption), Tensor(),
                                                  /*output_hidden_states=*/false);
      const TextEncoderOutput t = tr.t5->Encode(t5_ids.index_select(0, caption), Tensor(),
                                                /*output_hidden_states=*/false);
      return {c.pooled, t.last_hidden_state};
    };
    {
      tr.flux->set_differentiable(true);
      tr.clip->set_differentiable(true);
      tr.t5->set_differentiable(true);
      std::vector<Tensor> params = tr.flux->parameters();
      for (const Tensor& p : tr.clip->parameters()) params.push_back(p);
      for (const Tensor& p : tr.t5->parameters()) params.push_back(p);
      torch::optim::Adam opt(params, torch::optim::AdamOptions(o.denoiser_learning_rate));
      Progress progress(o, "denoiser", o.denoiser_steps);
      for (int64_t step = 0; step < o.denoiser_steps; ++step) {
        SetLearningRate(opt, Schedule(o.denoiser_learning_rate, step, o.denoiser_steps));
        const Tensor idx = RandomIndices(pool_size, o.denoiser_batch);
        // u < dropout: ""; then partial_captions split between the two partial forms.
        const Tensor u = torch::rand({o.denoiser_batch});
        Tensor caption = pool_caption.index_select(0, idx);
        caption = torch::where(u < o.caption_dropout + o.partial_captions,
                               pool_shape_background.index_select(0, idx), caption);
        caption = torch::where(u < o.caption_dropout + o.partial_captions / 2,
                               pool_colour_shape.index_select(0, idx), caption);
        caption = torch::where(u < o.caption_dropout, torch::full_like(caption, empty_caption),
                               caption);
        const auto [pooled, sequence] = encode_text(caption);
        const Tensor x0 = tr.X0(means.index_select(0, idx), logvars.index_select(0, idx));
        const Tensor loss = tr.Loss(x0, pooled, sequence, nullptr);
        opt.zero_grad();
        loss.backward();
        torch::nn::utils::clip_grad_norm_(params, 1.0);
        opt.step();
        progress.Step(step, loss.item<double>());
      }
      tr.flux->set_differentiable(false);
      tr.clip->set_differentiable(false);
      tr.t5->set_differentiable(false);
      report["denoiser"] = {{"seconds", progress.seconds()},
                            {"steps", o.denoiser_steps},
                            {"flow_matching_loss", progress.loss()}};
    }

    // ---- Stage 3: the circles -> stars LoRA ---------------------------------------------------
    stage_start = Clock::now();
    // Targets: circle scenes drawn as stars (same colours and placement); the others as they are.
    ASSIGN_OR_RETURN(Pool lora_pool,
                     RenderPool(training, o.seed + 3, pool_size, o.side, [](const Combination& c) {
                       Combination d = c;
                       if (d.shape == Shape::kCircle) d.shape = Shape::kStar;
                       return d;
                     }));
    Tensor lora_means, lora_logvars, lora_caption = torch::empty({pool_size}, torch::kLong);
    std::vector<int64_t> circles, others;
    {
      torch::NoGradGuard no_grad;
      std::tie(lora_means, lora_logvars) = tr.Encode(lora_pool.images);
      for (int64_t i = 0; i < pool_size; ++i) {
        lora_caption[i] = caption_index(lora_pool.combinations[i]);
        (lora_pool.combinations[i].shape == Shape::kCircle ? circles : others).push_back(i);
      }
    }
    // Text embeddings of every caption, fixed (only the transformer carries the LoRA).
    Tensor all_pooled, all_sequence;
    {
      torch::NoGradGuard no_grad;
      const auto [p, s] = encode_text(torch::arange(static_cast<int64_t>(captions.size())));
      all_pooled = p.clone();
      all_sequence = s.clone();
    }
    const flux::FluxConfig& cfg = tr.flux->config();
    const std::vector<flux::BflLinearModule> modules =
        flux::BflBlockLinearModules(cfg.num_layers, cfg.num_single_layers);
    // Row widths of each diffusers target, read from the model.
    std::map<std::string, std::pair<int64_t, int64_t>> shapes;  // module -> (out, in)
    for (const auto& item : tr.flux->named_parameters()) {
      const std::string& k = item.key();
      if (k.size() > 7 && k.compare(k.size() - 7, 7, ".weight") == 0 && item.value().dim() == 2) {
        shapes[k.substr(0, k.size() - 7)] = {item.value().size(0), item.value().size(1)};
      }
    }
    struct LoraModule {
      const flux::BflLinearModule* m;
      Tensor down, up;  // [r, in], [Σ out, r]
      std::vector<int64_t> rows;
    };
    std::vector<LoraModule> lora;
    std::vector<Tensor> lora_params;
    for (const flux::BflLinearModule& m : modules) {
      // Modulations stay base: the LoRA changes what is drawn, not the conditioning pathway.
      if (m.bfl.find("mod") != std::string::npos) continue;
      LoraModule lm{&m};
      int64_t out = 0, in = 0;
      for (const std::string& d : m.diffusers) {
        const auto it = shapes.find(d);
        if (it == shapes.end()) {
          return absl::InternalError(absl::StrCat("LoRA target ", d, " is not a linear module"));
        }
        lm.rows.push_back(it->second.first);
        out += it->second.first;
        in = it->second.second;
      }
      lm.down = (torch::randn({o.lora_rank, in}) / std::sqrt(static_cast<double>(in)))
                    .requires_grad_(true);
      lm.up = torch::zeros({out, o.lora_rank}).requires_grad_(true);
      lora_params.push_back(lm.down);
      lora_params.push_back(lm.up);
      lora.push_back(std::move(lm));
    }
    auto context = [&]() {
      ds::LoraContext ctx;
      for (const LoraModule& lm : lora) {
        int64_t offset = 0;
        for (size_t j = 0; j < lm.m->diffusers.size(); ++j) {
          // alpha = rank: scale 1.
          ctx.AddDelta(lm.m->diffusers[j],
                       ds::LoraDelta{lm.down, lm.up.narrow(0, offset, lm.rows[j]), {}, 1.0});
          offset += lm.rows[j];
        }
      }
      return ctx;
    };
    {
      tr.flux->set_differentiable(true);
      for (Tensor& p : tr.flux->parameters()) p.set_requires_grad(false);  // base frozen
      torch::optim::Adam opt(lora_params, torch::optim::AdamOptions(o.lora_learning_rate));
      Progress progress(o, "lora", o.lora_steps);
      const Tensor circle_idx = torch::tensor(circles, torch::kLong);
      const Tensor other_idx = torch::tensor(others, torch::kLong);
      for (int64_t step = 0; step < o.lora_steps; ++step) {
        SetLearningRate(opt, Schedule(o.lora_learning_rate, step, o.lora_steps));
        // Half the batch circles (-> stars), half the other shapes (unchanged).
        const int64_t half = o.lora_batch / 2;
        const Tensor idx = torch::cat(
            {circle_idx.index_select(0, RandomIndices(circle_idx.size(0), half)),
             other_idx.index_select(0, RandomIndices(other_idx.size(0), o.lora_batch - half))});
        const Tensor caption = lora_caption.index_select(0, idx);
        const Tensor x0 = tr.X0(lora_means.index_select(0, idx), lora_logvars.index_select(0, idx));
        const ds::LoraContext ctx = context();
        const Tensor loss = tr.Loss(x0, all_pooled.index_select(0, caption),
                                    all_sequence.index_select(0, caption), &ctx);
        opt.zero_grad();
        loss.backward();
        opt.step();
        progress.Step(step, loss.item<double>());
      }
      tr.flux->set_differentiable(false);
      report["lora"] = {{"seconds", progress.seconds()},
                        {"steps", o.lora_steps},
                        {"rank", o.lora_rank},
                        {"modules", static_cast<int64_t>(lora.size())},
                        {"flow_matching_loss", progress.loss()}};
    }

    // ---- Stage 4: the shape classifier --------------------------------------------------------
    {
      ClassifierTrainOptions co;
      co.side = o.side;
      co.seed = o.seed + 4;
      co.steps = o.classifier_steps;
      const auto start = Clock::now();
      Progress progress(o, "classifier", o.classifier_steps);
      co.progress = [&](int64_t step, double loss, double) { progress.Step(step, loss); };
      ASSIGN_OR_RETURN(std::unique_ptr<ShapeClassifier> classifier, ShapeClassifier::Train(co));
      RETURN_IF_ERROR(
          classifier->Save((fs::path(o.out_dir) / "shape-classifier.safetensors").string()));
      report["classifier"] = {{"seconds", SecondsSince(start)}, {"steps", o.classifier_steps}};
    }

    // ---- Outputs ------------------------------------------------------------------------------
    // The pipeline folder: the recipe with the learned VAE factors, written by the demo writer
    // (configs, tokenizers, scheduler, model_index.json), then the trained weights in float16.
    DemoPipelineRecipe trained = recipe;
    for (DemoComponent& c : trained.components) {
      if (c.name == "vae") {
        c.config["scaling_factor"] = tr.scale;
        c.config["shift_factor"] = tr.shift;
      }
    }
    ASSIGN_OR_RETURN(DemoPipelineFiles files, WriteDemoPipeline(trained, scratch + "/trained"));
    const std::string source =
        absl::StrCat("diffusion-server tools/train train-flux-tiny, seed ", o.seed);
    for (const DemoComponent& c : trained.components) {
      const char* weights_name =
          c.library == "transformers" ? "model.safetensors" : "diffusion_pytorch_model.safetensors";
      RETURN_IF_ERROR(WriteHalf(absl::StrCat(files.pipeline_dir, "/", c.name, "/", weights_name),
                                built[c.name].model->module(), source));
    }
    const fs::path target = fs::path(o.out_dir) / "flux-tiny";
    std::error_code ec;
    fs::remove_all(target, ec);
    fs::copy(files.pipeline_dir, target, fs::copy_options::recursive, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("copying ", files.pipeline_dir, " to ",
                                              target.string(), ": ", ec.message()));
    }
    // The LoRA in kohya naming.
    std::vector<std::pair<std::string, Tensor>> lora_file;
    for (const LoraModule& lm : lora) {
      lora_file.emplace_back(lm.m->kohya + ".lora_down.weight",
                             lm.down.detach().to(torch::kHalf).contiguous());
      lora_file.emplace_back(lm.m->kohya + ".lora_up.weight",
                             lm.up.detach().to(torch::kHalf).contiguous());
      lora_file.emplace_back(lm.m->kohya + ".alpha",
                             torch::tensor(static_cast<float>(o.lora_rank)).to(torch::kHalf));
    }
    RETURN_IF_ERROR(WriteSafetensors((fs::path(o.out_dir) / "flux-tiny-stars.safetensors").string(),
                                     lora_file,
                                     {{"ss_network_module", "networks.lora_flux"},
                                      {"ss_network_dim", std::to_string(o.lora_rank)},
                                      {"ss_network_alpha", std::to_string(o.lora_rank)},
                                      {"source", source + ": turns circles into stars"}}));
    fs::remove_all(scratch, ec);
    report["total_seconds"] = SecondsSince(total_start);
    return report;
  });
  if (!trained.ok()) return trained.status();
  return *std::move(trained);
}

}  // namespace

absl::StatusOr<nlohmann::json> TrainFluxTiny(const FluxTinyTrainOptions& options) {
  RETURN_IF_ERROR(CheckOptions(options));
  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create ", options.out_dir, ": ", ec.message()));
  }
  ASSIGN_OR_RETURN(nlohmann::json report, Train(options));
  nlohmann::json settings = {{"side", options.side},
                             {"scenes_per_combination", options.scenes_per_combination},
                             {"vae_steps", options.vae_steps},
                             {"vae_batch", options.vae_batch},
                             {"denoiser_steps", options.denoiser_steps},
                             {"denoiser_batch", options.denoiser_batch},
                             {"caption_dropout", options.caption_dropout},
                             {"partial_captions", options.partial_captions},
                             {"lora_steps", options.lora_steps},
                             {"lora_batch", options.lora_batch},
                             {"lora_rank", options.lora_rank},
                             {"classifier_steps", options.classifier_steps}};
  report["settings"] = settings;
  std::FILE* f = std::fopen((fs::path(options.out_dir) / "training-report.json").c_str(), "w");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot write training-report.json in ", options.out_dir));
  }
  const std::string text = report.dump(2) + "\n";
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  return report;
}

}  // namespace ds::train
